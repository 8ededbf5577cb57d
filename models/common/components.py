"""The loaded parts of a Stable-Diffusion-layout model, and what every method returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from contract.domains import Domain
from models.common.devices import execution_device

if TYPE_CHECKING:
    from models.personalization.common import Adapter

ProgressCallback = Callable[[int, int], None]
"""Called after each denoising step with (step, total); it may raise to stop the method (cancel)."""


def no_progress(step: int, total: int) -> None:
    """The default callback: reports nothing."""


@dataclass
class Components:
    """A base model as loaded once per worker. Methods must leave it exactly as they found it.

    SDXL adds a second text encoder (OpenCLIP bigG, with a projection) and its tokenizer; they are None for
    SD 1.x/2.x. `force_zeros_for_empty_prompt` (SDXL's pipeline config): an empty negative prompt's embeddings are
    zeros rather than the encoding of "" (models/common/text.py)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False
    domain: Domain = "general"
    """What the model was trained on (`contract/domains.py`): `shapesworld` for the zoo, whose training captions
    and corpora are ShapesWorld's (`models/personalization/captions.py`); `general` for any other model."""

    @property
    def device(self) -> torch.device:
        """Where the UNet computes (with CPU offload, its hook's device, while its weights rest on the CPU)."""
        return execution_device(self.unet)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and a UNet with SDXL's added text-time conditioning."""
        return self.text_encoder_2 is not None

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD 1.5, 4 for the ShapesWorld zoo)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def native_size(self) -> int:
        """The image size the model was trained at, in pixels: the UNet's sample size times the VAE's factor
        (512 for SD 1.5, 64 for the ShapesWorld zoo)."""
        return int(self.unet.config.sample_size) * self.vae_scale

    def side(self, pixels: int | None) -> int:
        """An image side as a method's params give it, None (left out) meaning the native size: the default of
        every image size, so that no size assumes one model."""
        return pixels or self.native_size

    def ddim(self) -> DDIMScheduler:
        """A fresh DDIM scheduler for one job (schedulers carry state, so they are never shared).

        It keeps the model's `prediction_type`, so `step` takes the UNet's output as it comes (eps or v) and
        `training_target` gives the model's own regression target (models/common/prediction.py)."""
        return DDIMScheduler.from_config(self.scheduler_config)

    def ddim_inverse(self) -> DDIMInverseScheduler:
        """A fresh DDIM inversion scheduler, with the model's `prediction_type` as `ddim`."""
        return DDIMInverseScheduler.from_config(self.scheduler_config)


@dataclass(frozen=True)
class OutputFile:
    """A non-image output (an archive, a weights file): its bytes and media type."""

    data: bytes
    content_type: str


@dataclass
class MethodOutput:
    """What a method returns: images, other files, a JSON result, and the metrics that travel with them."""

    images: list[Image.Image] = field(default_factory=list)
    extra_images: dict[str, Image.Image] = field(default_factory=dict)
    files: dict[str, OutputFile] = field(default_factory=dict)  # by file name, e.g. "dataset.zip"
    result: dict[str, Any] = field(default_factory=dict)  # JSON answer, e.g. a classification's ranking
    metrics: dict[str, float | int | str] = field(default_factory=dict)
    adapter: Adapter | None = None  # set by training methods; the worker stores it in the adapter registry
