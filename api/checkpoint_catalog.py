"""Single-file checkpoints in the catalog: `<name>.safetensors` in the models directory is the base model `<name>`,
described from its header and sidecar (contract/checkpoints.py) by the same capability rules as a folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from api.catalog import _capabilities, _read_json, describe, runnable
from api.schemas import ModelOut
from contract.checkpoints import (
    PICKLE_REFUSAL,
    SUFFIX,
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    describe_checkpoint,
    pickled_checkpoint,
)

log = logging.getLogger("atelier.api")


def _unet_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The UNet config a folder of this model would have, for the folder's capability rules: the sidecar's config
    folder's, with what the file's shapes say on top."""
    folder = checkpoint.path.parent / checkpoint.config_folder if checkpoint.config_folder else None
    unet = _read_json(folder / "unet" / "config.json") if folder else {}
    unet.update(in_channels=checkpoint.in_channels, cross_attention_dim=checkpoint.cross_attention_dim)
    if checkpoint.is_sdxl:
        unet["addition_embed_type"] = "text_time"
    return unet


def describe_file(checkpoint: Checkpoint, default_name: str) -> ModelOut:
    """A single-file base model; it lists no capabilities or methods when the worker could not build it
    (`problem`)."""
    buildable = checkpoint.problem is None
    capabilities = _capabilities(_unet_config(checkpoint)) if buildable else []
    if checkpoint.config_folder:
        folder = describe(checkpoint.path.parent / checkpoint.config_folder, default_name)
        pipeline, sample_size = folder.pipeline, folder.sample_size
    else:
        pipeline = "StableDiffusionXLPipeline" if checkpoint.is_sdxl else "StableDiffusionPipeline"
        sample_size = checkpoint.bundled.sample_size if checkpoint.bundled else None
    return ModelOut(
        name=checkpoint.name,
        family=checkpoint.family,
        default=checkpoint.name == default_name,
        pipeline=pipeline,
        capabilities=capabilities,
        methods=runnable(checkpoint.family, capabilities) if buildable else [],
        unet_in_channels=checkpoint.in_channels,
        sample_size=sample_size,
        prediction_type=checkpoint.prediction_type,
        domain="general",
    )


def checkpoint_models(models_dir: Path, default_name: str, folder_names: set[str]) -> list[ModelOut]:
    """Every readable single-file base model not shadowed by a folder of the same name; an unreadable file is logged
    and left out (a job naming it is told why, by `refusal`)."""
    models = []
    for path in sorted(models_dir.glob(f"*{SUFFIX}")):
        name = path.name[: -len(SUFFIX)]
        if name in folder_names or not path.is_file():
            continue
        try:
            models.append(describe_file(describe_checkpoint(path), default_name))
        except (OSError, CheckpointError) as exc:
            log.warning("single-file model %s left out of the catalog: %s", path.name, exc)
    return models


def find_checkpoint_model(models_dir: Path, name: str, default_name: str) -> ModelOut | None:
    """The single-file base model `name`, if its file is there and readable."""
    path = checkpoint_path(models_dir, name)
    if path is None:
        return None
    try:
        return describe_file(describe_checkpoint(path), default_name)
    except (OSError, CheckpointError):
        return None


def refusal(models_dir: Path, name: str) -> str | None:
    """Why a job may not run on model `name` although a file by that name is there: a pickled checkpoint, an
    unreadable `.safetensors` file, or one the worker cannot build; None otherwise (a folder always wins)."""
    if (models_dir / name).is_dir():
        return None
    path = checkpoint_path(models_dir, name)
    if path is None:
        pickled = pickled_checkpoint(models_dir, name)
        return PICKLE_REFUSAL.format(file=pickled.name) if pickled is not None else None
    try:
        return describe_checkpoint(path).problem
    except (OSError, CheckpointError) as exc:
        return str(exc)
