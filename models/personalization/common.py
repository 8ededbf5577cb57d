"""What every personalization method shares: the adapter it produces and the checkpoint store it trains against.

An `Adapter` is the content of one `adapter.safetensors` file: CPU tensors plus the safetensors header metadata
(all strings). The worker turns it into a row of the adapter registry and back; methods never see files or paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from contract.adapters import ADAPTER_TYPES

TYPE_MODULES = {
    "lora": "lora",
    "textual-inversion": "textual_inversion",
    "dreambooth": "dreambooth",
    "custom-diffusion": "custom_diffusion",
    "perfusion": "perfusion",
}
"""Adapter type -> module name in models/personalization/ (which exposes `Params`, `run` and `apply`)."""


@dataclass
class Adapter:
    """A trained (or imported) concept: its tensors and its header metadata."""

    type: str  # "lora" | "textual-inversion" | "dreambooth" | "custom-diffusion" | "perfusion"
    tensors: dict[str, torch.Tensor]  # the content of adapter.safetensors (CPU tensors)
    metadata: dict[str, str] = field(default_factory=dict)
    # metadata: "type", "tokens" (JSON list), "class_word", "base_model" (added by the worker), method options as str

    @property
    def tokens(self) -> list[str]:
        """The new tokens this adapter adds to the prompt vocabulary (may be empty, e.g. for a plain LoRA)."""
        raw = self.metadata.get("tokens", "[]")
        value = json.loads(raw)
        if not isinstance(value, list) or not all(isinstance(token, str) for token in value):
            raise ValueError(f"adapter metadata 'tokens' must be a JSON list of strings, got {raw!r}")
        return list(value)

    def to_bytes(self) -> bytes:
        """The adapter as one safetensors file (tensors made contiguous on the CPU; metadata includes the type)."""
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in self.tensors.items()}
        return save_safetensors(tensors, metadata={**self.metadata, "type": self.type})

    @classmethod
    def from_bytes(cls, data: bytes) -> Adapter:
        """Parse a safetensors file written by `to_bytes` (never pickle; safetensors cannot run code)."""
        tensors = load_safetensors(data)
        metadata = read_metadata(data)
        adapter_type = metadata.get("type", "")
        if adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter type must be one of {ADAPTER_TYPES}, got {adapter_type!r}")
        return cls(type=adapter_type, tensors=tensors, metadata=metadata)


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's JSON header ({} when absent)."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise ValueError("not a safetensors file: header length out of range")
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(key): str(value) for key, value in metadata.items()}


def tokens_metadata(tokens: list[str]) -> str:
    """The "tokens" metadata value for a list of tokens."""
    return json.dumps(list(tokens))


class Checkpoints(Protocol):
    """Where a training run keeps its last checkpoint (the worker backs it by the artifact store)."""

    def load(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(step, state) of the last checkpoint, or None."""
        ...

    def save(self, step: int, state: dict[str, torch.Tensor]) -> None:
        """Replace the last checkpoint with this one (state: CPU tensors)."""
        ...


class MemoryCheckpoints:
    """An in-memory `Checkpoints` for tests and the bench (keeps only the last one, as the worker's does)."""

    def __init__(self) -> None:
        self.last: tuple[int, dict[str, torch.Tensor]] | None = None
        self.saves = 0

    def load(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        if self.last is None:
            return None
        step, state = self.last
        return step, {name: tensor.clone() for name, tensor in state.items()}

    def save(self, step: int, state: dict[str, torch.Tensor]) -> None:
        self.last = (step, {name: tensor.detach().to("cpu").clone() for name, tensor in state.items()})
        self.saves += 1
