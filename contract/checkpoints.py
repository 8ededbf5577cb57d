"""Single-file checkpoints, as A1111 and ComfyUI users keep them: `<name>.safetensors` in the models directory is the
base model `<name>`. What it is comes from the file's safetensors header alone (tensor names and shapes; no weights
are read and no torch is needed), so the API and the worker describe it by the same rules.

- Family, by the original (LDM) key layout: the UNet's cross-attention width (`attn2.to_k.weight`'s columns) and its
  channels per level. The released families are SD 1.x (768 wide; 320, 640, 1280, 1280 channels), SD 2.x (1024
  wide, same channels) and SDXL (2048 wide; 320, 640, 1280); anything else is `custom`, except that, as for a folder,
  SDXL's marks make a file SDXL at any width: its second text encoder (`conditioner.embedders.1.*`) and the UNet's
  added text-time embedding (`label_emb`).
- Prediction type: a file's shapes cannot say it. The optional sidecar `<name>.json` can
  (`{"prediction_type": "epsilon"}` or `"v_prediction"`), else the scheduler config of the config folder it names;
  without either SD 2.x is `v_prediction` (the 768-pixel 2.0 and 2.1 models; diffusers' single-file loader decides
  the same when, as in every safetensors file, no training step is recorded) and the others `epsilon`. SD 2.x
  `epsilon` is the 512-pixel base model.
- Configs: the worker builds a released family from the configs bundled with it (`FAMILY_CONFIGS`). A file of
  another architecture (or a released one with changed configs) names a diffusers folder in the models directory
  in its sidecar, `{"config": "<folder>"}`, whose configs (and tokenizer) describe it; the folder's weights, if any,
  are not used. A `custom` file without one is listed but cannot run.
- Pickled checkpoints (`.ckpt`, `.pt`, `.pth`) are never loaded: unpickling runs code. They are not listed, and a
  job naming one is refused with a message saying to convert it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
PREDICTION_TYPES = ("epsilon", "v_prediction")

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"  # (channels, in_channels, 3, 3)
CROSS_ATTENTION = re.compile(re.escape(UNET) + r".*\.attn2\.to_k\.weight$")  # (inner, cross-attention width)
RESNET_OUT = re.compile(re.escape(UNET) + r"input_blocks\.(\d+)\.0\.out_layers\.3\.weight$")  # (channels, ...)
DOWNSAMPLE = re.compile(re.escape(UNET) + r"input_blocks\.(\d+)\.0\.op\.weight$")
SDXL_TEXT_ENCODER_2 = "conditioner.embedders.1."
SDXL_ADDED_CONDITIONING = UNET + "label_emb.0.0.weight"  # the text-time embedding (diffusers' add_embedding)

# (cross-attention width, UNet channels per level) of the released families.
FAMILY_SHAPES: dict[tuple[int, tuple[int, ...]], str] = {
    (768, (320, 640, 1280, 1280)): "sd1",
    (1024, (320, 640, 1280, 1280)): "sd2",
    (2048, (320, 640, 1280)): "sdxl",
}


@dataclass(frozen=True)
class FamilyConfig:
    """A bundled config folder (worker/families/<folder>) and the native image size its UNet config gives."""

    folder: str
    sample_size: int


# (family, prediction type) -> the configs the worker builds the file's model from, as the released models ship them.
FAMILY_CONFIGS: dict[tuple[str, str], FamilyConfig] = {
    ("sd1", "epsilon"): FamilyConfig("sd1", 512),  # runwayml/stable-diffusion-v1-5
    ("sd2", "epsilon"): FamilyConfig("sd2", 512),  # stabilityai/stable-diffusion-2-1-base
    ("sd2", "v_prediction"): FamilyConfig("sd2-v", 768),  # stabilityai/stable-diffusion-2-1
    ("sdxl", "epsilon"): FamilyConfig("sdxl", 1024),  # stabilityai/stable-diffusion-xl-base-1.0
}
DEFAULT_PREDICTION = {"sd2": "v_prediction"}  # the others: epsilon


class CheckpointError(ValueError):
    """The file is not a single-file checkpoint Atelier can describe; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    """What a single-file checkpoint's header and sidecar say.

    config_folder: a folder name in the models directory (the sidecar's `config`), else None and the bundled
    `FAMILY_CONFIGS` entry applies; `bundled` is that entry (None unless the file has a released family's exact
    widths, and that family's configs for its prediction type are bundled)."""

    name: str
    path: Path
    family: str
    prediction_type: str
    in_channels: int
    cross_attention_dim: int
    block_out_channels: tuple[int, ...]
    config_folder: str | None
    bundled: FamilyConfig | None

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def problem(self) -> str | None:
        """Why the worker cannot build this model, or None when it can."""
        if self.config_folder is not None and not (self.path.parent / self.config_folder / "unet").is_dir():
            return f"the config folder {self.config_folder!r} that {self.name}.json names has no unet/ config"
        if self.config_folder is None and self.bundled is None:
            return (
                f"{self.path.name} has no bundled configs (its widths are no released sd1, sd2 or sdxl model's, or "
                f"its family has no {self.prediction_type} configs): name a diffusers folder of its configs in "
                f'{self.name}.json, {{"config": "<folder>"}}'
            )
        return None


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), checked against the file's size
    so that a truncated file is an error here rather than at load time."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path.name} is too short to be a safetensors file")
        length = int.from_bytes(prefix, "little")
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path.name} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise CheckpointError(f"{path.name} is not a safetensors file (its header is not JSON)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is not a safetensors file (its header is not an object)")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not isinstance(shape, list)
            or not all(isinstance(n, int) for n in [*offsets, *shape])
        ):
            raise CheckpointError(f"{path.name}: tensor {name!r} has no valid shape and offsets")
        if offsets[1] > data_bytes:
            raise CheckpointError(f"{path.name} is truncated: tensor {name!r} ends past the end of the file")
    return header


def shapes(header: dict[str, Any]) -> dict[str, list[int]]:
    """Tensor name -> shape."""
    return {name: list(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def block_out_channels(tensor_shapes: dict[str, list[int]]) -> tuple[int, ...]:
    """The UNet's channels per level, read down its input blocks: a level's resnets, then a downsampler (none after
    the last level)."""
    resnets = {int(m[1]): s[0] for k, s in tensor_shapes.items() if (m := RESNET_OUT.match(k))}
    downsamples = {int(m[1]) for k in tensor_shapes if (m := DOWNSAMPLE.match(k))}
    channels: list[int] = []
    level: int | None = None
    for index in range(1, max([*resnets, *downsamples], default=0) + 1):
        if index in downsamples:
            if level is not None:
                channels.append(level)
            level = None
        elif index in resnets:
            level = resnets[index]
    if level is not None:
        channels.append(level)
    return tuple(channels)


def read_sidecar(path: Path) -> dict[str, Any]:
    """The optional `<name>.json` beside the checkpoint: {} when there is none."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        notes = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{sidecar.name} is not valid JSON") from exc
    if not isinstance(notes, dict):
        raise CheckpointError(f"{sidecar.name} must hold a JSON object")
    unknown = sorted(set(notes) - {"prediction_type", "config"})
    if unknown:
        raise CheckpointError(f"{sidecar.name}: unknown field {unknown[0]!r} (known: prediction_type, config)")
    prediction = notes.get("prediction_type")
    if prediction is not None and prediction not in PREDICTION_TYPES:
        raise CheckpointError(f"{sidecar.name}: prediction_type must be epsilon or v_prediction, got {prediction!r}")
    config = notes.get("config")
    if config is not None and (not isinstance(config, str) or not is_plain_name(config)):
        raise CheckpointError(f"{sidecar.name}: config must name a folder in the models directory, got {config!r}")
    return notes


def is_plain_name(name: str) -> bool:
    """A name of an entry directly in the models directory (no path, not hidden)."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _scheduler_prediction(models_dir: Path, config: str | None) -> str | None:
    """The prediction type a sidecar's config folder's scheduler config names, if any."""
    if config is None:
        return None
    try:
        scheduler = json.loads((models_dir / config / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    prediction = scheduler.get("prediction_type") if isinstance(scheduler, dict) else None
    return prediction if prediction in PREDICTION_TYPES else None


def describe_checkpoint(path: Path) -> Checkpoint:
    """Read a `.safetensors` checkpoint's header and sidecar; CheckpointError says what is wrong with either."""
    header = read_header(path)
    tensor_shapes = shapes(header)
    conv_in = tensor_shapes.get(CONV_IN)
    attention = next((s for k, s in tensor_shapes.items() if CROSS_ATTENTION.match(k)), None)
    if conv_in is None or len(conv_in) != 4 or attention is None or len(attention) != 2:
        raise CheckpointError(
            f"{path.name} is not a Stable Diffusion checkpoint in the original layout (no {CONV_IN} or "
            "cross-attention weights; a diffusers model is a folder, not one file)"
        )
    channels = block_out_channels(tensor_shapes)
    released = FAMILY_SHAPES.get((attention[1], channels))
    sdxl = SDXL_ADDED_CONDITIONING in tensor_shapes and any(k.startswith(SDXL_TEXT_ENCODER_2) for k in tensor_shapes)
    if sdxl:
        family = "sdxl"
    else:  # an SDXL-wide UNet without SDXL's marks (a UNet alone, a refiner) is no family's
        family = released if released is not None and released != "sdxl" else "custom"
    notes = read_sidecar(path)
    prediction = (
        notes.get("prediction_type")
        or _scheduler_prediction(path.parent, notes.get("config"))
        or DEFAULT_PREDICTION.get(family, "epsilon")
    )
    return Checkpoint(
        name=path.name[: -len(SUFFIX)],
        path=path,
        family=family,
        prediction_type=prediction,
        in_channels=conv_in[1],
        cross_attention_dim=attention[1],
        block_out_channels=channels,
        config_folder=notes.get("config"),
        bundled=FAMILY_CONFIGS.get((family, prediction)) if released == family else None,
    )


def checkpoint_path(models_dir: Path, name: str) -> Path | None:
    """The single-file checkpoint of base model `name`, if there is one."""
    if not is_plain_name(name):
        return None
    path = models_dir / f"{name}{SUFFIX}"
    return path if path.is_file() else None


def pickled_checkpoint(models_dir: Path, name: str) -> Path | None:
    """A pickled checkpoint that a job's model name points at (`<name>.ckpt`, or the file's own name)."""
    if not is_plain_name(name):
        return None
    candidates = [models_dir / name] if name.endswith(PICKLE_SUFFIXES) else []
    candidates += [models_dir / f"{name}{suffix}" for suffix in PICKLE_SUFFIXES]
    return next((path for path in candidates if path.is_file()), None)


PICKLE_REFUSAL = "pickled checkpoints are not loaded (unpickling can run code); convert {file} to .safetensors"
