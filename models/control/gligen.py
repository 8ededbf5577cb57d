"""GLIGEN (Li et al., CVPR 2023): grounding a generation by boxes, each with a phrase, through gated
self-attention layers inserted in a frozen UNet.

Each phrase is encoded by the text encoder (its pooled, EOS state) and joined with its box's Fourier features into
one grounding token; the gated layers let the visual tokens attend to them (eq. 3-5). Scheduled sampling (sec. 3.3)
uses the gated layers only for the first `fraction` of the steps, then the plain UNet.
Implemented: text-grounded generation with up to 30 boxes (the released models' limit); classifier-free guidance
gives the unconditional half no grounding, as the reference pipeline does. Not implemented: image-grounded
entities, GLIGEN inpainting, training (the zoo's scripts).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import GatedSelfAttentionDense
from transformers import CLIPTextModel, CLIPTokenizer

from models.common.devices import execution_device

MAX_OBJECTS = 30
Box = tuple[float, float, float, float]  # x0, y0, x1, y1, normalised to [0, 1]


@dataclass(frozen=True)
class Grounding:
    """The boxes of a job, one phrase each, and the fraction of steps that use them."""

    phrases: Sequence[str]
    boxes: Sequence[Box]
    fraction: float = 0.3  # the reference pipeline's default scheduled-sampling beta


@dataclass(frozen=True)
class GroundingTokens:
    """Grounding prepared for the UNet: boxes (1, 30, 4), phrase embeddings (1, 30, D), masks (1, 30)."""

    boxes: torch.Tensor
    embeddings: torch.Tensor
    masks: torch.Tensor
    fraction: float

    def kwargs(self, batch: int, guided: bool) -> dict[str, dict[str, torch.Tensor]]:
        """The UNet's `cross_attention_kwargs` for a batch of `batch` rows; with guidance the first half is the
        unconditional one and gets no grounding."""
        masks = self.masks.expand(batch, -1).clone()
        if guided:
            masks[: batch // 2] = 0
        return {
            "gligen": {
                "boxes": self.boxes.expand(batch, -1, -1),
                "positive_embeddings": self.embeddings.expand(batch, -1, -1),
                "masks": masks,
            }
        }


def is_gligen(unet: UNet2DConditionModel) -> bool:
    return unet.config.get("attention_type") == "gated" and getattr(unet, "position_net", None) is not None


def check_grounding(unet: UNet2DConditionModel, grounding: Grounding) -> None:
    """Raise ValueError naming the field unless the model is a GLIGEN one and the boxes and phrases are valid."""
    if not is_gligen(unet):
        raise ValueError("grounding needs a GLIGEN model (a UNet with gated self-attention); this model has none")
    if len(grounding.phrases) != len(grounding.boxes):
        raise ValueError(
            f"grounding needs one phrase per box, got {len(grounding.phrases)} phrases and {len(grounding.boxes)} boxes"
        )
    if not 1 <= len(grounding.boxes) <= MAX_OBJECTS:
        raise ValueError(f"grounding takes 1 to {MAX_OBJECTS} boxes, got {len(grounding.boxes)}")
    if not 0.0 <= grounding.fraction <= 1.0:
        raise ValueError(f"grounding fraction must be in [0, 1], got {grounding.fraction}")
    for index, (phrase, box) in enumerate(zip(grounding.phrases, grounding.boxes, strict=True)):
        if not phrase.strip():
            raise ValueError(f"grounding[{index}].phrase must not be empty")
        x0, y0, x1, y1 = box
        if not all(0.0 <= value <= 1.0 for value in box):
            raise ValueError(f"grounding[{index}].box must lie in [0, 1], got {list(box)}")
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"grounding[{index}].box must have x0 < x1 and y0 < y1 (a positive area), got {list(box)}")


def grounding_tokens(
    grounding: Grounding, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, width: int
) -> GroundingTokens:
    """Encode the phrases (pooled EOS states, (N, D)) and pad boxes, embeddings and masks to 30 objects.
    `width` is the UNet's cross-attention width D."""
    device, dtype = execution_device(text_encoder), text_encoder.dtype
    ids = tokenizer(list(grounding.phrases), padding=True, return_tensors="pt").to(device)
    pooled = text_encoder(**ids).pooler_output  # (N, D)
    count = len(grounding.boxes)
    boxes = torch.zeros(1, MAX_OBJECTS, 4, device=device, dtype=dtype)
    boxes[0, :count] = torch.tensor([list(box) for box in grounding.boxes], device=device, dtype=dtype)
    embeddings = torch.zeros(1, MAX_OBJECTS, width, device=device, dtype=dtype)
    embeddings[0, :count] = pooled
    masks = torch.zeros(1, MAX_OBJECTS, device=device, dtype=dtype)
    masks[0, :count] = 1
    return GroundingTokens(boxes, embeddings, masks, grounding.fraction)


def _gated_layers(unet: UNet2DConditionModel) -> list[GatedSelfAttentionDense]:
    return [module for module in unet.modules() if isinstance(module, GatedSelfAttentionDense)]


@contextmanager
def gated_layers(unet: UNet2DConditionModel) -> Iterator[list[GatedSelfAttentionDense]]:
    """The UNet's gated self-attention layers, for a job to switch on and off; their state is restored after."""
    layers = _gated_layers(unet)
    before = [layer.enabled for layer in layers]
    try:
        yield layers
    finally:
        for layer, enabled in zip(layers, before, strict=True):
            layer.enabled = enabled
