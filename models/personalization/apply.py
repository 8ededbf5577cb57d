"""Installing a job's adapters on the shared base model for the length of the job, and taking them off after.

`applied(components, [(adapter, scale), ...])` enters each adapter type's own `apply` (from its method module) in
order, in one ExitStack, so they combine (LoRA + textual inversion, two Custom Diffusion or Perfusion concepts) and
every one is undone in reverse order even when the job fails or is canceled.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

from models.common.components import Components
from models.personalization.common import TYPE_MODULES, Adapter


def method_module(adapter_type: str) -> object:
    """The module of `models.personalization` that trains and applies this adapter type."""
    if adapter_type not in TYPE_MODULES:
        raise ValueError(f"unknown adapter type {adapter_type!r}; known: {', '.join(TYPE_MODULES)}")
    return importlib.import_module(f"models.personalization.{TYPE_MODULES[adapter_type]}")


@contextlib.contextmanager
def applied(components: Components, adapters: list[tuple[Adapter, float]]) -> Iterator[None]:
    """Install `adapters` (each at its scale) for the block; the components come out exactly as they went in."""
    with contextlib.ExitStack() as stack:
        for adapter, scale in adapters:
            module = method_module(adapter.type)
            stack.enter_context(module.apply(components, adapter, scale))  # type: ignore[attr-defined]
        yield
