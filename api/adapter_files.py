"""Checking an uploaded adapter file by its content, against the base model it is for (no torch, no pickle).

The file must parse as safetensors (`safetensors.deserialize`: a pickle, a truncated file or a bad header fails),
hold finite float tensors only (NaN or Inf weights would make black images; read as bits with numpy), and fit the
named base model: LoRA pairs A (r, in) / B (out, r) for linear layers the model has (shapes read from the model's
own safetensors headers), a textual-inversion embedding (n, D) with the text encoder's width D and a token the
tokenizer does not know (for SDXL: `clip_l` (n, D1) and `clip_g` (n, D2), one per text encoder, and the token given
beside the file). Nothing here loads weights into memory as objects that could run code; `torch.load` is
never used anywhere in Atelier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors

from api.errors import invalid

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "float16", "bfloat16", "float32"})
EXPONENT_BITS = {  # dtype -> (its bits as an unsigned little-endian integer, the exponent mask: all ones is NaN/Inf)
    "F16": ("<u2", 0x7C00),
    "float16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "bfloat16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "float32": ("<u4", 0x7F800000),
}
MAX_TENSORS = 4096
MAX_VECTORS = 8
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
LORA_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}  # -> subfolder
SDXL_EMBEDDING = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # an SDXL embedding's tensors -> subfolder


@dataclass(frozen=True)
class CheckedAdapter:
    """What the registry row records of a valid file."""

    tokens: list[str]
    metadata: dict[str, str]
    tensors: int


def read_header(data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor entries and `__metadata__`)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    return header


def _file_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    return header if isinstance(header, dict) else {}


def model_shapes(model_folder: Path, subfolder: str) -> dict[str, list[int]]:
    """Tensor name -> shape of a base model part, read from its safetensors headers (shards included)."""
    shapes: dict[str, list[int]] = {}
    for path in sorted((model_folder / subfolder).glob("*.safetensors")):
        for name, entry in _file_header(path).items():
            if name != "__metadata__" and isinstance(entry, dict):
                shapes[name] = list(entry.get("shape", []))
    return shapes


def parse(data: bytes, field: str = "file") -> tuple[dict[str, tuple[str, list[int]]], dict[str, str]]:
    """(name -> (dtype, shape), metadata) of a safetensors file; 422 for anything else."""
    try:
        entries = safetensors.deserialize(data)
        header = read_header(data)
    except Exception as exc:
        raise invalid(field, "not a valid safetensors file (pickled .ckpt/.bin/.pt files are not accepted)") from exc
    tensors = {str(name): (str(info["dtype"]), [int(x) for x in info["shape"]]) for name, info in entries}
    if not tensors:
        raise invalid(field, "the file holds no tensors")
    if len(tensors) > MAX_TENSORS:
        raise invalid(field, f"the file holds {len(tensors)} tensors, at most {MAX_TENSORS} are accepted")
    bad = [name for name, (dtype, _) in tensors.items() if dtype not in FLOAT_DTYPES]
    if bad:
        raise invalid(field, f"tensor {bad[0]!r} is {tensors[bad[0]][0]}, only float tensors are accepted")
    for name, info in entries:
        if not finite(str(info["dtype"]), info["data"]):
            raise invalid(field, f"tensor {name!r} holds NaN or infinite values")
    raw_metadata = header.get("__metadata__") or {}
    metadata = {str(k): str(v) for k, v in raw_metadata.items()} if isinstance(raw_metadata, dict) else {}
    return tensors, metadata


def finite(dtype: str, data: bytes | bytearray) -> bool:
    """Whether every value of a float tensor's raw bytes is finite: no value has its exponent bits all set."""
    unsigned, mask = EXPONENT_BITS[dtype]
    bits = np.frombuffer(data, dtype=unsigned)
    return not bool(np.any((bits & mask) == mask))


def check_lora(data: bytes, model_folder: Path, token: str, field: str = "file") -> CheckedAdapter:
    """A LoRA file in diffusers' layout (unet.* / text_encoder.* / SDXL's text_encoder_2.* lora_A, lora_B) that
    fits the model's layers."""
    tensors, metadata = parse(data, field)
    shapes = {prefix: model_shapes(model_folder, folder) for prefix, folder in LORA_PREFIXES.items()}
    modules: dict[tuple[str, str], dict[str, list[int]]] = {}
    for name, (_, shape) in tensors.items():
        prefix, _, rest = name.partition(".")
        suffix = next((s for s in LORA_SUFFIXES if rest.endswith(s)), None)
        if prefix not in LORA_PREFIXES or suffix is None:
            raise invalid(
                field, f"tensor {name!r} is not a LoRA weight (unet.*, text_encoder.* or text_encoder_2.* lora_A/B)"
            )
        modules.setdefault((prefix, rest[: -len(suffix)]), {})[suffix[1:7]] = shape
    for (prefix, module), pair in modules.items():
        where = f"{prefix}.{module}"
        base = shapes[prefix].get(f"{module}.weight") or shapes[prefix].get(f"text_model.{module}.weight")
        if base is None:
            raise invalid(field, f"{where}: the base model has no such layer")
        if len(base) != 2:
            raise invalid(field, f"{where}: LoRA is accepted on linear layers only, this one has shape {base}")
        if set(pair) != {"lora_A", "lora_B"}:
            raise invalid(field, f"{where}: needs both lora_A and lora_B")
        out_features, in_features = base
        a_shape, b_shape = pair["lora_A"], pair["lora_B"]
        rank = a_shape[0] if a_shape else 0
        if a_shape != [rank, in_features] or b_shape != [out_features, rank] or not 1 <= rank <= 1024:
            raise invalid(
                field,
                f"{where}: shapes A {a_shape} / B {b_shape} do not fit the layer's {base} "
                f"(expected A [r, {in_features}] and B [{out_features}, r])",
            )
    return CheckedAdapter(tokens=[token] if token else [], metadata=metadata, tensors=len(tensors))


def check_textual_inversion(data: bytes, model_folder: Path, field: str = "file", token: str = "") -> CheckedAdapter:
    """One tensor named after its token, (n, D) or (D,), D the text encoder's width, the token new to the model;
    for an SDXL model, `clip_l` and `clip_g` tensors (one per text encoder) and the `token` given beside the file."""
    tensors, metadata = parse(data, field)
    sdxl = (model_folder / "text_encoder_2").is_dir()
    if sdxl or set(tensors) == set(SDXL_EMBEDDING):
        return _check_sdxl_embedding(tensors, metadata, model_folder, sdxl, field, token)
    if len(tensors) != 1:
        raise invalid(
            field, f"a textual-inversion file holds one tensor named after its token, this one {len(tensors)}"
        )
    token, (_, shape) = next(iter(tensors.items()))
    if not token or any(c.isspace() for c in token) or len(token) > 40:
        raise invalid(field, f"the tensor name {token!r} must be the token: one word of at most 40 characters")
    _check_rows(shape, _embedding_width(model_folder, "text_encoder", field), field)
    _check_new_token(token, model_folder, field)
    return CheckedAdapter(tokens=[token], metadata=metadata, tensors=1)


def _check_sdxl_embedding(
    tensors: dict[str, tuple[str, list[int]]],
    metadata: dict[str, str],
    model_folder: Path,
    sdxl: bool,
    field: str,
    token: str,
) -> CheckedAdapter:
    """An SDXL embedding: `clip_l` (n, D1) and `clip_g` (n, D2) for an SDXL base model, its token given."""
    if not sdxl:
        raise invalid(field, "an SDXL embedding (clip_l, clip_g) needs an SDXL base model")
    if set(tensors) != set(SDXL_EMBEDDING):
        raise invalid(
            field, f"an SDXL textual-inversion file holds tensors clip_l and clip_g, this one {sorted(tensors)}"
        )
    if not token:
        raise invalid("token", "an SDXL embedding's file names no token: give it as `token`")
    rows = {_check_rows(tensors[key][1], _embedding_width(model_folder, sub, field), field) for key, sub in
            SDXL_EMBEDDING.items()}  # fmt: skip
    if len(rows) != 1:
        raise invalid(field, "clip_l and clip_g must hold the same number of vectors")
    _check_new_token(token, model_folder, field)
    return CheckedAdapter(tokens=[token], metadata=metadata, tensors=2)


def _embedding_width(model_folder: Path, subfolder: str, field: str) -> int:
    """The width D of a text encoder's token embedding (V, D), from its safetensors headers."""
    embedding = next(
        (s for name, s in model_shapes(model_folder, subfolder).items() if name.endswith("token_embedding.weight")),
        None,
    )
    if embedding is None or len(embedding) != 2:
        raise invalid(field, f"the base model's {subfolder} has no token embedding to check against")
    return embedding[1]


def _check_rows(shape: list[int], width: int, field: str) -> int:
    """An embedding's (n, D) or (D,) fits a text encoder of width D; returns n."""
    rows = shape if len(shape) == 2 else [1, *shape]
    if len(rows) != 2 or rows[1] != width or not 1 <= rows[0] <= MAX_VECTORS:
        raise invalid(
            field, f"embedding shape {shape} does not fit: expected (n, {width}) with 1 <= n <= {MAX_VECTORS}"
        )
    return rows[0]


def _check_new_token(token: str, model_folder: Path, field: str) -> None:
    vocabulary = _vocabulary(model_folder)
    if token in vocabulary or f"{token}</w>" in vocabulary:
        raise invalid(field, f"token {token!r} is already a word of the base model")


def _vocabulary(model_folder: Path) -> set[str]:
    path = model_folder / "tokenizer" / "vocab.json"
    try:
        vocabulary = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return set(vocabulary) if isinstance(vocabulary, dict) else set()
