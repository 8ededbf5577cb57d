"""Untrained control models that fit the zoo model, for the tests: a ControlNet, a T2I-Adapter and a GLIGEN variant
of the zoo UNet, each with random weights where training would have put some (the zero convolutions, the gates),
so that a control visibly steers the output. `write_test_models` saves them in diffusers' format beside the zoo's
base models, as a server's models directory holds them, with an SDXL folder of configs only (no weights) for the
catalog and a tiny SDXL-shaped model with weights (tests/families.py) for the worker, with its own ControlNet and
T2I-Adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel
from diffusers.models.attention import GatedSelfAttentionDense

from models.common.components import Components

CONTROLNET = "test-controlnet-canny"
ADAPTER = "test-t2i-adapter-sketch"
GLIGEN = "test-sd-gligen"
OTHER_FAMILY = "test-controlnet-other-family"
SDXL = "test-sdxl-configs"
SDXL_TINY = "test-sdxl-tiny"
SDXL_CONTROLNET = "test-sdxl-controlnet-canny"  # a ControlNet and a T2I-Adapter of the tiny SDXL model
SDXL_ADAPTER = "test-sdxl-t2i-adapter-sketch"

# Stable Diffusion XL 1.0 base's configs (the parts the catalog reads), as stabilityai/stable-diffusion-xl-base-1.0
# ships them.
SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def write_configs(
    folder: Path, index: dict[str, Any], unet: dict[str, Any], vae: dict[str, Any], scheduler: dict[str, Any]
) -> None:
    """A diffusers model folder of configs only (no weights): enough for the catalog, not for a worker."""
    for name, config in {
        "model_index.json": index,
        "unet/config.json": unet,
        "vae/config.json": vae,
        "scheduler/scheduler_config.json": scheduler,
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))


def tiny_controlnet(unet: UNet2DConditionModel, vae_scale: int, seed: int) -> ControlNetModel:
    """A ControlNet copied from `unet` (its conditioning embedding downsamples by the VAE's factor), with random
    zero convolutions. An SDXL one's added text-time embedding is given random weights too: as a copy of the UNet's
    it makes the size numbers move the residuals too little to see, so a test could not tell them from wrong ones."""
    channels = tuple(16 * 2**i for i in range(int(np.log2(vae_scale)) + 1))
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in [
            *model.controlnet_down_blocks,
            model.controlnet_mid_block,
            model.controlnet_cond_embedding.conv_out,
        ]:
            block.weight.normal_(0.0, 0.05)
        if model.config.addition_embed_type == "text_time":
            for layer in (model.add_embedding.linear_1, model.add_embedding.linear_2):
                layer.weight.normal_(0.0, 0.3)
    return model.eval()


def tiny_adapter(unet: UNet2DConditionModel, vae_scale: int, seed: int) -> T2IAdapter:
    """A randomly initialised T2I-Adapter with one feature map per encoder level of `unet`; for an SDXL UNet, SDXL's
    type (`full_adapter_xl`: its first map at twice the VAE's factor, and a fourth for the middle block)."""
    torch.manual_seed(seed)
    channels = list(unet.config.block_out_channels)
    if unet.config.addition_embed_type == "text_time":
        xl_channels = [*channels, channels[-1]]
        return T2IAdapter(
            3, xl_channels, num_res_blocks=1, downscale_factor=2 * vae_scale, adapter_type="full_adapter_xl"
        ).eval()
    return T2IAdapter(3, channels, num_res_blocks=1, downscale_factor=vae_scale).eval()


def gligen_unet(unet: UNet2DConditionModel, seed: int) -> UNet2DConditionModel:
    """`unet`'s weights plus GLIGEN's gated self-attention layers and position net (random, gates open)."""
    config = dict(unet.config) | {"attention_type": "gated"}
    torch.manual_seed(seed)
    gated = UNet2DConditionModel.from_config(config)
    missing = gated.load_state_dict(unet.state_dict(), strict=False)
    assert all("fuser" in name or "position_net" in name for name in missing.missing_keys)
    with torch.no_grad():
        for module in gated.modules():
            if isinstance(module, GatedSelfAttentionDense):
                module.alpha_attn.fill_(1.0)
                module.alpha_dense.fill_(1.0)
    return gated.eval()


def write_test_models(zoo: Path, base: str, out: Path) -> None:
    """Link the zoo's models (base and control) into `out` and save the test control models there, built on
    `base`, the SDXL configs, and the tiny SDXL model with its ControlNet and T2I-Adapter."""
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(zoo.iterdir()):
        if (folder / "model_index.json").is_file() or (folder / "atelier.json").is_file():
            (out / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    unet = UNet2DConditionModel.from_pretrained(zoo / base, subfolder="unet")
    vae_blocks = json.loads((zoo / base / "vae" / "config.json").read_text())["block_out_channels"]
    vae_scale = 2 ** (len(vae_blocks) - 1)
    tiny_controlnet(unet, vae_scale, seed=1).save_pretrained(out / CONTROLNET)
    (out / CONTROLNET / "atelier.json").write_text(json.dumps({"condition": "canny", "base_model": base}))
    tiny_adapter(unet, vae_scale, seed=5).save_pretrained(out / ADAPTER)
    (out / ADAPTER / "atelier.json").write_text(json.dumps({"condition": "sketch", "base_model": base}))
    other = ControlNetModel.from_unet(UNet2DConditionModel.from_config(dict(unet.config) | {"cross_attention_dim": 64}))
    other.save_pretrained(out / OTHER_FAMILY)
    gligen = out / GLIGEN
    gligen.mkdir()
    for part in sorted((zoo / base).iterdir()):
        if part.name != "unet" and part.name != "README.md":
            (gligen / part.name).symlink_to(part.resolve(), target_is_directory=part.is_dir())
    gligen_unet(unet, seed=7).save_pretrained(gligen / "unet")
    write_configs(out / SDXL, SDXL_INDEX, SDXL_UNET, SDXL_VAE, SDXL_SCHEDULER)
    from tests.families import save_folder, sdxl_components

    sdxl = sdxl_components(seed=0)
    save_folder(sdxl, out / SDXL_TINY)
    tiny_controlnet(sdxl.unet, sdxl.vae_scale, seed=1).save_pretrained(out / SDXL_CONTROLNET)
    (out / SDXL_CONTROLNET / "atelier.json").write_text(json.dumps({"condition": "canny", "base_model": SDXL_TINY}))
    tiny_adapter(sdxl.unet, sdxl.vae_scale, seed=5).save_pretrained(out / SDXL_ADAPTER)
    (out / SDXL_ADAPTER / "atelier.json").write_text(json.dumps({"condition": "sketch", "base_model": SDXL_TINY}))


def stock_pipeline(pipeline_class: type[Any], components: Components, **extra: Any) -> Any:
    """A diffusers pipeline of `pipeline_class` on the same weights as `components` (the parity tests' reference),
    with a fresh DDIM scheduler of the model's config and its progress bar off; `extra`: its control models."""
    pipe = pipeline_class(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=components.ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
