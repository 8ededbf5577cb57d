"""A tenant at its cap on running jobs waits; its job runs once one of its running jobs ends (real worker)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from store.db import session_scope
from store.settings import Settings
from store.tables import Job, JobState, Tenant, utcnow
from tests.conftest import wait_for
from tests.service.test_durability import insert_job

pytestmark = pytest.mark.usefixtures("worker")


def test_a_tenant_at_its_running_cap_waits_for_its_own_running_job(
    client: TestClient, settings: Settings, worker_log: Path, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    tenant_id = tenant[0]
    with session_scope(settings.database_url) as session:
        session.get(Tenant, tenant_id).limits = {"max_running_jobs": 1}  # type: ignore[union-attr]
    # One of its jobs runs on a worker elsewhere (another host: alive, as far as this one can tell).
    lease = {"state": "running", "lease_owner": "elsewhere:1:0", "lease_expires_at": utcnow() + timedelta(minutes=5)}
    running = insert_job(settings, tenant_id, {"prompt": "x", "steps": 1}, attempts=1, **lease)

    job_id = client.post("/v1/generations/text-to-image", json={"prompt": "a red circle", "steps": 2}, headers=auth)
    job_id = job_id.json()["id"]
    deadline = time.monotonic() + 30
    while f"job {job_id} not run: deferred" not in worker_log.read_text():
        assert time.monotonic() < deadline, "the worker never looked at the job"
        time.sleep(0.2)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth).json()["state"] == "queued"

    with session_scope(settings.database_url) as session:  # the other job ends
        row = session.get(Job, running)
        assert row is not None
        row.state, row.finished_at = JobState.succeeded, utcnow()
    job = wait_for(client, job_id, auth, timeout=60)
    assert job["state"] == "succeeded" and job["attempts"] == 1, job
