"""Every trainer on a half-precision model (float16, the CUDA default, and bfloat16) stays finite and lands near its
float32 result: the trainable tensors have float32 masters and float32 Adam state (`MasterWeights`), the forward
runs in the model's dtype, and the float16 loss is scaled. Before, DreamBooth's UNet copy and Custom Diffusion's
K/V became NaN within a few steps in float16 (Adam's epsilon is 0 there) and LoRA failed on a CPU float16 model
(mixed dtypes under CPU autocast). The tolerances are the relative distance of the adapter's tensors from the
float32 run's after the same steps and seeds (measured: at most 0.04 in float16, 0.29 in bfloat16, whose 8-bit
mantissa rounds every weight the model holds)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.common.components import Components
from models.editing import imagic
from models.editing import prompt_to_prompt as p2p
from models.personalization import custom_diffusion, dreambooth, lora, perfusion
from models.personalization import textual_inversion as ti
from models.shapes.world import Scene, ShapeObject, render
from tests.conftest import ZOO_MODEL
from worker.runtime import DevicePolicy, load_components

TOLERANCE = {torch.float16: 0.1, torch.bfloat16: 0.4}
PIXEL_TOLERANCE = {torch.float16: 1.0, torch.bfloat16: 3.0}
"""Mean absolute difference (/255) of an edit's images from the float32 run's (measured: 0.13 and 1.4)."""


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


IMAGES = [
    Image.fromarray(render(Scene((ShapeObject("star", "yellow", "large", p),))).image)
    for p in ("center", "top left", "bottom right")
]
CLASS_IMAGES = [Image.fromarray(render(Scene((ShapeObject("circle", "blue", "small", "center"),))).image)] * 2

TRAINERS: dict[str, Callable[[Components], Any]] = {
    "lora": lambda c: lora.run(
        c,
        lora.Params(token="<h1>", class_word="diamond", steps=6, learning_rate=2e-2),
        {"images": IMAGES},
        generator=gen(0),
    ),
    "textual-inversion": lambda c: ti.run(
        c,
        ti.Params(token="<h2>", class_word="diamond", steps=6, learning_rate=5e-2),
        {"images": IMAGES},
        generator=gen(0),
    ),
    "dreambooth": lambda c: dreambooth.run(
        c,
        dreambooth.Params(token="<h3>", class_word="circle", steps=3, num_class_images=2),
        {"images": IMAGES, "class_images": CLASS_IMAGES},
        generator=gen(0),
    ),
    "custom-diffusion": lambda c: custom_diffusion.run(
        c,
        custom_diffusion.Params(token="<h4>", class_word="circle", steps=6, num_class_images=2),
        {"images": IMAGES, "class_images": CLASS_IMAGES},
        generator=gen(0),
    ),
    "perfusion": lambda c: perfusion.run(
        c,
        perfusion.Params(token="<h5>", class_word="circle", steps=6, learning_rate=1e-2),
        {"images": IMAGES},
        generator=gen(0),
    ),
}


EDIT_IMAGE = Image.fromarray(render(Scene((ShapeObject("circle", "red", "large", "center"),))).image)
EDITS: dict[str, Callable[[Components], Any]] = {
    "imagic": lambda c: imagic.run(
        c,
        imagic.Params(
            target_prompt="a large blue circle at the center",
            etas=(0.0, 1.0),
            embedding_steps=20,
            finetune_steps=20,
            steps=10,
        ),
        {"image": EDIT_IMAGE},
        generator=gen(0),
    ),
    "null-text inversion": lambda c: p2p.run(
        c,
        p2p.Params(
            "a large red circle at the center", "a large blue circle at the center", steps=10, null_text_steps=5
        ),
        {"image": EDIT_IMAGE},
        generator=gen(0),
    ),
}


@pytest.fixture(scope="module")
def models() -> dict[torch.dtype, Components]:
    torch.set_num_threads(1)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    return {d: load_components(ZOO_MODEL, DevicePolicy(torch.device("cpu"), d, "sdpa")) for d in dtypes}


@pytest.fixture(scope="module")
def float32_results(models: dict[torch.dtype, Components]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: train(models[torch.float32]).adapter.tensors for name, train in TRAINERS.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(TRAINERS))
def test_a_trainer_on_a_half_precision_model_is_finite_and_near_its_float32_result(
    name: str,
    dtype: torch.dtype,
    models: dict[torch.dtype, Components],
    float32_results: dict[str, dict[str, torch.Tensor]],
) -> None:
    model = models[dtype]
    before = {key: value.clone() for key, value in model.unet.state_dict().items()}
    tensors = TRAINERS[name](model).adapter.tensors
    assert all(bool(torch.isfinite(tensor.float()).all()) for tensor in tensors.values())
    reference = float32_results[name]
    assert set(tensors) <= set(reference)  # a weight delta leaves out what did not change
    distance = sum(
        float((tensors.get(key, torch.zeros_like(value)).float() - value.float()).norm() ** 2)
        for key, value in reference.items()
    )
    size = sum(float(value.float().norm() ** 2) for value in reference.values())
    assert (distance / size) ** 0.5 <= TOLERANCE[dtype]
    after = model.unet.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())  # the shared model is untouched
    assert all(value.dtype == dtype for value in after.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(EDITS))
def test_an_edit_that_optimises_on_a_half_precision_model_is_near_its_float32_result(
    name: str, dtype: torch.dtype, models: dict[torch.dtype, Components]
) -> None:
    """Imagic (embedding and UNet fine-tuning) and null-text inversion (one null embedding per step) optimise
    inside the job; in float16 the null embedding became NaN and the edit's images were garbage (a mean difference
    of 231/255 from the float32 run)."""
    half = [np.asarray(image, dtype=np.float64) for image in EDITS[name](models[dtype]).images]
    full = [np.asarray(image, dtype=np.float64) for image in EDITS[name](models[torch.float32]).images]
    assert len(half) == len(full)
    for a, b in zip(half, full, strict=True):
        assert float(np.abs(a - b).mean()) <= PIXEL_TOLERANCE[dtype]
