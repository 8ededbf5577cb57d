"""Run directories, exact-resume checkpoints, EMA and the learning-rate schedule for zoo training.

A run lives in ``zoo/_runs/<name>/`` (git-ignored)::

    manifest.json        sizes, seeds and stage arguments; written once, checked on resume
    tokenizer/           CLIP-format tokenizer files
    data.npz eval.npz    rendered training / held-out scenes with token ids
    vae/ckpt-*.pt        VAE training state; vae/final/ the trained AutoencoderKL
    latents.pt           cached VAE posterior means of data.npz
    unet/ckpt-*.pt       UNet + text encoder training state (with EMA)
    metrics.jsonl        one JSON line per logged step, both stages

A checkpoint holds weights, optimizer state, EMA and every random state the loop draws from, so
``--resume`` continues bit-for-bit on the same machine and thread count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

RUNS_DIR = Path(__file__).resolve().parent / "_runs"
KEEP_CHECKPOINTS = 2


def run_dir(name: str) -> Path:
    """Directory of run ``name``, created if missing."""
    path = RUNS_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def warmup_cosine_lr(step: int, base_lr: float, warmup: int, total: int, final_fraction: float = 0.1) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine decay to ``final_fraction`` of it."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


class Ema:
    """Exponential moving average of parameters with the usual warmup ``min(decay, (1+n)/(10+n))``."""

    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        self.decay = decay
        self.shadow = {
            f"{name}.{key}": value.detach().clone()
            for name, module in modules.items()
            for key, value in module.state_dict().items()
        }

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], step: int) -> None:
        """Move the shadow weights toward the current ones."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, module in modules.items():
            for key, value in module.state_dict().items():
                shadow = self.shadow[f"{name}.{key}"]
                if value.dtype.is_floating_point:
                    shadow.lerp_(value, 1 - decay)
                else:
                    shadow.copy_(value)

    def state_for(self, name: str) -> dict[str, torch.Tensor]:
        """The averaged state dict of module ``name``."""
        prefix = f"{name}."
        return {key[len(prefix) :]: value for key, value in self.shadow.items() if key.startswith(prefix)}


def rng_state(numpy_rng: np.random.Generator, generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training loop draws from."""
    return {
        "numpy": numpy_rng.bit_generator.state,
        "torch_generator": generator.get_state(),
        "torch_global": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any], numpy_rng: np.random.Generator, generator: torch.Generator) -> None:
    """Inverse of :func:`rng_state`."""
    numpy_rng.bit_generator.state = state["numpy"]
    generator.set_state(state["torch_generator"])
    torch.set_rng_state(state["torch_global"])


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    """Atomically write ``ckpt-<step>.pt`` and keep only the newest few."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{step:07d}.pt"
    partial = path.with_suffix(".tmp")
    torch.save({"step": step, **state}, partial)
    partial.replace(path)
    for old in sorted(directory.glob("ckpt-*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    """Newest checkpoint in ``directory``, or None."""
    checkpoints = sorted(directory.glob("ckpt-*.pt"))
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint we wrote (tensors, numbers and strings only: ``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class MetricsLog:
    """Appends one JSON object per call to ``metrics.jsonl`` and mirrors it to the logger."""

    def __init__(self, path: Path, stage: str) -> None:
        self.path = path
        self.stage = stage
        self.start = time.monotonic()

    def write(self, step: int, **values: float) -> None:
        """Record ``values`` at ``step``."""
        record = {"stage": self.stage, "step": step, "elapsed_s": round(time.monotonic() - self.start, 1)}
        record.update({key: round(float(value), 6) for key, value in values.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("%s %s", self.stage, " ".join(f"{key}={value}" for key, value in record.items()))
