"""ControlNet and T2I-Adapter on SDXL (issue 12) in our sampler, on the tiny SDXL-shaped model (tests/families.py
`sdxl_components`), ControlNets copied from its UNet (`ControlNetModel.from_unet`: SDXL's encoder with its added
text-time embedding) whose zero convolutions and added embedding are given random weights, and a random SDXL-type
T2I-Adapter (tests/control_models.py).

Text-to-image equals diffusers' `StableDiffusionXLControlNetPipeline` and SDEdit equals
`StableDiffusionXLControlNetImg2ImgPipeline` on the same weights, seed, condition, scales and step ranges within
1/255, so each ControlNet gets SDXL's added conditioning (the pooled prompt and the size numbers) of the same
[unconditional, conditional] batch as the UNet: without it the ControlNet cannot run at all, and (tried by hand)
with the halves swapped or the size numbers doubled these comparisons are off by 31/255 or more. Text-to-image
with a T2I-Adapter equals `StableDiffusionXLAdapterPipeline`. Scale 0 is exactly the uncontrolled SDXL job; a
control model of another family, and GLIGEN grounding, are refused before any model runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image

from models.common.components import Components
from models.common.latents import encode, images_to_tensor
from models.control.adapter import AdapterControl
from models.control.controlnet import Control, condition_tensor
from models.control.gligen import Grounding
from models.control.preprocess import preprocess
from models.editing import region_edit, sdedit
from models.generation import text_to_image
from models.shapes.world import Scene, ShapeObject, render
from tests import control_models
from tests.families import SDXL_IMAGE_SIZE, sd1_components
from tests.models.test_sdxl import gen, pixels, stock_xl

SIZE = SDXL_IMAGE_SIZE
PROMPT = "a large red circle at the top left"


@pytest.fixture(scope="module")
def controlnets(sdxl: Components) -> list[ControlNetModel]:
    return [control_models.tiny_controlnet(sdxl.unet, sdxl.vae_scale, seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def edge_map() -> Image.Image:
    scene = Scene((ShapeObject("square", "blue", "large", "top left", "solid"),), "dark")
    return Image.fromarray(preprocess("canny", render(scene, SIZE).image))


def control(components: Components, model: ControlNetModel, image: Image.Image, **kwargs: float) -> Control:
    return Control(model, condition_tensor(image, components.device, components.dtype), **kwargs)


def generate(components: Components, controls: Sequence[Control], seed: int = 3, steps: int = 5) -> Image.Image:
    params = text_to_image.Params(PROMPT, steps=steps, guidance_scale=5.0)
    return text_to_image.run(components, params, {"controls": list(controls)}, generator=gen(seed)).images[0]


def test_the_controlnet_is_an_sdxl_one(sdxl: Components, controlnets: list[ControlNetModel]) -> None:
    """The copy keeps what makes a ControlNet SDXL's: the added text-time embedding and the encoder's widths."""
    config = controlnets[0].config
    assert config.addition_embed_type == "text_time"
    for key in ("cross_attention_dim", "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        assert config[key] == sdxl.unet.config[key], key
    assert tuple(config.transformer_layers_per_block) == tuple(sdxl.unet.config.transformer_layers_per_block)


@pytest.mark.parametrize("multi", [False, True])
def test_text_to_image_matches_the_stock_sdxl_controlnet_pipeline(
    sdxl: Components, controlnets: list[ControlNetModel], edge_map: Image.Image, multi: bool
) -> None:
    """Same weights, seed, condition, scales and step ranges: our text-to-image equals
    StableDiffusionXLControlNetPipeline within 1/255 (one ControlNet, and two summed); the control changes the
    image."""
    used = controlnets if multi else controlnets[:1]
    scales, starts, ends = [0.8, 0.5][: len(used)], [0.0, 0.2][: len(used)], [1.0, 0.7][: len(used)]
    ours = generate(
        sdxl,
        [
            control(sdxl, m, edge_map, scale=s, start=a, end=b)
            for m, s, a, b in zip(used, scales, starts, ends, strict=True)
        ],
    )
    pipe = stock_xl(StableDiffusionXLControlNetPipeline, sdxl, controlnet=used if multi else used[0])
    theirs = pipe(
        PROMPT,
        image=[edge_map] * len(used) if multi else edge_map,
        height=SIZE,
        width=SIZE,
        num_inference_steps=5,
        guidance_scale=5.0,
        controlnet_conditioning_scale=scales if multi else scales[0],
        control_guidance_start=starts if multi else starts[0],
        control_guidance_end=ends if multi else ends[0],
        latents=torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=gen(3)),
    ).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert np.abs(pixels(ours) - pixels(generate(sdxl, []))).max() > 8


def test_scale_zero_or_an_empty_step_range_is_exactly_the_uncontrolled_sdxl_output(
    sdxl: Components, controlnets: list[ControlNetModel], edge_map: Image.Image
) -> None:
    plain = pixels(generate(sdxl, []))
    np.testing.assert_array_equal(pixels(generate(sdxl, [control(sdxl, controlnets[0], edge_map, scale=0.0)])), plain)
    late = control(sdxl, controlnets[0], edge_map, start=0.9, end=1.0)  # covers no step of five
    np.testing.assert_array_equal(pixels(generate(sdxl, [late])), plain)


def test_sdedit_matches_the_stock_sdxl_controlnet_img2img_pipeline(
    sdxl: Components, controlnets: list[ControlNetModel], edge_map: Image.Image
) -> None:
    """Our SDEdit with a ControlNet equals StableDiffusionXLControlNetImg2ImgPipeline given the same encoded image
    (the pipeline samples the VAE's posterior, we take its mean), noise draw, strength, scale and step range, within
    1/255: both count the step range over the steps actually run. Scale 0 is exactly the plain SDXL SDEdit."""
    scene = Scene((ShapeObject("circle", "red", "large", "center", "solid"),), "dark")
    source = Image.fromarray(render(scene, SIZE).image)
    params = sdedit.Params(PROMPT, strength=0.6, steps=10, guidance_scale=5.0)

    def edit(controls: list[Control]) -> Image.Image:
        return sdedit.run(sdxl, params, {"image": source, "controls": controls}, generator=gen(5)).images[0]

    ours = edit([control(sdxl, controlnets[0], edge_map, scale=0.9, start=0.0, end=0.7)])
    with torch.no_grad():
        clean = encode(sdxl.vae, images_to_tensor([source]))
    theirs = stock_xl(StableDiffusionXLControlNetImg2ImgPipeline, sdxl, controlnet=controlnets[0])(
        PROMPT, image=clean, control_image=edge_map, strength=params.strength, num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale, controlnet_conditioning_scale=0.9, control_guidance_start=0.0,
        control_guidance_end=0.7, generator=gen(5),
    ).images[0]  # fmt: skip
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    plain = edit([])
    assert np.abs(pixels(ours) - pixels(plain)).max() > 8  # the comparison can fail
    np.testing.assert_array_equal(pixels(edit([control(sdxl, controlnets[0], edge_map, scale=0.0)])), pixels(plain))


def test_a_controlnet_steers_a_dense_sdxl_region_edit_inside_the_region_only(
    sdxl: Components, controlnets: list[ControlNetModel], edge_map: Image.Image
) -> None:
    """Scale 0 is the plain SDXL region edit exactly; a ControlNet changes the region and nothing outside it."""
    scene = Scene((ShapeObject("square", "blue", "large", "center", "solid"),), "light")
    source = Image.fromarray(render(scene, SIZE).image)
    mask = Image.fromarray((render(scene, SIZE).masks[0] * 255).astype(np.uint8))

    def edit(controls: list[Control]) -> tuple[np.ndarray, np.ndarray]:
        params = region_edit.Params("a large red circle at the center", strength=0.8, steps=5, sparse=False)
        out = region_edit.run(sdxl, params, {"image": source, "mask": mask, "controls": controls}, generator=gen(2))
        return pixels(out.images[0]), np.asarray(out.extra_images["region"]) > 0

    plain, region = edit([])
    np.testing.assert_array_equal(edit([control(sdxl, controlnets[0], edge_map, scale=0.0)])[0], plain)
    steered, _ = edit([control(sdxl, controlnets[0], edge_map)])
    assert np.abs(steered - plain)[region].max() > 8
    np.testing.assert_array_equal(steered[~region], pixels(source)[~region])


@pytest.fixture(scope="module")
def sketch() -> Image.Image:
    scene = Scene((ShapeObject("diamond", "green", "large", "bottom right", "solid"),), "light")
    return Image.fromarray(preprocess("scribble", 255 - preprocess("canny", render(scene, SIZE).image)))


def test_text_to_image_with_a_t2i_adapter_matches_the_stock_sdxl_adapter_pipeline(
    sdxl: Components, sketch: Image.Image
) -> None:
    """An SDXL-type T2I-Adapter (its features computed once, on every step): our text-to-image equals
    StableDiffusionXLAdapterPipeline within 1/255; the adapter changes the image; scale 0 is the plain job."""
    adapter = control_models.tiny_adapter(sdxl.unet, sdxl.vae_scale, seed=5)
    assert adapter.config.adapter_type == "full_adapter_xl"

    def run(scale: float) -> Image.Image:
        params = text_to_image.Params(PROMPT, steps=5, guidance_scale=5.0)
        condition = condition_tensor(sketch, sdxl.device, sdxl.dtype)
        inputs = {"t2i_adapters": [AdapterControl(adapter, condition, scale)]}
        return text_to_image.run(sdxl, params, inputs, generator=gen(3)).images[0]

    ours = run(0.7)
    theirs = stock_xl(StableDiffusionXLAdapterPipeline, sdxl, adapter=adapter)(
        PROMPT, image=sketch, height=SIZE, width=SIZE, num_inference_steps=5, guidance_scale=5.0,
        adapter_conditioning_scale=0.7, latents=torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=gen(3)),
    ).images[0]  # fmt: skip
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    plain = pixels(generate(sdxl, []))
    assert np.abs(pixels(ours) - plain).max() > 8
    np.testing.assert_array_equal(pixels(run(0.0)), plain)


def test_a_controlnet_of_another_family_is_refused_naming_the_field(
    sdxl: Components, controlnets: list[ControlNetModel], edge_map: Image.Image
) -> None:
    """An SD 1.x ControlNet on SDXL, and an SDXL one on SD 1.x: a ValueError naming the control and the config
    field that differs, before any model runs (the API refuses both first, from the configs on disk)."""
    sd1 = sd1_components()
    sd1_net = control_models.tiny_controlnet(sd1.unet, sd1.vae_scale, seed=1)
    with pytest.raises(ValueError, match=r"controls\[0\] does not fit the base model: its cross_attention_dim is 768"):
        generate(sdxl, [control(sdxl, sd1_net, edge_map)], steps=1)
    with pytest.raises(ValueError, match=r"controls\[1\] does not fit the base model: its cross_attention_dim is 80"):
        generate(sd1, [control(sd1, sd1_net, edge_map), control(sd1, controlnets[0], edge_map)], steps=1)


def test_a_t2i_adapter_of_another_family_is_refused_naming_the_field(sdxl: Components, sketch: Image.Image) -> None:
    sd1 = sd1_components()
    params = text_to_image.Params(PROMPT, steps=1)
    for base, other in ((sdxl, sd1), (sd1, sdxl)):
        adapter = control_models.tiny_adapter(other.unet, other.vae_scale, seed=5)
        inputs = {"t2i_adapters": [AdapterControl(adapter, condition_tensor(sketch, base.device, base.dtype))]}
        with pytest.raises(ValueError, match=r"adapters\[0\] does not fit the base model: its UNet takes"):
            text_to_image.run(base, params, inputs, generator=gen(0))


def test_gligen_grounding_is_refused_on_sdxl(sdxl: Components) -> None:
    grounding = Grounding(phrases=["a red circle"], boxes=[(0.0, 0.0, 0.5, 0.5)], fraction=0.5)
    with pytest.raises(ValueError, match="grounding .GLIGEN. is not supported on SDXL models"):
        text_to_image.run(sdxl, text_to_image.Params(PROMPT, steps=1), {"grounding": grounding}, generator=gen(0))
