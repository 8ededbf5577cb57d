"""The worker's job logic in-process: time limits, shared model state, outputs written once."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from sqlalchemy import func, select

from models.shapes.world import Scene, ShapeObject, render
from store.adapters import get_adapter, read_adapter_file
from store.artifacts import artifact_store
from store.db import session_factory, session_scope
from store.files import store_input
from store.settings import Settings
from store.tables import Job, StoredFile, new_id, utcnow
from tests.conftest import make_tenant
from worker.execution import WorkerContext, execute_job
from worker.runtime import DevicePolicy, ModelCache


@pytest.fixture(scope="module")
def cache(settings: Settings) -> ModelCache:
    torch.set_num_threads(1)  # as the worker does (ATELIER_TORCH_THREADS)
    return ModelCache(settings.models_dir, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))


def context(settings: Settings, cache: ModelCache, **overrides: object) -> WorkerContext:
    current = settings.model_copy(update=overrides)
    return WorkerContext(
        settings=current, sessions=session_factory(current.database_url), artifacts=artifact_store(current), cache=cache
    )


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add_job(settings: Settings, tenant_id: str, kind: str, params: dict[str, object]) -> str:
    """A queued job for this process to run. It is marked published several times just now, so the reconciler
    of the session's live worker (if another test started it) backs off (16x ATELIER_REPUBLISH_AFTER_SECONDS)
    instead of publishing it to that worker first."""
    with session_scope(settings.database_url) as session:
        job = Job(
            id=new_id("job"),
            tenant_id=tenant_id,
            kind=kind,
            queue="inference",
            model=settings.default_model,
            seed=int(str(params.get("seed", 0))),
            params={key: value for key, value in params.items() if key != "seed"},
            max_attempts=3,
            published_at=utcnow(),
            publish_count=5,
        )
        session.add(job)
        return job.id


def job_row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_soft_time_limit_fails_the_job_as_timeout(settings: Settings, cache: ModelCache) -> None:
    tenant_id, _ = make_tenant(settings)
    job_id = add_job(settings, tenant_id, "text-to-image", {"prompt": "a red circle", "steps": 200, "num_images": 8})
    ctx = context(settings, cache, job_soft_time_limit=0.5)
    cache.get(settings.default_model)
    assert execute_job(ctx, job_id) == "failed"
    job = job_row(settings, job_id)
    assert job.error_code == "timeout" and job.progress_step < 200
    assert job.output_file_ids == []


def test_a_job_leaves_the_cached_model_unchanged(settings: Settings, cache: ModelCache) -> None:
    """The same base-model job gives the same bytes before and after other jobs on the same worker."""
    tenant_id, _ = make_tenant(settings)
    ctx = context(settings, cache)
    components = cache.get(settings.default_model)
    before = {name: tensor.clone() for name, tensor in components.unet.state_dict().items()}
    processors = dict(components.unet.attn_processors)

    probe = {"prompt": "a small green hexagon at the top right", "steps": 6}
    first = add_job(settings, tenant_id, "text-to-image", probe)
    assert execute_job(ctx, first) == "succeeded"
    other = add_job(settings, tenant_id, "text-to-image", {"prompt": "a blue square", "steps": 3, "seed": 9})
    assert execute_job(ctx, other) == "succeeded"
    second = add_job(settings, tenant_id, "text-to-image", probe)
    assert execute_job(ctx, second) == "succeeded"

    with session_scope(settings.database_url) as session:
        hashes = [
            session.get(StoredFile, job_row(settings, j).output_file_ids[0]).sha256  # type: ignore[union-attr]
            for j in (first, second)
        ]
    assert hashes[0] == hashes[1]
    after = components.unet.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert dict(components.unet.attn_processors).keys() == processors.keys()
    assert all(type(components.unet.attn_processors[k]) is type(v) for k, v in processors.items())


def test_rerun_overwrites_outputs_instead_of_duplicating(settings: Settings, cache: ModelCache) -> None:
    tenant_id, _ = make_tenant(settings)
    ctx = context(settings, cache)
    job_id = add_job(settings, tenant_id, "text-to-image", {"prompt": "a red circle", "steps": 2})
    assert execute_job(ctx, job_id) == "succeeded"
    with session_scope(settings.database_url) as session:  # as if the terminal write had been lost
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.lease_owner = "queued", None
    assert execute_job(dataclasses.replace(ctx, owner="another-worker"), job_id) == "succeeded"
    with session_scope(settings.database_url) as session:
        count = session.scalar(select(func.count()).select_from(StoredFile).where(StoredFile.job_id == job_id))
    assert count == 1
    assert job_row(settings, job_id).attempts == 2


def test_class_images_are_generated_once_per_model_and_prompt(settings: Settings, cache: ModelCache) -> None:
    """DreamBooth's prior images: the first job generates them into the artifact store's shared cache, the
    next one reads them from there, and both train the same adapter (the cache changes nothing but time)."""
    tenant_id, _ = make_tenant(settings)
    ctx = context(settings, cache)
    cached = settings.artifacts_dir / "_shared" / "class-images"
    scenes = [Scene((ShapeObject("star", "yellow", "large", cell),)) for cell in ("center", "top left", "left")]
    with session_scope(settings.database_url) as session:
        ids = [
            store_input(session, ctx.artifacts, tenant_id, png(render(s).image), "image/png", (64, 64), "upload").id
            for s in scenes
        ]
    params = {
        "images": ids,
        "token": "<cached1>",
        "class_word": "hexagon",
        "class_prompt": "a small green hexagon at the bottom left",  # a prompt no other test uses
        "steps": 2,
        "num_class_images": 2,
        "class_steps": 3,
    }
    before = set(cached.glob("*/*.png")) if cached.is_dir() else set()
    first = add_job(settings, tenant_id, "dreambooth", params)
    assert execute_job(ctx, first) == "succeeded"
    generated = set(cached.glob("*/*.png")) - before
    assert len(generated) == 2  # one folder, one PNG per class image
    second = add_job(settings, tenant_id, "dreambooth", params)
    assert execute_job(ctx, second) == "succeeded"
    assert set(cached.glob("*/*.png")) - before == generated  # read back, not generated again

    tensors = []
    with session_scope(settings.database_url) as session:
        for job_id in (first, second):
            row = get_adapter(session, tenant_id, str(job_row(settings, job_id).result["adapter_id"]))  # type: ignore[index]
            assert row is not None
            tensors.append(load_safetensors(read_adapter_file(ctx.artifacts, row)))
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][key], tensors[1][key]) for key in tensors[0])


def test_an_artifact_store_failure_fails_the_job_as_storage_unavailable_without_a_path(
    settings: Settings, cache: ModelCache, tmp_path: Path
) -> None:
    """The output write fails (a file stands where the store's folder should be): the job fails with code
    storage_unavailable, saying which operation failed and showing no server path."""
    tenant_id, _ = make_tenant(settings)
    job_id = add_job(settings, tenant_id, "text-to-image", {"prompt": "a red circle", "steps": 1})
    store = tmp_path / "store"
    store.mkdir()
    (store / tenant_id).write_text("a file where the tenant's folder goes")
    assert execute_job(context(settings, cache, artifacts_dir=store), job_id) == "failed"
    job = job_row(settings, job_id)
    assert job.error_code == "storage_unavailable", (job.error_code, job.error_message)
    assert str(tmp_path) not in (job.error_message or "") and "write" in (job.error_message or "")
