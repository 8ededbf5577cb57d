"""The worker's memory settings on real jobs (issue 12, worker/memory.py).

- After a training job the worker keeps nothing the trainer made: the trained copy and the optimizer are gone when
  `execute_job` returns, whether the job succeeded, ran out of time or failed on an error that was logged (a log
  handler that keeps records, as a buffer or an error reporter does, must not keep the job's tensors).
- With CPU offload the worker installs the hooks for each inference job and removes them after, and a training job
  runs with the model moved whole; checked here with the CPU as the offload target (the same device), where the
  outputs must not change.
"""

from __future__ import annotations

import copy
import gc
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from models.generation import text_to_image
from models.personalization import dreambooth
from models.shapes.world import Scene, ShapeObject, render
from store.artifacts import artifact_store
from store.db import session_scope
from store.files import store_input
from store.settings import Settings
from store.tables import Job, StoredFile
from tests.conftest import make_tenant
from tests.service.test_execution import add_job, cache, context, png  # noqa: F401 (cache: the module's fixture)
from worker.execution import execute_job
from worker.memory import offload_order
from worker.runtime import DevicePolicy, ModelCache


class KeepingHandler(logging.Handler):
    """Keeps every record, with its exception's traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def made(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[weakref.ref[Any]]]:
    """Weak references to every optimizer and module copy made while the test runs. The cyclic garbage collector is
    off meanwhile (so only what the worker itself frees is gone), and the worker's log keeps its records."""
    refs: list[weakref.ref[Any]] = []
    optimizer_init = torch.optim.Optimizer.__init__
    deepcopy = copy.deepcopy

    def init(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        optimizer_init(self, *args, **kwargs)
        refs.append(weakref.ref(self))

    def recording_deepcopy(value: Any, memo: Any = None, _nil: Any = ()) -> Any:
        copied = deepcopy(value, memo)
        if isinstance(copied, torch.nn.Module):
            refs.append(weakref.ref(copied))
        return copied

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", init)
    monkeypatch.setattr(copy, "deepcopy", recording_deepcopy)
    handler = KeepingHandler()
    logger = logging.getLogger("atelier.worker")
    logger.addHandler(handler)
    gc.collect()
    gc.disable()
    try:
        yield refs
    finally:
        gc.enable()
        logger.removeHandler(handler)


def dreambooth_job(settings: Settings, token: str, **extra: object) -> tuple[str, str]:
    tenant_id, _ = make_tenant(settings)
    scenes = [Scene((ShapeObject("star", "yellow", "large", cell),)) for cell in ("center", "left")]
    artifacts = artifact_store(settings)
    with session_scope(settings.database_url) as session:
        ids = [
            store_input(session, artifacts, tenant_id, png(render(s).image), "image/png", (64, 64), "upload").id
            for s in scenes
        ]
    params = {"images": ids, "token": token, "class_word": "star", "steps": 2, "num_class_images": 1, "class_steps": 2}
    params.update(extra)
    return tenant_id, add_job(settings, tenant_id, "dreambooth", params)


@pytest.mark.parametrize("ending", ["succeeded", "timeout", "internal_error"])
def test_nothing_a_training_job_made_survives_it(
    settings: Settings,
    cache: ModelCache,  # noqa: F811
    made: list[weakref.ref[Any]],
    monkeypatch: pytest.MonkeyPatch,
    ending: str,
) -> None:
    ctx = context(settings, cache, job_soft_time_limit=0.0 if ending == "timeout" else 1800.0)
    if ending == "internal_error":  # fails inside the training loop, with the copy and optimizer made
        train = dreambooth.train_parameters

        def failing(*args: Any, **kwargs: Any) -> Any:
            def callback(step: int, total: int) -> None:
                raise RuntimeError("a fault in the middle of training")

            return train(*args, **{**kwargs, "callback": callback})

        monkeypatch.setattr(dreambooth, "train_parameters", failing)
    _, job_id = dreambooth_job(settings, f"<mem-{ending}>")
    assert execute_job(ctx, job_id) == ("succeeded" if ending == "succeeded" else "failed")
    assert len(made) >= 2  # the UNet copy and its optimizer were made
    assert [type(ref()).__name__ for ref in made if ref() is not None] == []


def test_an_offloading_worker_hooks_each_inference_job_and_unhooks_it_after(
    settings: Settings,
    cache: ModelCache,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant_id, _ = make_tenant(settings)
    params = {"prompt": "a red circle", "steps": 3, "seed": 4}
    plain = add_job(settings, tenant_id, "text-to-image", params)
    assert execute_job(context(settings, cache), plain) == "succeeded"

    offloading = ModelCache(
        settings.models_dir, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa", cpu_offload=True)
    )
    seen: list[bool] = []
    run = text_to_image.run

    def observed(components: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(all(hasattr(module, "_hf_hook") for module in offload_order(components)))
        return run(components, *args, **kwargs)

    monkeypatch.setattr(text_to_image, "run", observed)
    offloaded = add_job(settings, tenant_id, "text-to-image", params)
    assert execute_job(context(settings, offloading), offloaded) == "succeeded"
    assert seen == [True]
    components = offloading.get(settings.default_model)
    assert not any(hasattr(module, "_hf_hook") for module in offload_order(components))
    outputs = [output_bytes(settings, job_id) for job_id in (plain, offloaded)]
    assert outputs[0] == outputs[1]


def test_an_offloading_worker_runs_a_training_job_with_its_class_images(
    settings: Settings,
    made: list[weakref.ref[Any]],
) -> None:
    offloading = ModelCache(
        settings.models_dir, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa", cpu_offload=True)
    )
    # a class prompt no other test uses: its class images are generated in this job, under the offload hooks
    _, job_id = dreambooth_job(settings, "<mem-offload>", class_prompt="a small star at the top right")
    assert execute_job(context(settings, offloading), job_id) == "succeeded"
    components = offloading.get(settings.default_model)
    assert not any(hasattr(module, "_hf_hook") for module in offload_order(components))
    assert [type(ref()).__name__ for ref in made if ref() is not None] == []


def output_bytes(settings: Settings, job_id: str) -> bytes:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.output_file_ids
        row = session.get(StoredFile, job.output_file_ids[0])
        assert row is not None
        return artifact_store(settings).get(row.key)
