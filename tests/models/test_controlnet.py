"""ControlNet in our sampler (models/control/controlnet.py) against diffusers' stock pipeline, on the zoo model
with a ControlNet copied from its UNet whose zero convolutions are given random weights (a trained one has
non-zero ones; zero ones would make every comparison trivially pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image

from models.common.components import Components
from models.control.controlnet import Control, condition_tensor
from models.control.preprocess import preprocess
from models.editing import region_edit, sdedit
from models.generation import text_to_image
from models.shapes.world import Scene, ShapeObject, render
from tests import control_models


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_controlnet(components: Components, seed: int) -> ControlNetModel:
    return control_models.tiny_controlnet(components.unet, components.vae_scale, seed)


@pytest.fixture(scope="module")
def controlnets(components: Components) -> list[ControlNetModel]:
    return [tiny_controlnet(components, seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def edge_map() -> Image.Image:
    scene = Scene((ShapeObject("square", "blue", "large", "top left", "solid"),), "dark")
    return Image.fromarray(preprocess("canny", render(scene, 64).image))


def generate(components: Components, controls: list[Control], seed: int = 3, steps: int = 6) -> Image.Image:
    params = text_to_image.Params("a large red circle at the top left", steps=steps, guidance_scale=5.0)
    return text_to_image.run(components, params, {"controls": controls}, generator=gen(seed)).images[0]


def control(components: Components, model: ControlNetModel, image: Image.Image, **kwargs: float) -> Control:
    return Control(model, condition_tensor(image, components.device, components.dtype), **kwargs)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("multi", [False, True])
def test_our_sampler_matches_the_stock_controlnet_pipeline(
    components: Components, controlnets: list[ControlNetModel], edge_map: Image.Image, multi: bool
) -> None:
    """Same weights, seed, condition, scales and step ranges: our text-to-image equals
    StableDiffusionControlNetPipeline within 1/255 (one ControlNet, and two summed)."""
    used = controlnets if multi else controlnets[:1]
    scales, starts, ends = [0.8, 0.5][: len(used)], [0.0, 0.2][: len(used)], [1.0, 0.7][: len(used)]
    ours = generate(
        components,
        [
            control(components, m, edge_map, scale=s, start=a, end=b)
            for m, s, a, b in zip(used, scales, starts, ends, strict=True)
        ],
    )
    pipe = control_models.stock_pipeline(
        StableDiffusionControlNetPipeline, components, controlnet=used if multi else used[0]
    )
    theirs = pipe(
        "a large red circle at the top left",
        image=[edge_map] * len(used) if multi else edge_map,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=5.0,
        controlnet_conditioning_scale=scales if multi else scales[0],
        control_guidance_start=starts if multi else starts[0],
        control_guidance_end=ends if multi else ends[0],
        latents=torch.randn(1, 4, 16, 16, generator=gen(3)),
    ).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert np.abs(pixels(ours) - pixels(generate(components, []))).max() > 8  # the control does change the image


def test_scale_zero_or_an_empty_step_range_is_exactly_the_uncontrolled_output(
    components: Components, controlnets: list[ControlNetModel], edge_map: Image.Image
) -> None:
    plain = pixels(generate(components, []))
    np.testing.assert_array_equal(
        pixels(generate(components, [control(components, controlnets[0], edge_map, scale=0.0)])), plain
    )
    late = control(components, controlnets[0], edge_map, start=0.9, end=1.0)  # covers no step of six
    np.testing.assert_array_equal(pixels(generate(components, [late])), plain)


def test_controlled_generation_is_deterministic(
    components: Components, controlnets: list[ControlNetModel], edge_map: Image.Image
) -> None:
    first = generate(components, [control(components, controlnets[0], edge_map)])
    np.testing.assert_array_equal(
        pixels(first), pixels(generate(components, [control(components, controlnets[0], edge_map)]))
    )


@pytest.mark.parametrize(
    ("kwargs", "size", "message"),
    [
        ({"scale": -0.5}, 64, "controls[0].scale must be >= 0, got -0.5"),
        ({"start": 0.6, "end": 0.4}, 64, "controls[0] needs 0 <= start < end <= 1, got start 0.6 and end 0.4"),
        ({"end": 1.5}, 64, "controls[0] needs 0 <= start < end <= 1"),
        ({}, 32, "controls[0].condition size must match the image size 64x64, got 32x32"),
    ],
)
def test_bad_controls_name_the_field(
    components: Components, controlnets: list[ControlNetModel], kwargs: dict[str, float], size: int, message: str
) -> None:
    condition = Image.new("RGB", (size, size))
    with pytest.raises(ValueError) as raised:
        generate(components, [control(components, controlnets[0], condition, **kwargs)], steps=1)
    assert message in str(raised.value)


def test_controlnet_steers_sdedit_and_scale_zero_is_plain_sdedit(
    components: Components, controlnets: list[ControlNetModel], edge_map: Image.Image
) -> None:
    source = Image.fromarray(
        render(Scene((ShapeObject("circle", "red", "large", "center", "solid"),), "dark"), 64).image
    )
    params = sdedit.Params("a large red circle at the top left", strength=0.7, steps=6, guidance_scale=5.0)

    def edit(controls: list[Control]) -> np.ndarray:
        inputs = {"image": source, "controls": controls}
        return pixels(sdedit.run(components, params, inputs, generator=gen(2)).images[0])

    plain = edit([])
    np.testing.assert_array_equal(edit([control(components, controlnets[0], edge_map, scale=0.0)]), plain)
    assert np.abs(edit([control(components, controlnets[0], edge_map)]) - plain).max() > 8
    with pytest.raises(ValueError, match=r"controls\[0\].condition size must match the image size 64x64, got 32x32"):
        edit([control(components, controlnets[0], Image.new("RGB", (32, 32)))])


def test_controlnet_steers_a_dense_region_edit_and_is_refused_with_sparse(
    components: Components, controlnets: list[ControlNetModel], edge_map: Image.Image
) -> None:
    """Dense region edit: scale 0 is the plain edit exactly; a control changes the region and nothing outside it;
    the sparse pass refuses controls."""
    scene = Scene((ShapeObject("square", "blue", "large", "center", "solid"),), "light")
    source = Image.fromarray(render(scene, 64).image)
    mask = Image.fromarray((render(scene, 64).masks[0] * 255).astype(np.uint8))

    def edit(controls: list[Control], sparse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        params = region_edit.Params("a large red circle at the center", strength=0.8, steps=6, sparse=sparse)
        inputs = {"image": source, "mask": mask, "controls": controls}
        out = region_edit.run(components, params, inputs, generator=gen(2))
        return pixels(out.images[0]), np.asarray(out.extra_images["region"]) > 0

    plain, region = edit([])
    np.testing.assert_array_equal(edit([control(components, controlnets[0], edge_map, scale=0.0)])[0], plain)
    steered, _ = edit([control(components, controlnets[0], edge_map)])
    assert np.abs(steered - plain)[region].max() > 8
    np.testing.assert_array_equal(steered[~region], pixels(source)[~region])
    with pytest.raises(ValueError, match="controls and grounding need sparse=false"):
        edit([control(components, controlnets[0], edge_map)], sparse=True)
