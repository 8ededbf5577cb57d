"""The small shared helpers in their homes: input checks, progress offsets, PSNR, the training tail's pieces."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.harness import percent
from models.common.checks import check_guidance, check_image, check_steps
from models.common.components import Components
from models.common.metrics import MAX_PSNR, psnr
from models.common.progress import offset_progress
from models.personalization.training import TrainingLog, check_at_least_one, training_metrics


def test_checks_name_the_field(components: Components) -> None:
    factor = components.vae_scale
    check_image(components, Image.new("RGB", (8 * factor, 4 * factor)))
    with pytest.raises(ValueError, match=f"mask size must be a multiple of {factor}"):
        check_image(components, Image.new("RGB", (8 * factor + 1, 8 * factor)), "mask")
    check_steps(components, 1)
    with pytest.raises(ValueError, match="steps must be in"):
        check_steps(components, 0)
    check_guidance(1.0)
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        check_guidance(0.5)


def test_offset_progress_reports_steps_of_the_whole_job() -> None:
    seen: list[tuple[int, int]] = []
    report = offset_progress(lambda step, total: seen.append((step, total)), 10, 25)
    report(1, 5)
    report(5, 5)
    assert seen == [(11, 25), (15, 25)]


def test_psnr() -> None:
    black = Image.new("RGB", (4, 4))
    assert psnr(black, black) == MAX_PSNR
    grey = Image.fromarray(np.full((4, 4, 3), 255, dtype=np.uint8))
    assert psnr(black, grey) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same size"):
        psnr(black, Image.new("RGB", (2, 2)))


def test_percent() -> None:
    assert percent([True, False, True, True]) == 75.0
    assert percent([]) == 0.0


def test_training_tail_pieces() -> None:
    check_at_least_one(steps=1, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        check_at_least_one(steps=1, batch_size=0)
    log = TrainingLog(losses=[1.0] * 9 + [0.5], resumed_from=4, seconds=2.0)
    assert training_metrics(log, 10) == {"final_loss": 0.5, "steps": 10, "seconds": 2.0, "resumed_from": 4}
    metrics = training_metrics(log, 10, started=0.0)
    assert list(metrics) == ["final_loss", "steps", "seconds", "train_seconds", "resumed_from"]
    assert metrics["train_seconds"] == 2.0


class Stop(Exception):
    """Raised by a hook once it has seen what it needed (no half-precision convolution runs on the CPU)."""


@pytest.mark.parametrize("force_upcast", [True, False])
def test_a_half_precision_vae_that_asks_for_it_computes_in_float32(force_upcast: bool) -> None:
    """SDXL's VAE decodes to NaN in float16; with `force_upcast` in its config it runs in float32 for each call,
    as diffusers' SDXL pipelines do, and is back in float16 afterwards, also when the call fails."""
    import torch
    from diffusers import AutoencoderKL

    from models.common.latents import decode, encode

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, force_upcast=force_upcast).to(
        torch.float16
    )
    seen: list[torch.dtype] = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.extend([module.weight.dtype, args[0].dtype])
        raise Stop

    for part, call in (
        (vae.decoder, lambda: decode(vae, torch.zeros(1, 4, 4, 4, dtype=torch.float16))),
        (vae.encoder, lambda: encode(vae, torch.zeros(1, 3, 4, 4))),
    ):
        hook = part.conv_in.register_forward_pre_hook(record)
        with pytest.raises(Stop):
            call()
        hook.remove()
        expected = torch.float32 if force_upcast else torch.float16
        assert seen == [expected, expected], part
        assert vae.dtype == torch.float16
        seen.clear()
