"""The worker's model cache (worker/runtime.py): a memory budget with LRU eviction, one lock per model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import worker.runtime
from worker.runtime import DevicePolicy, ModelCache, model_bytes

ZOO = Path(__file__).resolve().parents[2] / "zoo"
CPU = DevicePolicy(torch.device("cpu"), torch.float32, "sdpa")
BASES = ("shapes-sd-tiny", "shapes-ip2p-tiny")


def sizes() -> dict[str, int]:
    probe = ModelCache(ZOO, CPU)
    return {name: model_bytes(probe.get(name)) for name in BASES}


def test_the_least_recently_used_model_is_dropped_to_stay_within_the_budget() -> None:
    size = sizes()
    cache = ModelCache(ZOO, CPU, budget_bytes=max(size.values()) + min(size.values()) // 2)  # room for one
    first = cache.get(BASES[0])
    assert cache.get(BASES[0]) is first and cache.loads == 1  # kept: the same object, no second load
    cache.get(BASES[1])
    assert cache.names() == [BASES[1]] and cache.evictions == 1
    assert cache.nbytes == size[BASES[1]] <= cache.budget_bytes
    assert cache.get(BASES[0]) is not first and cache.loads == 3  # loaded again after it was dropped
    assert cache.nbytes <= cache.budget_bytes


def test_lru_order_follows_use_and_no_budget_keeps_everything() -> None:
    size = sizes()
    control = "shapes-controlnet-canny"
    roomy = ModelCache(ZOO, CPU)
    roomy.get(BASES[0])
    roomy.control(control)
    roomy.get(BASES[1])
    assert set(roomy.names()) == {BASES[0], control, BASES[1]} and roomy.evictions == 0
    canny = model_bytes(roomy.control(control))
    # Room for both bases and not the ControlNet too: using the first base again makes the ControlNet the oldest.
    cache = ModelCache(ZOO, CPU, budget_bytes=sum(size.values()) + canny // 2)
    cache.get(BASES[0])
    cache.control(control)
    cache.get(BASES[0])
    cache.get(BASES[1])
    assert cache.names() == [BASES[0], BASES[1]]


def test_a_model_larger_than_the_budget_still_loads_alone() -> None:
    cache = ModelCache(ZOO, CPU, budget_bytes=1024)
    cache.get(BASES[0])
    components = cache.get(BASES[1])
    assert cache.names() == [BASES[1]] and components.unet is not None


def test_a_slow_load_holds_up_only_its_own_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """One lock per model: a job on another model goes ahead; two jobs on the slow model load it once."""
    load = worker.runtime.load_components
    release = threading.Event()

    def slow_for_the_first(folder: Path, *args: object, **kwargs: object) -> object:
        if folder.name == BASES[0]:
            release.wait(20)
        return load(folder, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker.runtime, "load_components", slow_for_the_first)
    cache = ModelCache(ZOO, CPU)
    results: dict[str, object] = {}
    waiting = [threading.Thread(target=lambda i=i: results.setdefault(f"slow{i}", cache.get(BASES[0]))) for i in (0, 1)]
    for thread in waiting:
        thread.start()
    time.sleep(0.2)
    started = time.perf_counter()
    cache.get(BASES[1])  # not behind the slow load
    assert time.perf_counter() - started < 15 and not release.is_set()
    release.set()
    for thread in waiting:
        thread.join(30)
    assert results["slow0"] is results["slow1"] and cache.loads == 2


def test_a_negative_budget_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="model cache budget must be at least 0"):
        ModelCache(ZOO, CPU, budget_bytes=-1)
