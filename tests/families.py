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

`sdxl_components` is shaped as Stable Diffusion XL is: two text encoders of different widths (a CLIP one and a
second with a text projection, as OpenCLIP bigG), whose penultimate states the UNet cross-attends to side by side
(cross-attention width = the sum), a three-level UNet with SDXL's added text-time conditioning (the pooled,
projected text and six size numbers, `projection_class_embeddings_input_dim` = 6 x `addition_time_embed_dim` + the
projection width), several transformer layers at its deepest level, a four-level VAE that scales by 8 with SDXL's
latent factor, SDXL's scheduler config and `force_zeros_for_empty_prompt`. Widths shrink (64x64 images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def text_config(
    tokenizer: CLIPTokenizer, width: int, intermediate: int, layers: int, heads: int, act: str, projection: int = 0
) -> CLIPTextConfig:
    """A CLIP text encoder's config over the tokenizer's vocabulary and sequence length (projection: its width)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=intermediate,
        projection_dim=projection or width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def text_model(
    tokenizer: CLIPTokenizer, width: int, intermediate: int, layers: int, heads: int, act: str
) -> CLIPTextModel:
    """A random CLIP text encoder over the tokenizer's vocabulary and sequence length (seed it first)."""
    return CLIPTextModel(text_config(tokenizer, width, intermediate, layers, heads, act))


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


def factor_8_vae(image_size: int, scaling_factor: float) -> AutoencoderKL:
    """A VAE with the real families' downsampling (four levels: 8 pixels per latent cell) at tiny widths."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=scaling_factor,
    )


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
    vae = factor_8_vae(SD1_IMAGE_SIZE, 0.18215)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=dict(SD1_SCHEDULER)
    )


# stabilityai/stable-diffusion-xl-base-1.0's scheduler config, as the model ships it (epsilon prediction).
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_IMAGE_SIZE = 64  # pixels: an 8x8 latent through the four-level VAE (factor 8, as SDXL's)
SDXL_WIDTHS = (32, 48)  # the two text encoders' widths (SDXL: 768 and 1280)
SDXL_PROJECTION = 40  # the second encoder's pooled projection (SDXL: 1280)
SDXL_TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)


def sdxl_components(seed: int = 0) -> Components:
    """A random SDXL-shaped model (64x64 images) with the zoo's tokenizer for both encoders (the second pads with
    "!", as SDXL's does), in float32 on the CPU."""
    tokenizer = CLIPTokenizer.from_pretrained(ZOO_MODEL / "tokenizer")
    tokenizer.model_max_length = 77
    tokenizer_2 = CLIPTokenizer.from_pretrained(ZOO_MODEL / "tokenizer", pad_token="!")
    tokenizer_2.model_max_length = 77
    torch.manual_seed(seed)
    text_encoder = text_model(tokenizer, width=SDXL_WIDTHS[0], intermediate=64, layers=2, heads=2, act="quick_gelu")
    config_2 = text_config(tokenizer_2, SDXL_WIDTHS[1], 96, layers=2, heads=2, act="gelu", projection=SDXL_PROJECTION)
    text_encoder_2 = CLIPTextModelWithProjection(config_2)
    unet = UNet2DConditionModel(
        sample_size=SDXL_IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
        cross_attention_dim=sum(SDXL_WIDTHS),
        attention_head_dim=(2, 4, 4),  # heads, as SDXL's (5, 10, 20)
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_PROJECTION,
        norm_num_groups=16,
    )
    vae = factor_8_vae(SDXL_IMAGE_SIZE, 0.13025)  # SDXL's VAE factor
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(SDXL_SCHEDULER),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=True,
    )


def save_folder(components: Components, folder: Path, weights: bool = True) -> Path:
    """Write the model as a diffusers folder (`weights=False`: its configs and tokenizer only)."""
    parts: dict[str, Any] = {"unet": components.unet, "vae": components.vae, "text_encoder": components.text_encoder}
    tokenizers = {"tokenizer": components.tokenizer}
    if components.text_encoder_2 is not None:
        parts["text_encoder_2"] = components.text_encoder_2
        tokenizers["tokenizer_2"] = components.tokenizer_2
    for name, module in parts.items():
        if weights:
            module.save_pretrained(folder / name)
        elif name.startswith("text_encoder"):
            module.config.save_pretrained(folder / name)
        else:
            module.save_config(folder / name)
    for name, tokenizer in tokenizers.items():
        tokenizer.save_pretrained(folder / name)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(components.scheduler_config))
    sdxl = components.text_encoder_2 is not None
    index = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "scheduler": ["diffusers", components.scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:
        index |= {
            "force_zeros_for_empty_prompt": components.force_zeros_for_empty_prompt,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
