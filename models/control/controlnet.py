"""ControlNet (Zhang, Rao & Agrawala, ICCV 2023): a trainable copy of the UNet's encoder, joined to the frozen
UNet by zero convolutions, whose outputs are added to the UNet's skip connections and mid block.

Implemented: one or several ControlNets in one job (their residuals are summed, as in the paper's multi-condition
composition, sec. 4.3), each with a conditioning scale and a step range [start, end) given as fractions of the
sampling schedule; the condition is an RGB image in [0, 1] at the generation's size; classifier-free guidance
feeds the condition to both halves of the batch (not the paper's "guess mode"). An SDXL ControlNet (a copy of
SDXL's encoder, with its added text-time embedding) gets the UNet's added conditioning at each step
(`models/control/inputs.py`), as in diffusers' `StableDiffusionXLControlNetPipeline`.
Not implemented here: training (the zoo's scripts), guess mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image

from contract.controls import CONTROLNET_FIT


@dataclass(frozen=True)
class Control:
    """One ControlNet in a job. condition: (1, 3, H, W) in [0, 1], H and W the generated image's."""

    model: ControlNetModel
    condition: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, index: int, total: int) -> bool:
        """Whether step `index` of `total` lies in [start, end) (diffusers' `control_guidance_start/end`)."""
        return not (index / total < self.start or (index + 1) / total > self.end)


def condition_tensor(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A condition image (RGB) -> (1, 3, H, W) in [0, 1]. It is never resized here: `check_controls` refuses a
    size other than the generated image's, since a condition's pixels say where things go."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


def check_condition(name: str, scale: float, condition: torch.Tensor, width: int, height: int) -> None:
    """Raise ValueError naming the field unless scale >= 0 and condition (1, 3, H, W) is width x height."""
    if scale < 0:
        raise ValueError(f"{name}.scale must be >= 0, got {scale}")
    if tuple(condition.shape[-2:]) != (height, width):
        got = f"{condition.shape[-1]}x{condition.shape[-2]}"
        raise ValueError(f"{name}.condition size must match the image size {width}x{height}, got {got}")


def check_controls(controls: Sequence[Control], width: int, height: int) -> None:
    """Raise ValueError naming the field unless every control's scale, step range and condition size are valid."""
    for index, control in enumerate(controls):
        name = f"controls[{index}]"
        check_condition(name, control.scale, control.condition, width, height)
        if not 0.0 <= control.start < control.end <= 1.0:
            raise ValueError(f"{name} needs 0 <= start < end <= 1, got start {control.start} and end {control.end}")


def check_fit(name: str, model: ControlNetModel, unet: UNet2DConditionModel) -> None:
    """Raise ValueError naming the field unless the ControlNet `model` has the encoder structure of `unet` (the
    API refuses a misfit first, from the configs on disk; this keeps the method's own contract)."""
    for key in CONTROLNET_FIT:
        theirs, ours = model.config.get(key), unet.config.get(key)
        if _plain(theirs) != _plain(ours):
            raise ValueError(f"{name} does not fit the base model: its {key} is {theirs!r}, the UNet's is {ours!r}")


def _plain(value: object) -> object:
    """A config value comparable whether it was saved as a list or built as a tuple."""
    return tuple(value) if isinstance(value, list | tuple) else value
