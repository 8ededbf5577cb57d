"""Base models on disk: diffusers-format folders under the models directory (read as JSON, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from api.schemas import ModelOut
from contract.spec import ModelCapability


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(folder: Path, default_name: str) -> ModelOut:
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    in_channels = unet.get("in_channels")
    capabilities: list[ModelCapability] = ["unet"] if unet else []
    if in_channels == 8:
        capabilities.append("instruct-pix2pix")
    elif in_channels == 4:
        capabilities.append("text-to-image")
    if unet.get("cross_attention_dim"):
        capabilities.append("cross-attention")
    sample = unet.get("sample_size")
    blocks = vae.get("block_out_channels")
    factor = 2 ** (len(blocks) - 1) if isinstance(blocks, list) else None
    return ModelOut(
        name=folder.name,
        default=folder.name == default_name,
        pipeline=str(index.get("_class_name")) if index else None,
        capabilities=capabilities,
        unet_in_channels=in_channels if isinstance(in_channels, int) else None,
        sample_size=sample * factor if isinstance(sample, int) and factor else None,
    )


def list_models(models_dir: Path, default_name: str) -> list[ModelOut]:
    """Every folder with a `model_index.json`, the default first."""
    if not models_dir.is_dir():
        return []
    found = [describe(p, default_name) for p in sorted(models_dir.iterdir()) if (p / "model_index.json").is_file()]
    return sorted(found, key=lambda m: (not m.default, m.name))


def find_model(models_dir: Path, name: str, default_name: str) -> ModelOut | None:
    if "/" in name or name.startswith("."):
        return None
    folder = models_dir / name
    return describe(folder, default_name) if (folder / "model_index.json").is_file() else None


def model_for(models_dir: Path, default_name: str, requires: tuple[ModelCapability, ...]) -> str:
    """The model a job runs on when it names none: the default, or else the first model (default first, then by
    name) that has every capability the method requires; the default when none has them (the caller's 422)."""
    for model in list_models(models_dir, default_name):
        if all(c in model.capabilities for c in requires):
            return model.name
    return default_name
