"""Diffusers state dicts -> the original (LDM) single-file layout of Stable Diffusion checkpoints, for the tests.

The inverse of diffusers' single-file converters, for any number of UNet/VAE levels and layers per level (the family
fixtures are shallow), following the mapping of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py:
`model.diffusion_model.*` (input/middle/output blocks), `first_stage_model.*` (encoder.down / decoder.up, the mid
attention as 1x1 convolutions), and the text encoder as OpenAI CLIP (`cond_stage_model.transformer.text_model.*`,
SD 1.x) or OpenCLIP (`cond_stage_model.model.*` with fused q/k/v, SD 2.x), or SDXL's two
(`conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from models.common.components import Components

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    part, _, tail = rest.partition(".")
    return f"{UNET_RESNET.get(part, part)}.{tail}"


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """`model.diffusion_model.*` keys of a UNet's weights."""
    per_level = int(unet.config.layers_per_block)
    attended_up = [hasattr(block, "attentions") for block in unet.up_blocks]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in unet.state_dict().items():
        parts = key.split(".")
        module, _, weight = key.rpartition(".")
        if module in UNET_TOP:
            name = f"{UNET_TOP[module]}.{weight}"
        elif parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "downsamplers":
                name = f"input_blocks.{(level + 1) * (per_level + 1)}.0.op.{'.'.join(parts[5:])}"
            else:
                index = 1 + level * (per_level + 1) + int(parts[3])
                name = f"input_blocks.{index}.{0 if kind == 'resnets' else 1}."
                name += _resnet(rest) if kind == "resnets" else rest
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "upsamplers":
                index = level * (per_level + 1) + per_level
                name = f"output_blocks.{index}.{2 if attended_up[level] else 1}.{'.'.join(parts[4:])}"
            else:
                index = level * (per_level + 1) + int(parts[3])
                name = f"output_blocks.{index}.{0 if kind == 'resnets' else 1}."
                name += _resnet(rest) if kind == "resnets" else rest
        elif parts[0] == "mid_block":
            kind, rest = parts[1], ".".join(parts[3:])
            if kind == "resnets":
                name = f"middle_block.{2 * int(parts[2])}.{_resnet(rest)}"
            else:
                name = f"middle_block.1.{rest}"
        else:
            raise KeyError(f"no LDM name for UNet weight {key}")
        out[f"model.diffusion_model.{name}"] = tensor
    return out


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """`first_stage_model.*` keys of a VAE's weights (the mid attention's linear layers as 1x1 convolutions)."""
    levels = len(vae.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in vae.state_dict().items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = name.split(".")
        if parts[1] == "down_blocks":
            level = parts[2]
            if parts[3] == "resnets":
                name = f"encoder.down.{level}.block.{parts[4]}.{'.'.join(parts[5:])}"
            else:
                name = f"encoder.down.{level}.downsample.{'.'.join(parts[5:])}"
        elif parts[1] == "up_blocks":
            level = levels - 1 - int(parts[2])
            if parts[3] == "resnets":
                name = f"decoder.up.{level}.block.{parts[4]}.{'.'.join(parts[5:])}"
            else:
                name = f"decoder.up.{level}.upsample.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            name = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            module = next(m for m in VAE_ATTENTION if rest.startswith(m + "."))
            name = f"{parts[0]}.mid.attn_1.{VAE_ATTENTION[module]}{rest[len(module) :]}"
            if tensor.dim() == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[f"first_stage_model.{name}"] = tensor
    return out


def _text_model_keys(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights named as transformers names them inside `text_model` (`embeddings.*`, ...)."""
    state = module.state_dict()
    return {key.removeprefix("text_model."): tensor for key, tensor in state.items() if "position_ids" not in key}


def clip_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP's layout: transformers' own names under `<prefix>text_model.`."""
    return {
        f"{prefix}text_model.{key}": t for key, t in _text_model_keys(text_encoder).items() if "projection" not in key
    }


OPEN_CLIP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's layout under `prefix`: `transformer.resblocks.<i>` with q, k and v fused into `in_proj_*`, and the
    text projection as a (width, projection) matrix."""
    state = _text_model_keys(text_encoder)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in OPEN_CLIP:
            out[prefix + OPEN_CLIP[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif key.startswith("encoder.layers."):
            _, _, layer, *rest = key.split(".")
            name = ".".join(rest)
            block = f"{prefix}transformer.resblocks.{layer}."
            if name.startswith("self_attn.q_proj."):
                kind = name.rsplit(".", 1)[1]
                fused = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(fused)
            elif name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            elif name.startswith("self_attn.out_proj."):
                out[block + name.replace("self_attn.", "attn.")] = tensor
            else:
                module = next(m for m in OPEN_CLIP_LAYER if name.startswith(m + "."))
                out[block + OPEN_CLIP_LAYER[module] + name[len(module) :]] = tensor
    if prefix + "text_projection" not in out:  # SD 2.x files carry OpenCLIP's projection; CLIPTextModel has none
        width = state["final_layer_norm.weight"].shape[0]
        out[prefix + "text_projection"] = torch.eye(width, device=state["final_layer_norm.weight"].device)
    return out


def to_ldm(components: Components, open_clip: bool) -> dict[str, torch.Tensor]:
    """A whole model in the single-file layout: SD 1.x's text encoder (`open_clip=False`), SD 2.x's, or SDXL's two."""
    state = {**unet_to_ldm(components.unet), **vae_to_ldm(components.vae)}
    if components.text_encoder_2 is not None:
        state |= clip_to_ldm(components.text_encoder, "conditioner.embedders.0.transformer.")
        state |= open_clip_to_ldm(components.text_encoder_2, "conditioner.embedders.1.model.")
    elif open_clip:
        state |= open_clip_to_ldm(components.text_encoder, "cond_stage_model.model.")
    else:
        state |= clip_to_ldm(components.text_encoder, "cond_stage_model.transformer.")
    return state


def save_single_file(components: Components, path: Path, open_clip: bool) -> Path:
    """Write the model as one `.safetensors` file in the original layout."""
    state = {key: tensor.detach().contiguous() for key, tensor in to_ldm(components, open_clip).items()}
    save_file(state, str(path))
    return path




def write_header_only(state: dict[str, Any], path: Path, dtype: str = "F16") -> Path:
    """A safetensors file of `state`'s names and shapes whose data is a hole (a sparse file): what the API reads of a
    checkpoint is its header, so real-size layouts are tested without gigabytes of weights."""
    width = {"F16": 2, "F32": 4}[dtype]
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in state.items():
        size = width * int(torch.Size(tensor.shape).numel())
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        handle.truncate(8 + len(encoded) + offset)
    return path
