"""The job state machine in the database: claims, leases, attempts, guarded terminal writes."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from store.db import session_factory
from store.jobs import TenantCap, claim, finish, heartbeat, republish_due, request_cancel
from store.settings import Settings
from store.tables import Job, JobState, new_id, utcnow
from tests.conftest import make_tenant, own_database


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    """These tests drive the state machine by hand (leases of 10 ms, attempts run out), so they get a database of
    their own: the session's live worker (started by other tests) reconciles every job in its database and would
    take these over."""
    return own_database(settings, "store_jobs")


def new_job(session: Session, tenant_id: str, **values: object) -> Job:
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        kind="text-to-image",
        queue="inference",
        model="m",
        params={"prompt": "x"},
        max_attempts=3,
        **values,
    )
    session.add(job)
    session.commit()
    return job


def test_only_one_worker_claims(settings: Settings) -> None:
    tenant_id, _ = make_tenant(settings)
    with session_factory(settings.database_url)() as session:
        job = new_job(session, tenant_id)
        first = claim(session, job.id, "worker-a", 30)
        second = claim(session, job.id, "worker-b", 30)
    assert first.reason == "claimed" and first.job is not None and first.job.attempts == 1
    assert second.reason == "held"


def test_expired_lease_is_claimable_and_old_owner_cannot_finish(settings: Settings) -> None:
    tenant_id, _ = make_tenant(settings)
    with session_factory(settings.database_url)() as session:
        job = new_job(session, tenant_id)
        assert claim(session, job.id, "worker-a", 0.05).reason == "claimed"
        time.sleep(0.1)
        taken = claim(session, job.id, "worker-b", 30)
        assert taken.reason == "claimed" and taken.job is not None and taken.job.attempts == 2
        assert heartbeat(session, job.id, "worker-a", 30) is None  # lost lease
        assert not finish(session, job.id, "worker-a", JobState.succeeded)
        assert finish(session, job.id, "worker-b", JobState.succeeded, output_file_ids=["f"])
        # Terminal states never change: neither a finish nor a claim nor a cancel moves it.
        assert not finish(session, job.id, "worker-b", JobState.failed, error_code="x")
        assert claim(session, job.id, "worker-c", 30).reason == "terminal"
        refreshed = request_cancel(session, session.get(Job, job.id))  # type: ignore[arg-type]
        assert refreshed.state == JobState.succeeded and refreshed.output_file_ids == ["f"]


def test_attempts_cap_turns_into_worker_lost(settings: Settings) -> None:
    tenant_id, _ = make_tenant(settings)
    with session_factory(settings.database_url)() as session:
        job = new_job(session, tenant_id)
        for attempt in range(3):
            assert claim(session, job.id, f"w{attempt}", 0.01).reason == "claimed"
            time.sleep(0.03)
        outcome = claim(session, job.id, "w-last", 30)
        assert outcome.reason == "exhausted"
        assert outcome.job is not None and outcome.job.state == JobState.failed
        assert outcome.job.error_code == "worker_lost" and outcome.job.attempts == 3


def test_cancel_of_queued_job_is_terminal_and_never_starts(settings: Settings) -> None:
    tenant_id, _ = make_tenant(settings)
    with session_factory(settings.database_url)() as session:
        job = new_job(session, tenant_id)
        canceled = request_cancel(session, job)
        assert canceled.state == JobState.canceled
        assert claim(session, job.id, "w", 30).reason == "terminal"
        assert session.get(Job, job.id).started_at is None  # type: ignore[union-attr]


def test_heartbeat_reports_cancel_request(settings: Settings) -> None:
    tenant_id, _ = make_tenant(settings)
    with session_factory(settings.database_url)() as session:
        job = new_job(session, tenant_id)
        claim(session, job.id, "w", 30)
        assert heartbeat(session, job.id, "w", 30, step=1, total=5) is False
        request_cancel(session, session.get(Job, job.id))  # type: ignore[arg-type]
        assert heartbeat(session, job.id, "w", 30, step=2, total=5) is True
        row = session.get(Job, job.id, populate_existing=True)
        assert row is not None and row.state == JobState.running and row.progress_step == 2


def test_republish_backs_off() -> None:
    now = utcnow()
    job = Job(published_at=now - timedelta(seconds=25), publish_count=1)
    assert republish_due(job, now, 20)
    job.publish_count = 2  # waits 40 s now
    assert not republish_due(job, now, 20)
    assert republish_due(Job(published_at=None, publish_count=0), now, 20)


def test_a_tenant_at_its_running_cap_is_deferred(settings: Settings) -> None:
    """`max_running_jobs`: a worker does not claim a tenant's job while the tenant runs its cap; another
    tenant's job is claimed as usual, and so is the first job once a running one ends."""
    busy, other = make_tenant(settings)[0], make_tenant(settings)[0]
    with session_factory(settings.database_url)() as session:
        running = new_job(session, busy)
        assert claim(session, running.id, "worker-a", 30, cap=TenantCap(busy, 1)).reason == "claimed"
        waiting = new_job(session, busy)
        deferred = claim(session, waiting.id, "worker-b", 30, cap=TenantCap(busy, 1))
        assert deferred.reason == "deferred" and deferred.job is not None
        assert deferred.job.state == JobState.queued and deferred.job.attempts == 0
        assert claim(session, new_job(session, other).id, "worker-b", 30, cap=TenantCap(other, 1)).reason == "claimed"
        assert claim(session, waiting.id, "worker-b", 30, cap=TenantCap(busy, 2)).reason == "claimed"
        assert finish(session, waiting.id, "worker-b", JobState.succeeded)
        assert finish(session, running.id, "worker-a", JobState.succeeded)
        third = new_job(session, busy)
        assert claim(session, third.id, "worker-b", 30, cap=TenantCap(busy, 1)).reason == "claimed"
