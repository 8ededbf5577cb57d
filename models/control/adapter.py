"""T2I-Adapter (Mou et al., AAAI 2024): a small convolutional network that turns a condition (a sketch, an edge
map) into one feature map per UNet encoder level, added inside the encoder.

Its point is cost: the features do not depend on the noisy latents or the timestep, so they are computed once per
job, not once per step as a ControlNet's residuals are (sec. 3.2). Implemented: one or several adapters, each with
a scale (their scaled features are summed, as diffusers' `MultiAdapter` does with weights), on every step. On SDXL
the adapter is SDXL's type (`full_adapter_xl`: its first map at twice the VAE's factor, after SDXL's first, plain
encoder level), as in diffusers' `StableDiffusionXLAdapterPipeline`.
Not implemented: the SDXL adapter's step fraction (`adapter_conditioning_factor`), training (the zoo's scripts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import T2IAdapter, UNet2DConditionModel

from contract.controls import SDXL_ADAPTER


@dataclass(frozen=True)
class AdapterControl:
    """One T2I-Adapter in a job. condition: (1, 3, H, W) in [0, 1], H and W the generated image's."""

    model: T2IAdapter
    condition: torch.Tensor
    scale: float = 1.0


@torch.no_grad()
def adapter_features(adapters: Sequence[AdapterControl]) -> list[torch.Tensor]:
    """The summed, scaled features of `adapters`, one (1, C_l, h_l, w_l) per UNet encoder level; [] if none
    contributes (all at scale 0), so the job then equals the uncontrolled one exactly."""
    total: list[torch.Tensor] = []
    for adapter in adapters:
        if adapter.scale == 0:
            continue
        features = [feature * adapter.scale for feature in adapter.model(adapter.condition)]
        total = features if not total else [a + b for a, b in zip(total, features, strict=True)]
    return total


def check_adapter_fit(name: str, model: T2IAdapter, unet: UNet2DConditionModel) -> None:
    """Raise ValueError naming the field unless the adapter's type is made for `unet`'s family: SDXL's for a UNet
    with SDXL's added text-time conditioning, another for any other (the API refuses a misfit first, with its
    channels, from the configs on disk)."""
    kind = model.config.get("adapter_type")
    sdxl = unet.config.get("addition_embed_type") == "text_time"
    if (kind == SDXL_ADAPTER) != sdxl:
        wanted = f"of type {SDXL_ADAPTER!r}" if sdxl else f"of a type other than {SDXL_ADAPTER!r}"
        raise ValueError(
            f"{name} does not fit the base model: its UNet takes a T2I-Adapter {wanted}, this one is of type {kind!r}"
        )
