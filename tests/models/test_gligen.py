"""GLIGEN grounding in our sampler (models/control/gligen.py) against diffusers' stock pipeline, on a GLIGEN
variant of the zoo UNet (its weights plus gated self-attention layers with random, open gates)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionGLIGENPipeline
from diffusers.models.attention import GatedSelfAttentionDense
from PIL import Image

from models.common.components import Components
from models.control.gligen import Grounding
from models.generation import text_to_image
from tests.control_models import gligen_unet, stock_pipeline

PROMPT = "a small red circle and a large blue square"
PHRASES = ("a small red circle", "a large blue square")
BOXES = ((0.05, 0.05, 0.3, 0.3), (0.5, 0.45, 0.95, 0.95))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def gligen(components: Components) -> Components:
    return dataclasses.replace(components, unet=gligen_unet(components.unet, seed=7))


def generate(model: Components, grounding: Grounding | None, steps: int = 6) -> Image.Image:
    params = text_to_image.Params(PROMPT, steps=steps, guidance_scale=5.0)
    inputs: dict[str, object] = {"grounding": grounding} if grounding is not None else {}
    return text_to_image.run(model, params, inputs, generator=gen(3)).images[0]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def enabled(model: Components) -> list[bool]:
    return [m.enabled for m in model.unet.modules() if isinstance(m, GatedSelfAttentionDense)]


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_our_sampler_matches_the_stock_gligen_pipeline(gligen: Components, fraction: float) -> None:
    ours = generate(gligen, Grounding(PHRASES, BOXES, fraction))
    assert all(enabled(gligen))  # the job left the model's layers as it found them
    pipe = stock_pipeline(StableDiffusionGLIGENPipeline, gligen)
    theirs = pipe(
        PROMPT,
        gligen_phrases=list(PHRASES),
        gligen_boxes=[list(box) for box in BOXES],
        gligen_scheduled_sampling_beta=fraction,
        height=64,
        width=64,
        num_inference_steps=6,
        guidance_scale=5.0,
        latents=torch.randn(1, 4, 16, 16, generator=gen(3)),
    ).images[0]
    pipe.enable_fuser(True)  # the stock pipeline leaves its gated layers off
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert np.abs(pixels(ours) - pixels(generate(gligen, None))).max() > 8  # the grounding does change the image


def test_no_grounding_or_fraction_zero_is_the_plain_unet(components: Components, gligen: Components) -> None:
    plain = pixels(generate(components, None))
    np.testing.assert_array_equal(pixels(generate(gligen, None)), plain)
    np.testing.assert_array_equal(pixels(generate(gligen, Grounding(PHRASES, BOXES, 0.0))), plain)
    assert all(enabled(gligen))


@pytest.mark.parametrize(
    ("grounding", "message"),
    [
        (Grounding(PHRASES, BOXES[:1]), "one phrase per box, got 2 phrases and 1 boxes"),
        (
            Grounding(PHRASES[:1], ((0.2, 0.2, 1.2, 0.5),)),
            "grounding[0].box must lie in [0, 1], got [0.2, 0.2, 1.2, 0.5]",
        ),
        (Grounding(PHRASES[:1], ((0.5, 0.2, 0.5, 0.6),)), "grounding[0].box must have x0 < x1 and y0 < y1"),
        (Grounding(("",), BOXES[:1]), "grounding[0].phrase must not be empty"),
        (Grounding(PHRASES, BOXES, 1.5), "grounding fraction must be in [0, 1], got 1.5"),
        (Grounding(("a circle",) * 31, ((0.1, 0.1, 0.2, 0.2),) * 31), "grounding takes 1 to 30 boxes, got 31"),
        (Grounding((), ()), "grounding takes 1 to 30 boxes, got 0"),
    ],
)
def test_bad_grounding_names_the_field(gligen: Components, grounding: Grounding, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        generate(gligen, grounding, steps=1)
    assert message in str(raised.value)


def test_grounding_on_a_model_without_gated_layers_is_refused(components: Components) -> None:
    with pytest.raises(ValueError, match="grounding needs a GLIGEN model"):
        generate(components, Grounding(PHRASES, BOXES), steps=1)
