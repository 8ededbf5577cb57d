"""imagic on the zoo model: determinism, the shared model left bit-identical (also after a cancel), the paper's
stages doing what they claim, progress per step, and bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.common.components import Components
from models.common.latents import encode, images_to_tensor
from models.common.text import encode_prompts
from models.editing import imagic
from models.shapes.world import Scene, ShapeObject, caption, render

SCENE = Scene((ShapeObject("circle", "red", "large", "center"),), "dark")
SOURCE = caption(SCENE)  # "a large red circle at the center on a dark background"
TARGET = SOURCE.replace("red", "blue")


class Canceled(Exception):
    pass


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(render(SCENE).image)


def edit(components: Components, image: Image.Image, seed: int = 0, **kwargs: object):  # type: ignore[no-untyped-def]
    values: dict[str, Any] = {
        "target_prompt": TARGET,
        "etas": (0.0, 1.0),
        "embedding_steps": 3,
        "finetune_steps": 3,
        "steps": 4,
        **kwargs,
    }
    callback = values.pop("callback", imagic.no_progress)
    return imagic.run(components, imagic.Params(**values), {"image": image}, generator=gen(seed), callback=callback)


def snapshot(components: Components) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in components.unet.state_dict().items()}


def assert_unchanged(components: Components, before: dict[str, torch.Tensor]) -> None:
    after = components.unet.state_dict()
    assert after.keys() == before.keys()
    changed = [name for name, tensor in before.items() if not torch.equal(after[name], tensor)]
    assert not changed, changed[:5]
    assert all(not p.requires_grad and p.grad is None for p in components.unet.parameters())
    assert components.unet.dtype == torch.float32 and not components.unet.training


# ------------------------------------------------------------------------------------------------
# Determinism and the shared model


def test_imagic_is_deterministic(components: Components, image: Image.Image) -> None:
    first, again = edit(components, image, 3), edit(components, image, 3)
    assert len(first.images) == 2 and first.result == {"etas": [0.0, 1.0]}
    for one, other in zip(first.images, again.images, strict=True):
        assert np.array_equal(pixels(one), pixels(other))
    assert first.metrics == again.metrics
    other_seed = edit(components, image, 4)
    assert not np.array_equal(pixels(first.images[0]), pixels(other_seed.images[0]))


def test_shared_unet_is_bit_identical_after_a_job(components: Components, image: Image.Image) -> None:
    """Stage B fine-tunes (a large learning rate, so the weights certainly move) a copy, never the cached UNet."""
    before = snapshot(components)
    processors = dict(components.unet.attn_processors)
    out = edit(components, image, finetune_steps=12, finetune_lr=1e-2)
    # it did train: the last 10 steps' mean loss differs from the first 10's
    assert out.metrics["finetune_loss_first"] != out.metrics["finetune_loss_last"], out.metrics
    assert_unchanged(components, before)
    assert dict(components.unet.attn_processors) == processors


@pytest.mark.parametrize("cancel_at", [2, 5, 8])  # in stage A, stage B, stage C (3 + 3 + 2 x 4 steps)
def test_shared_unet_is_bit_identical_after_a_cancel(
    components: Components, image: Image.Image, cancel_at: int
) -> None:
    before = snapshot(components)
    seen: list[int] = []

    def cancel(step: int, total: int) -> None:
        seen.append(step)
        if step == cancel_at:
            raise Canceled

    with pytest.raises(Canceled):
        edit(components, image, finetune_lr=1e-2, callback=cancel)
    assert seen == list(range(1, cancel_at + 1))
    assert_unchanged(components, before)


def test_runs_under_the_callers_no_grad(components: Components, image: Image.Image) -> None:
    """Stages A and B enable gradients themselves, so a caller in no_grad mode (as inference code is) works."""
    with torch.no_grad():
        out = edit(components, image, etas=[0.5], embedding_steps=2, finetune_steps=2, steps=2)
    assert out.metrics["embedding_relative_change"] > 0


# ------------------------------------------------------------------------------------------------
# The paper's stages


def held_out_loss(components: Components, unet: torch.nn.Module, clean: torch.Tensor, embedding: torch.Tensor) -> float:
    """L(x, e, theta) on 64 fixed draws (seed 123), the same for every embedding and model compared."""
    with torch.no_grad():
        return float(
            imagic.denoising_loss(unet, components.ddim(), clean, embedding, gen(123), batch=64)  # type: ignore[arg-type]
        )


def test_each_stage_lowers_the_reconstruction_loss(components: Components, image: Image.Image) -> None:
    """Kawar et al. sec. 3: e_opt reconstructs x better than e_tgt with the frozen model (stage A), the fine-tuned
    model reconstructs it better still with e_opt (stage B), and on that model eta = 0 reconstructs better than
    eta = 1; all measured as the denoising loss on fixed held-out draws."""
    import copy

    with torch.no_grad():
        target = encode_prompts(components.text_encoder, components.tokenizer, [TARGET])
        clean = encode(components.vae, images_to_tensor([image]))
    unet = copy.deepcopy(components.unet)
    scheduler = components.ddim()
    optimised, _ = imagic.optimise_embedding(unet, scheduler, clean, target, 40, 2e-3, gen(0))
    loss_target = held_out_loss(components, unet, clean, target)
    loss_optimised = held_out_loss(components, unet, clean, optimised)
    assert loss_optimised < loss_target, (loss_optimised, loss_target)
    imagic.finetune(unet, scheduler, clean, optimised, 40, 3e-5, gen(1))
    loss_tuned = held_out_loss(components, unet, clean, optimised)
    assert loss_tuned < loss_optimised, (loss_tuned, loss_optimised)
    # Stage C's ends on the fine-tuned model: eta = 0 (e_opt) reconstructs the input better than eta = 1 (e_tgt)
    loss_eta_1 = held_out_loss(components, unet, clean, imagic.interpolate(target, optimised, 1.0))
    assert loss_tuned < loss_eta_1, (loss_tuned, loss_eta_1)


def test_interpolation_endpoints() -> None:
    target, optimised = torch.randn(1, 4, 8, generator=gen(0)), torch.randn(1, 4, 8, generator=gen(1))
    assert torch.equal(imagic.interpolate(target, optimised, 0.0), optimised)
    assert torch.equal(imagic.interpolate(target, optimised, 1.0), target)
    assert torch.allclose(imagic.interpolate(target, optimised, 0.25), 0.25 * target + 0.75 * optimised)


def test_progress_covers_the_three_stages(components: Components, image: Image.Image) -> None:
    seen: list[tuple[int, int]] = []
    edit(
        components,
        image,
        embedding_steps=2,
        finetune_steps=3,
        etas=[0.5, 1.0, 1.2],
        steps=2,
        callback=lambda s, t: seen.append((s, t)),
    )
    assert seen == [(i, 2 + 3 + 3 * 2) for i in range(1, 12)]


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"etas": []}, "etas must hold 1 to 8 values, got 0"),
        ({"etas": [0.5] * 9}, "etas must hold 1 to 8 values, got 9"),
        ({"etas": [0.5, -0.1]}, r"etas must be >= 0, got \[0.5, -0.1\]"),
        ({"embedding_steps": -1}, "embedding_steps must be >= 0, got -1"),
        ({"finetune_steps": -1}, "finetune_steps must be >= 0, got -1"),
        ({"embedding_lr": 0.0}, "embedding_lr must be > 0, got 0.0"),
        ({"finetune_lr": -1e-4}, "finetune_lr must be > 0, got -0.0001"),
        ({"steps": 0}, r"steps must be in \[1, 1000\], got 0"),
        ({"guidance_scale": 0.5}, "guidance_scale must be >= 1, got 0.5"),
        ({"target_prompt": "circle " * 40}, "target_prompt is .* tokens"),
    ],
)
def test_imagic_rejects_bad_input(
    components: Components, image: Image.Image, kwargs: dict[str, Any], message: str
) -> None:
    before = snapshot(components)
    with pytest.raises(ValueError, match=message):
        edit(components, image, **kwargs)
    assert_unchanged(components, before)


def test_imagic_rejects_bad_image_size(components: Components, image: Image.Image) -> None:
    factor = components.vae_scale
    with pytest.raises(ValueError, match=f"image size must be a multiple of {factor}, got 64x{64 + factor // 2}"):
        edit(components, image.resize((64, 64 + factor // 2)))
