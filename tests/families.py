"""Tiny random-weight models of the Stable Diffusion families the methods must handle, for the model tests.

`sd1_components` is shaped as Stable Diffusion 1.x is: a four-level UNet (three cross-attention levels, then a
plain one) with 1x1-convolution attention projections, 768-wide cross-attention from a CLIP text encoder of SD
1.x's width and sequence length (77 tokens), a four-level VAE that scales by 8, and SD 1.5's scheduler config
(epsilon). The depth and the other widths shrink (64x64 images, 8x8 latents).

`sd2_v_components` is shaped as Stable Diffusion 2.x's 768 models are: a `UNet2DConditionModel` with linear
attention projections, a CLIP text encoder with GELU, an `AutoencoderKL`, and SD 2.x's scheduler config, which
says the UNet predicts the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (`prediction_type:
v_prediction`) instead of the noise. Only the widths shrink (32x32 images, 16x16 latents), so every method runs
on it in a fraction of a second per step; the weights are random (the v-prediction tests check the arithmetic,
which does not depend on what the weights learnt), seeded so the model is the same in every run.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.common.components import Components
from tests.conftest import ZOO_MODEL

# stabilityai/stable-diffusion-2-1's scheduler config, as the model ships it.
SD2_V_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2_IMAGE_SIZE = 32  # pixels: a 16x16 latent through the two-level VAE


def text_model(
    tokenizer: CLIPTokenizer, width: int, intermediate: int, layers: int, heads: int, act: str
) -> CLIPTextModel:
    """A random CLIP text encoder over the tokenizer's vocabulary and sequence length (seed it first)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=intermediate,
            projection_dim=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act=act,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def sd2_v_components(seed: int = 0) -> Components:
    """A random SD 2.x-shaped v-prediction model (32x32 images) with the zoo's tokenizer, in float32 on the CPU."""
    tokenizer = CLIPTokenizer.from_pretrained(ZOO_MODEL / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = text_model(tokenizer, width=64, intermediate=128, layers=2, heads=2, act="gelu")  # OpenCLIP's
    unet = UNet2DConditionModel(
        sample_size=SD2_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),  # diffusers' name; it is the number of heads, as in SD 2.x's (5, 10, 20, 20)
        use_linear_projection=True,  # SD 2.x's transformer blocks project with linear layers, not 1x1 convs
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SD2_IMAGE_SIZE,
        scaling_factor=0.18215,  # SD 2.x keeps SD 1.5's VAE and factor
    )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=dict(SD2_V_SCHEDULER)
    )


# runwayml/stable-diffusion-v1-5's scheduler config, as the model ships it (epsilon prediction).
SD1_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD1_IMAGE_SIZE = 64  # pixels: an 8x8 latent through the four-level VAE (factor 8, as SD's)


def sd1_components(seed: int = 0) -> Components:
    """A random SD 1.x-shaped model (64x64 images) with the zoo's tokenizer, in float32 on the CPU."""
    tokenizer = CLIPTokenizer.from_pretrained(ZOO_MODEL / "tokenizer")
    tokenizer.model_max_length = 77  # SD's sequence length (the zoo's ids fit in SD's table)
    torch.manual_seed(seed)
    # SD 1.x's text width (its UNet cross-attends to 768-wide states) and OpenAI CLIP's activation
    text_encoder = text_model(tokenizer, width=768, intermediate=256, layers=1, heads=12, act="quick_gelu")
    unet = UNet2DConditionModel(
        sample_size=SD1_IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,  # SD 1.x: 8 heads at every level
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SD1_IMAGE_SIZE,
        scaling_factor=0.18215,
    )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=dict(SD1_SCHEDULER)
    )
