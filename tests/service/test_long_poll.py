"""`GET /v1/jobs/{id}?wait=...`: a long poll that answers when the job ends, woken by the worker's announcement on
Redis (store/job_ends.py), through a real Celery worker."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

import api.routes.jobs
from store.job_ends import JobEnds, announce_end, redis_url
from store.settings import Settings
from tests.conftest import make_tenant
from tests.service.test_durability import insert_job


def needs_redis(settings: Settings) -> str:
    url = redis_url(settings.broker_url)
    if url is None:
        pytest.skip("the job-end channel rides on a Redis broker (CELERY_BROKER_URL=redis://...)")
    return url


def test_an_announced_end_wakes_the_waiters_of_that_job_only(settings: Settings) -> None:
    url = needs_redis(settings)

    async def scenario() -> tuple[bool, bool, float]:
        ends = JobEnds(url)
        try:
            async with ends.watching("job_a") as a, ends.watching("job_b") as b:
                started = time.perf_counter()
                while not a.is_set() and time.perf_counter() - started < 10:  # until the subscription is up
                    announce_end(url, "job_a")
                    await asyncio.sleep(0.05)
                woke_after = time.perf_counter() - started
                await asyncio.sleep(0.2)
                return a.is_set(), b.is_set(), woke_after
        finally:
            await ends.close()

    a_set, b_set, woke_after = asyncio.run(scenario())
    assert a_set and woke_after < 10
    assert not b_set


def test_wait_answers_when_the_job_ends(
    settings: Settings, worker: object, client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_redis(settings)
    monkeypatch.setattr(api.routes.jobs, "RECHECK_SECONDS", 60.0)  # only the worker's announcement can wake it
    created = client.post("/v1/generations/text-to-image", json={"prompt": "a red circle", "steps": 8}, headers=auth)
    assert created.status_code == 201, created.text
    response = client.get(f"/v1/jobs/{created.json()['id']}", params={"wait": 30}, headers=auth)
    answered = datetime.now(UTC)
    job = response.json()
    assert response.status_code == 200 and job["state"] == "succeeded", job
    late = answered - datetime.fromisoformat(job["finished_at"])
    assert late < timedelta(seconds=3), late  # woken by the announcement, not after the 30 s


def test_wait_gives_the_job_as_it_is_when_the_time_is_up(
    settings: Settings, client: TestClient, auth: dict[str, str], tenant: tuple[str, str]
) -> None:
    lease = datetime.now(UTC) + timedelta(hours=1)  # a running job no one will touch for the test's length
    job_id = insert_job(settings, tenant[0], {"prompt": "a red circle"}, state="running", lease_expires_at=lease)
    started = time.perf_counter()
    response = client.get(f"/v1/jobs/{job_id}", params={"wait": 1.2}, headers=auth)
    took = time.perf_counter() - started
    assert response.status_code == 200 and response.json()["state"] == "running"
    assert 1.2 <= took < 5, took


@pytest.mark.parametrize("wait", ["-1", "30.5", "soon"])
def test_a_bad_wait_is_a_422(
    client: TestClient, auth: dict[str, str], tenant: tuple[str, str], settings: Settings, wait: str
) -> None:
    job_id = insert_job(settings, tenant[0], {"prompt": "a red circle"}, state="succeeded")
    response = client.get(f"/v1/jobs/{job_id}", params={"wait": wait}, headers=auth)
    assert response.status_code == 422, response.text
    assert "wait" in response.text


def test_wait_keeps_the_routes_answers_for_bad_keys_and_other_tenants(
    settings: Settings, client: TestClient, auth: dict[str, str]
) -> None:
    other_tenant, _ = make_tenant(settings)
    job_id = insert_job(settings, other_tenant, {"prompt": "a red circle"}, state="succeeded")
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 1}, headers=auth).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 1}).status_code == 401
    bad = {"Authorization": "Bearer atl_not_a_key"}
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 1}, headers=bad).status_code == 401
