"""A bounded, in-process LRU cache of recorded UNet activations, shared by the jobs of one worker process.

A sparse region edit (SIGE, `models/editing/region_edit.py`) runs, at every denoising step, a dense "record"
pass of the UNet on the original image's noised latent before the sparse pass on the edited one. That record
pass does not depend on the mask, so successive edits of one image (same model, prompt, seed, strength,
steps...) can skip it and read the activations recorded by the first. This module holds them: entries by a
key the method computes (`cache_key`), sized by their tensors' bytes, evicted least recently used first,
within a budget in bytes. An entry larger than the whole budget is not stored; a budget of 0 turns the cache
off. The tensors stay on the device they were made on (GPU memory on a GPU worker): size the budget for it.

Entries live as long as the process: a worker restart starts with an empty cache. The worker owns one
(`WorkerContext.activations`, budget `ATELIER_ACTIVATION_CACHE_BYTES`) and hands it to every job as
`inputs["activation_cache"]`, a `CacheHandle` that also names the weights the job runs with (see
docs/sparse-cache.md). One lock guards the bookkeeping; tensors in the cache are never written (a reader
copies what it will modify).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in `value`, a tensor or nested lists / tuples of tensors (other leaves count 0)."""
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(item) for item in value)
    return 0


def cache_key(*parts: str | bytes | int | float) -> str:
    """A SHA-256 hex digest of `parts` in order; each part is tagged with its type and length, so no two
    different sequences of parts give the same byte stream (e.g. ("ab", "c") and ("a", "bc"))."""
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode()
        digest.update(f"{type(part).__name__}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


class ActivationCache:
    """Recorded activations by key, least recently used evicted first, at most `budget_bytes` in all.

    budget_bytes: the most tensor bytes held at once (0: off, every `put` refused). Thread safe.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"activation cache budget must be at least 0 bytes (0 turns it off), got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def nbytes(self) -> int:
        """Tensor bytes held now (never above the budget)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Any | None:
        """The entry under `key`, now the most recently used; None when absent. Do not modify it in place."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of `nbytes` could be stored at all (it is not larger than the whole budget)."""
        return self.enabled and nbytes <= self.budget_bytes

    def put(self, key: str, value: Any) -> bool:
        """Store `value` (tensors, in lists / tuples) under `key`, evicting the least recently used entries
        until it fits. Returns False, storing nothing and evicting nothing, when it is larger than the budget."""
        size = tensor_bytes(value)
        if not self.fits(size):
            return False
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            while self._entries and self._bytes + size > self.budget_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
            self._entries[key] = (value, size)
            self._bytes += size
        return True


@dataclass(frozen=True)
class CacheHandle:
    """What a job hands a method that can reuse activations across jobs: the process's cache, and the identity
    of the weights the job runs with (base model name and the adapters installed on it), which the method
    cannot see on `Components` and which every key must include."""

    cache: ActivationCache
    weights: str
