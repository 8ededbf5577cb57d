"""The loaded parts of a Stable-Diffusion-layout model, and what every method returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

ProgressCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, total); it may raise to stop the method (cancel)."""


def no_progress(step: int, total: int) -> None:
    """The default callback: reports nothing."""


@dataclass
class Components:
    """A base model as loaded once per worker. Methods must leave it exactly as they found it."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD 1.5, 4 for the ShapesWorld zoo)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    def ddim(self) -> DDIMScheduler:
        """A fresh DDIM scheduler for one job (schedulers carry state, so they are never shared)."""
        return DDIMScheduler.from_config(self.scheduler_config)

    def ddim_inverse(self) -> DDIMInverseScheduler:
        return DDIMInverseScheduler.from_config(self.scheduler_config)


@dataclass
class MethodOutput:
    """Images plus the metrics that travel with them."""

    images: list[Image.Image]
    extra_images: dict[str, Image.Image] = field(default_factory=dict)
    metrics: dict[str, float | int | str] = field(default_factory=dict)
