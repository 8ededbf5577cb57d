"""Follow-up region edits go to the worker that holds the image's recording (store/recordings.py), through two
real Celery workers; a route to a worker that is gone falls back to the shared queue."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.shapes.world import render
from store.db import session_scope
from store.job_ends import redis_client, redis_url
from store.recordings import Holder, holder_of, is_free, job_route_key, remember
from store.settings import Settings
from store.tables import Job
from tests.conftest import start_worker, stop_process, wait_for
from tests.service.test_editing_e2e_region import SCENE, upload

pytestmark = pytest.mark.usefixtures("worker")

FOLLOW_UPS = 6


@pytest.fixture()
def second_worker(
    settings: Settings, env_settings: dict[str, str], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    if redis_url(settings.broker_url) is None:
        pytest.skip("routing rides on a Redis broker (CELERY_BROKER_URL=redis://...)")
    process = start_worker(env_settings, tmp_path / "second-worker.log")
    yield process
    stop_process(process)


def square_mask(index: int) -> np.ndarray:
    """A 16x16 white square, at another place for each index."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    y, x = divmod(index % 9, 3)
    mask[4 + 18 * y : 20 + 18 * y, 4 + 18 * x : 20 + 18 * x] = 255
    return mask


def edit(client: TestClient, auth: dict[str, str], image: str, mask: str) -> dict:  # type: ignore[type-arg]
    body = {
        "image": image,
        "mask": mask,
        "prompt": "a large blue square at the top left",
        "strength": 0.8,
        "steps": 4,
        "seed": 11,
    }
    created = client.post("/v1/edits/region-edit", json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    return job


def test_follow_up_edits_of_one_image_all_hit_with_two_workers(
    settings: Settings, second_worker: subprocess.Popen[bytes], client: TestClient, auth: dict[str, str]
) -> None:
    """Without routing, each follow-up would land on either idle worker: all six hitting would be a 1-in-64
    chance."""
    image = upload(client, auth, render(SCENE).image)
    masks = [upload(client, auth, square_mask(i)) for i in range(FOLLOW_UPS + 1)]
    first = edit(client, auth, image, masks[0])
    assert first["metrics"]["activation_cache"] == "miss" and first["metrics"]["activation_held"] == 1
    statuses = [edit(client, auth, image, mask)["metrics"]["activation_cache"] for mask in masks[1:]]
    assert statuses == ["hit"] * FOLLOW_UPS


def test_a_route_to_a_worker_that_is_gone_falls_back_to_the_shared_queue(
    settings: Settings, second_worker: subprocess.Popen[bytes], client: TestClient, auth: dict[str, str]
) -> None:
    """The holder noted for the image is a worker no one runs: the follow-up's message waits in its queue, and the
    reconciler, not finding it in the shared queues, re-sends it there; a worker runs it."""
    image = upload(client, auth, render(SCENE).image)
    first = edit(client, auth, image, upload(client, auth, square_mask(0)))
    with session_scope(settings.database_url) as session:
        key = job_route_key(session.get(Job, first["id"]))  # type: ignore[arg-type]
    redis = redis_client(settings.broker_url)
    assert key is not None and redis is not None
    ghost = Holder(node="ghost@nowhere", owner="nowhere:1:x")
    remember(redis, key, ghost)
    try:
        job = edit(client, auth, image, upload(client, auth, square_mask(1)))  # within wait_for's 120 s
        stranded = sum(redis.llen(name) for name in redis.scan_iter(match="ghost@nowhere.dq2*"))
        assert stranded == 1  # it was sent to the ghost, and ran anyway
        assert job["attempts"] == 1
        assert holder_of(redis, key) not in (None, ghost)  # the worker that ran it holds the recording now
    finally:
        for name in redis.scan_iter(match="ghost@nowhere.dq2*"):
            redis.delete(name)


def test_a_worker_running_a_job_is_not_free(settings: Settings, tenant: tuple[str, str]) -> None:
    from tests.service.test_durability import insert_job

    holder = Holder(node="busy@host", owner="host:42:ns")
    with session_scope(settings.database_url) as session:
        assert is_free(session, holder)
    insert_job(settings, tenant[0], {"prompt": "x"}, state="running", lease_owner=holder.owner)
    with session_scope(settings.database_url) as session:
        assert not is_free(session, holder)
