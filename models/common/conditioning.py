"""A prompt and its negative as the UNet of any family takes them: the cross-attention states of each, and for
SDXL the added conditioning (Podell et al., "SDXL", 2023, Sec. 2.2), so no method repeats the family's rules.

SD 1.x/2.x: `encode_prompts` of each, no added conditioning. SDXL: both text encoders' penultimate states,
concatenated (`encode_prompts_xl`); the UNet's added conditioning is the second encoder's pooled output
(`text_embeds`) and the size-and-crop micro-conditioning `time_ids` = (original height, original width, crop top,
crop left, target height, target width), here (H, W, 0, 0, H, W) as diffusers' `StableDiffusionXLPipeline` and
`StableDiffusionXLImg2ImgPipeline` use by default. With the model's `force_zeros_for_empty_prompt`, an empty
negative prompt is zeros (its states and its pooled output), as in those pipelines.
Not implemented: other size or crop conditioning, the refiner's aesthetic score, a second prompt per encoder.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from models.common.components import Components
from models.common.sampling import UnetExtras
from models.common.text import encode_prompts, encode_prompts_xl


class TextConditioning(NamedTuple):
    """cond, uncond: (B, L, D) cross-attention states; added: the UNet's extra inputs per batch (SDXL), or None."""

    cond: torch.Tensor
    uncond: torch.Tensor
    added: UnetExtras | None


def added_conditioning(pooled: torch.Tensor, uncond_pooled: torch.Tensor, height: int, width: int) -> UnetExtras:
    """SDXL's `added_cond_kwargs` for a UNet batch: the pooled text embeddings of its prompts ([uncond, cond]
    halves when guided) and the micro-conditioning (H, W, 0, 0, H, W) per sample. pooled: (B, P)."""
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)

    def extras(
        latents: torch.Tensor, timestep: torch.Tensor | int, embeds: torch.Tensor, guided: bool
    ) -> dict[str, Any]:
        text_embeds = torch.cat([uncond_pooled, pooled]) if guided else pooled
        if text_embeds.shape[0] != latents.shape[0]:
            raise ValueError(f"{text_embeds.shape[0]} pooled prompt embeddings for a batch of {latents.shape[0]}")
        return {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids.expand(len(text_embeds), -1)}}

    return extras


def encode_guided(
    components: Components, prompts: list[str], negative_prompts: list[str], height: int, width: int
) -> TextConditioning:
    """The conditioning of `prompts` against `negative_prompts` (one each per sample) for images of height x width
    pixels (only SDXL's micro-conditioning reads the size)."""
    if components.text_encoder_2 is None or components.tokenizer_2 is None:
        return TextConditioning(
            encode_prompts(components.text_encoder, components.tokenizer, prompts),
            encode_prompts(components.text_encoder, components.tokenizer, negative_prompts),
            None,
        )
    encoders = (components.text_encoder, components.text_encoder_2)
    tokenizers = (components.tokenizer, components.tokenizer_2)
    cond, pooled = encode_prompts_xl(encoders, tokenizers, prompts)
    if components.force_zeros_for_empty_prompt and not any(negative_prompts):
        uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
    else:
        uncond, uncond_pooled = encode_prompts_xl(encoders, tokenizers, negative_prompts)
    return TextConditioning(cond, uncond, added_conditioning(pooled, uncond_pooled, height, width))
