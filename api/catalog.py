"""Models on disk, read as JSON (no torch): diffusers-format base model folders (a `model_index.json`), single-file
checkpoints (`<name>.safetensors`, api/checkpoint_catalog.py) and control model folders (a `config.json` of a
`ControlNetModel` or `T2IAdapter`) under the models directory."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from api.schemas import ModelKind, ModelOut
from contract.controls import CONTROLNET_FIT, SDXL_ADAPTER
from contract.domains import folder_domain
from contract.registry import methods
from contract.spec import ModelCapability

CONTROL_CLASSES: dict[str, ModelKind] = {"ControlNetModel": "controlnet", "T2IAdapter": "t2i-adapter"}

# (cross-attention width, UNet channels) of the released Stable Diffusion families.
KNOWN_FAMILIES = {
    (768, (320, 640, 1280, 1280)): "sd1",
    (1024, (320, 640, 1280, 1280)): "sd2",
    (2048, (320, 640, 1280)): "sdxl",
}
# A T2I-Adapter has no text width: SD 1.x's is known by its channels, SDXL's by its type (`full_adapter_xl`; its
# four channels are SD 1.x's: one map per SDXL encoder level and a fourth for the middle block).
ADAPTER_FAMILIES: dict[tuple[int, ...], str] = {(320, 640, 1280, 1280): "sd1"}

# Condition types guessed from a control model's folder name when it carries no `atelier.json`.
CONDITION_WORDS = ("canny", "depth", "seg", "mask", "scribble", "sketch", "openpose", "mlsd", "lineart", "normal")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _channels(config: dict[str, Any], key: str) -> tuple[int, ...]:
    value = config.get(key)
    return tuple(value) if isinstance(value, list) else ()


def family(config: dict[str, Any]) -> str:
    """The family of a UNet's or ControlNet's config (or a T2I-Adapter's, by its type and channels); SDXL's added
    text-time conditioning (an adapter: its SDXL type) marks it at any width."""
    if config.get("_class_name") == "T2IAdapter":
        if config.get("adapter_type") == SDXL_ADAPTER:
            return "sdxl"
        return ADAPTER_FAMILIES.get(_channels(config, "channels"), "custom")
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    width = config.get("cross_attention_dim")
    if not isinstance(width, int):
        return "custom"
    return KNOWN_FAMILIES.get((width, _channels(config, "block_out_channels")), "custom")


def _is_base(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _control_kind(folder: Path) -> ModelKind | None:
    if _is_base(folder):
        return None
    return CONTROL_CLASSES.get(str(_read_json(folder / "config.json").get("_class_name")))


def is_sdxl(index: dict[str, Any], unet: dict[str, Any]) -> bool:
    """An SDXL layout: a second text encoder, or a UNet with added text-time conditioning."""
    return "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time"


def _capabilities(unet: dict[str, Any]) -> list[ModelCapability]:
    """What the model's UNet can do; which methods run on its family is the methods' own `families`."""
    if not unet:
        return []
    in_channels = unet.get("in_channels")
    capabilities: list[ModelCapability] = ["unet"]
    if in_channels == 8:
        capabilities.append("instruct-pix2pix")
    elif in_channels == 4:
        capabilities.append("text-to-image")
    if unet.get("cross_attention_dim"):
        capabilities.append("cross-attention")
    if str(unet.get("attention_type", "")).startswith("gated"):
        capabilities.append("gligen")
    return capabilities


def runnable(family_name: str, capabilities: list[ModelCapability]) -> list[str]:
    """The job kinds that run on a base model of this family with these capabilities."""
    return [
        kind
        for kind, spec in methods().items()
        if family_name in spec.families and all(c in capabilities for c in spec.requires)
    ]


def describe(folder: Path, default_name: str) -> ModelOut:
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    in_channels = unet.get("in_channels")
    sample = unet.get("sample_size")
    blocks = vae.get("block_out_channels")
    factor = 2 ** (len(blocks) - 1) if isinstance(blocks, list) else None
    prediction = scheduler.get("prediction_type")
    family_name = "sdxl" if is_sdxl(index, unet) else family(unet)
    capabilities = _capabilities(unet)
    return ModelOut(
        name=folder.name,
        family=family_name,
        default=folder.name == default_name,
        pipeline=str(index.get("_class_name")) if index else None,
        capabilities=capabilities,
        methods=runnable(family_name, capabilities),
        unet_in_channels=in_channels if isinstance(in_channels, int) else None,
        sample_size=sample * factor if isinstance(sample, int) and factor else None,
        prediction_type=prediction if isinstance(prediction, str) else "epsilon",
        domain=folder_domain(folder),
    )


def describe_control(folder: Path, kind: ModelKind) -> ModelOut:
    """A control model; its condition type and base model come from an optional `atelier.json` beside its config
    (the zoo's trainers write one), else the condition is guessed from the folder's name."""
    config = _read_json(folder / "config.json")
    notes = _read_json(folder / "atelier.json")
    condition = notes.get("condition")
    if not isinstance(condition, str):
        name = folder.name.lower()
        condition = next((word for word in CONDITION_WORDS if re.search(rf"(^|[^a-z]){word}", name)), "unknown")
    base_model = notes.get("base_model")
    return ModelOut(
        name=folder.name,
        kind=kind,
        family=family(config),
        condition=condition,
        base_model=base_model if isinstance(base_model, str) else None,
        default=False,
        pipeline=str(config.get("_class_name")),
        capabilities=[],
        unet_in_channels=None,
        sample_size=None,
    )


def list_models(models_dir: Path, default_name: str) -> list[ModelOut]:
    """Every base model (the default first), then every control model, each by name."""
    if not models_dir.is_dir():
        return []
    from api.checkpoint_catalog import checkpoint_models  # it builds on this module's rules

    folders = sorted(p for p in models_dir.iterdir() if p.is_dir())
    bases = [describe(p, default_name) for p in folders if _is_base(p)]
    bases += checkpoint_models(models_dir, default_name, {p.name for p in folders})
    controls = [describe_control(p, kind) for p in folders if (kind := _control_kind(p)) is not None]
    return sorted(bases, key=lambda m: (not m.default, m.name)) + controls


def _folder(models_dir: Path, name: str) -> Path | None:
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    return models_dir / name


def find_model(models_dir: Path, name: str, default_name: str) -> ModelOut | None:
    """A base model by name: a folder, else a single-file checkpoint `<name>.safetensors`."""
    from api.checkpoint_catalog import find_checkpoint_model  # it builds on this module's rules

    folder = _folder(models_dir, name)
    if folder is not None and _is_base(folder):
        return describe(folder, default_name)
    return find_checkpoint_model(models_dir, name, default_name) if folder is not None and not folder.is_dir() else None


def find_control(models_dir: Path, name: str) -> ModelOut | None:
    """A control model by name."""
    folder = _folder(models_dir, name)
    kind = _control_kind(folder) if folder is not None else None
    return describe_control(folder, kind) if folder is not None and kind is not None else None


def control_misfit(models_dir: Path, control: str, base: str) -> str | None:
    """Why control model `control` cannot run on base model `base` (both exist), or None when it fits: a ControlNet
    must copy the UNet's encoder structure (SDXL's with its added text-time embedding), a T2I-Adapter must give one
    feature map per encoder level with its channels (SDXL's type, `full_adapter_xl`, may add a fourth for the middle
    block, at the last level's width). A control of the SDXL family never fits a base of another, nor the reverse."""
    if not (models_dir / base).is_dir():
        return "controls on single-file base models are not supported yet (their fit is read from a folder's configs)"
    unet = _read_json(models_dir / base / "unet" / "config.json")
    config = _read_json(models_dir / control / "config.json")
    base_xl = is_sdxl(_read_json(models_dir / base / "model_index.json"), unet)
    adapter = config.get("_class_name") == "T2IAdapter"
    kind = "T2I-Adapter" if adapter else "ControlNet"
    if adapter:
        control_xl = config.get("adapter_type") == SDXL_ADAPTER
    else:
        control_xl = config.get("addition_embed_type") == "text_time"
    if control_xl and not base_xl:
        return f"an SDXL {kind} runs on SDXL base models only"
    if base_xl and not control_xl:
        return (
            f"an SDXL base model takes SDXL control models only (a ControlNet with added text-time conditioning, a "
            f"T2I-Adapter of type {SDXL_ADAPTER}); this {kind} is not one"
        )
    if adapter:
        ours, theirs = _channels(unet, "block_out_channels"), _channels(config, "channels")
        if control_xl and ours and theirs == (*ours, ours[-1]):
            return None  # the released SDXL adapters' layout: the fourth map goes to the middle block
        if theirs != ours:
            return f"its channels {list(theirs)} are not the base's encoder channels {list(ours)}"
        return None
    for key in CONTROLNET_FIT:
        if config.get(key) != unet.get(key):
            return f"its {key} is {config.get(key)!r}, the base's is {unet.get(key)!r}"
    return None


def model_for(models_dir: Path, default_name: str, kind: str) -> str:
    """The model a job runs on when it names none: the default, or else the first model (default first, then by
    name) that runs the method (its family, and every capability it requires); the default when none does (the
    caller's 422)."""
    for model in list_models(models_dir, default_name):
        if model.kind == "base" and kind in model.methods:
            return model.name
    return default_name
