"""Loading a single-file checkpoint (`<name>.safetensors`, the original LDM key layout of SD 1.x/2.x/SDXL) into the
same `Components` a diffusers folder gives, with diffusers' single-file conversion and local configs only.

The architecture comes from a config folder: the released family's, bundled in `worker/families/` (written from the
published configs of SD 1.5, SD 2.1-base, SD 2.1 and SDXL base 1.0), or the one the checkpoint's sidecar names
(contract/checkpoints.py). The bundled folders carry `tokenizer_config.json` only; the vocabulary is CLIP's, shared
by every family (`worker/families/clip-tokenizer/`, derived by zoo/clip_vocabulary.py). Nothing is downloaded, the
file is read with safetensors, never unpickled, and a file with non-finite weights is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from contract.checkpoints import (
    PICKLE_REFUSAL,
    Checkpoint,
    checkpoint_path,
    describe_checkpoint,
    pickled_checkpoint,
)
from models.common.components import Components
from worker.runtime import DevicePolicy, place

FAMILIES_DIR = Path(__file__).parent / "families"
CLIP_VOCABULARY = FAMILIES_DIR / "clip-tokenizer"


def find_checkpoint(models_dir: Path, name: str) -> Checkpoint:
    """The single-file checkpoint of base model `name`; FileNotFoundError when there is none, ValueError when it is
    pickled, unreadable or of an architecture without configs (the API refuses those jobs first)."""
    path = checkpoint_path(models_dir, name)
    if path is None:
        pickled = pickled_checkpoint(models_dir, name)
        if pickled is not None:
            raise ValueError(PICKLE_REFUSAL.format(file=pickled.name))
        raise FileNotFoundError(f"base model {name!r} not found in {models_dir}")
    checkpoint = describe_checkpoint(path)
    if checkpoint.problem is not None:
        raise ValueError(checkpoint.problem)
    return checkpoint


def config_folder(checkpoint: Checkpoint, models_dir: Path) -> Path:
    """The diffusers config folder the checkpoint's model is built from: its sidecar's, else its family's."""
    if checkpoint.config_folder is not None:
        return models_dir / checkpoint.config_folder
    if checkpoint.bundled is None:
        raise ValueError(checkpoint.problem)
    return FAMILIES_DIR / checkpoint.bundled.folder


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """A tokenizer folder's CLIPTokenizer: its own vocabulary when it has one, else CLIP's with its settings
    (`tokenizer_config.json`: SD 2.x and SDXL's OpenCLIP tokenizers pad with "!", SD 1.x's with <|endoftext|>)."""
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    keys = ("model_max_length", "bos_token", "eos_token", "unk_token", "pad_token")
    return CLIPTokenizer(
        vocab=str(CLIP_VOCABULARY / "vocab.json"),
        merges=str(CLIP_VOCABULARY / "merges.txt"),
        **{key: settings[key] for key in keys if key in settings},
    )


def _text_encoder(
    cls: type[CLIPTextModel] | type[CLIPTextModelWithProjection],
    state: dict[str, torch.Tensor],
    configs: Path,
    subfolder: str,
    dtype: torch.dtype,
) -> Any:
    """A text encoder converted from the checkpoint's OpenAI CLIP or OpenCLIP keys (diffusers' converter, which its
    `from_single_file` pipelines use)."""
    return create_diffusers_clip_model_from_ldm(
        cls, state, subfolder=subfolder, config=str(configs), torch_dtype=dtype, local_files_only=True
    )


def load_checkpoint(checkpoint: Checkpoint, models_dir: Path, policy: DevicePolicy) -> Components:
    """Load a single-file checkpoint onto the policy's device, shaped as a folder's load; `in_channels` from the file
    (an InstructPix2Pix or inpainting UNet keeps its own)."""
    configs = config_folder(checkpoint, models_dir)
    state = load_file(checkpoint.path)  # read once, on the CPU; every part takes its keys from it
    bad = next((k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise ValueError(f"{checkpoint.path.name}: tensor {bad!r} holds NaN or infinite values; it is not loaded")
    common: dict[str, Any] = {"config": str(configs), "local_files_only": True, "torch_dtype": policy.dtype}
    text_encoder_2, tokenizer_2 = None, None
    try:
        unet = UNet2DConditionModel.from_single_file(
            state, subfolder="unet", in_channels=checkpoint.in_channels, **common
        )
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
        text_encoder = _text_encoder(CLIPTextModel, state, configs, "text_encoder", policy.dtype)
        if (configs / "text_encoder_2").is_dir():
            text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, state, configs, "text_encoder_2", policy.dtype)
            tokenizer_2 = load_tokenizer(configs / "tokenizer_2")
    except NotImplementedError as exc:  # diffusers casts a part whose missing weights are still on the meta device
        raise ValueError(f"{checkpoint.path.name} lacks weights its configs need ({exc})") from exc
    del state
    index = json.loads((configs / "model_index.json").read_text())
    scheduler_config = json.loads((configs / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config["prediction_type"] = checkpoint.prediction_type
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(configs / "tokenizer"),
        scheduler_config=scheduler_config,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", text_encoder_2 is not None)),
    )
    return place(components, policy)
