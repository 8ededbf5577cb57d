"""Adapter types: the closed set the API, the registry and the model code all name."""

from __future__ import annotations

from typing import Literal, get_args

AdapterType = Literal["lora", "textual-inversion", "dreambooth", "custom-diffusion", "perfusion"]
ADAPTER_TYPES: tuple[AdapterType, ...] = get_args(AdapterType)

ImportableAdapterType = Literal["lora", "textual-inversion"]
"""The types `POST /v1/adapters` accepts as files (the others come from training jobs only)."""
