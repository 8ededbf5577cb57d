"""T2I-Adapter in our sampler (models/control/adapter.py) against diffusers' stock pipeline, on the zoo model with
a randomly initialised adapter whose levels match the zoo UNet's encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionAdapterPipeline, T2IAdapter
from PIL import Image

from models.common.components import Components
from models.control.adapter import AdapterControl
from models.control.controlnet import condition_tensor
from models.control.preprocess import preprocess
from models.generation import text_to_image
from models.shapes.world import Scene, ShapeObject, render
from tests.control_models import stock_pipeline, tiny_adapter

PROMPT = "a large red circle at the top left"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def adapter(components: Components) -> T2IAdapter:
    return tiny_adapter(components.unet, components.vae_scale, seed=5)


@pytest.fixture(scope="module")
def sketch() -> Image.Image:
    scene = Scene((ShapeObject("diamond", "green", "large", "bottom right", "solid"),), "light")
    return Image.fromarray(preprocess("scribble", 255 - preprocess("canny", render(scene, 64).image)))


def generate(components: Components, adapters: list[AdapterControl], seed: int = 3) -> Image.Image:
    params = text_to_image.Params(PROMPT, steps=6, guidance_scale=5.0)
    return text_to_image.run(components, params, {"t2i_adapters": adapters}, generator=gen(seed)).images[0]


def use(components: Components, adapter: T2IAdapter, image: Image.Image, scale: float = 1.0) -> AdapterControl:
    return AdapterControl(adapter, condition_tensor(image, components.device, components.dtype), scale)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_our_sampler_matches_the_stock_adapter_pipeline(
    components: Components, adapter: T2IAdapter, sketch: Image.Image
) -> None:
    ours = generate(components, [use(components, adapter, sketch, 0.7)])
    pipe = stock_pipeline(StableDiffusionAdapterPipeline, components, adapter=adapter)
    theirs = pipe(
        PROMPT,
        image=sketch,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=5.0,
        adapter_conditioning_scale=0.7,
        latents=torch.randn(1, 4, 16, 16, generator=gen(3)),
    ).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert np.abs(pixels(ours) - pixels(generate(components, []))).max() > 8  # the adapter does change the image


def test_features_are_computed_once_per_job_not_per_step(
    components: Components, adapter: T2IAdapter, sketch: Image.Image
) -> None:
    calls: list[int] = []
    handle = adapter.register_forward_hook(lambda *_: calls.append(1))
    try:
        generate(components, [use(components, adapter, sketch)])
    finally:
        handle.remove()
    assert len(calls) == 1


def test_scale_zero_is_exactly_the_uncontrolled_output(
    components: Components, adapter: T2IAdapter, sketch: Image.Image
) -> None:
    plain = pixels(generate(components, []))
    np.testing.assert_array_equal(pixels(generate(components, [use(components, adapter, sketch, 0.0)])), plain)


def test_bad_adapter_inputs_name_the_field(components: Components, adapter: T2IAdapter) -> None:
    with pytest.raises(ValueError, match=r"adapters\[0\].condition size must match the image size 64x64, got 48x64"):
        generate(components, [use(components, adapter, Image.new("RGB", (48, 64)))])
    with pytest.raises(ValueError, match=r"adapters\[0\].scale must be >= 0, got -1"):
        generate(components, [use(components, adapter, Image.new("RGB", (64, 64)), -1.0)])
