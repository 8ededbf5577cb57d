"""The reconciler re-sends a job's message only on evidence that the broker lost it, one reconciler at a time.

The defect (issue 14): with no fault at all, 150 jobs got 196 extra messages, because any job queued longer than
15 s counted as lost and every worker's reconciler re-sent the same rows. These tests run against a database and
a Redis database of their own, where no worker consumes, so the queue stays as long as the test makes it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy.orm import Session

from store.db import engine_for, session_factory
from store.jobs import claim, reconciler_lock
from store.settings import Settings
from store.tables import Job, JobState, utcnow
from tests.conftest import make_tenant, own_database
from tests.service.test_store_jobs import new_job
from worker.broker_state import BrokerSnapshot, run_message_job, snapshot
from worker.celery_app import URGENT_PRIORITY, make_celery, publish_job
from worker.owners import current_owner, owner_is_dead
from worker.reconciler import reconcile_once

QUIET_REDIS_DB = 14
"""A Redis database of the test server that no worker reads."""


@pytest.fixture(scope="module")
def settings(settings: Settings) -> Settings:
    own = own_database(settings, "reconciler")
    updates: dict[str, Any] = {"republish_grace_seconds": 0.0, "republish_after_seconds": 2.0}
    if settings.broker_url.startswith("redis"):
        base = settings.broker_url.rsplit("/", 1)[0]
        updates["broker_url"] = f"{base}/{QUIET_REDIS_DB}"
    return own.model_copy(update=updates)


@pytest.fixture()
def quiet_redis(settings: Settings) -> Iterator[redis.Redis]:
    """The test's own Redis database, emptied before and after (skips without a Redis broker)."""
    if not settings.broker_url.startswith("redis"):
        pytest.skip("needs the Redis broker (CI runs it)")
    client = redis.Redis.from_url(settings.broker_url)
    client.flushdb()
    yield client
    client.flushdb()


def queued_jobs(settings: Settings, count: int, published_ago: float, **values: Any) -> list[str]:
    """`count` committed queued jobs, published (as far as the database knows) `published_ago` seconds ago."""
    tenant_id, _ = make_tenant(settings)
    published = {"published_at": utcnow() - timedelta(seconds=published_ago), "publish_count": 1}
    with session_factory(settings.database_url)() as session:
        return [new_job(session, tenant_id, **published, **values).id for _ in range(count)]


def publish_counts(settings: Settings, ids: list[str]) -> list[int]:
    with session_factory(settings.database_url)() as session:
        return [session.get(Job, job_id).publish_count for job_id in ids]  # type: ignore[union-attr]


def queue_keys(celery: Celery, queue: str = "inference") -> list[str]:
    """The Redis lists of `queue`, one per priority step (kombu's layout)."""
    with celery.connection_for_read() as connection:
        channel: Any = connection.default_channel
        return [channel._q_for_pri(queue, priority) for priority in channel.priority_steps]


def in_queue(client: redis.Redis, celery: Celery) -> Counter[str]:
    raws = [raw for key in queue_keys(celery) for raw in client.lrange(key, 0, -1)]
    return Counter(run_message_job(raw) or "" for raw in raws)


def reconcile_from(settings: Settings, celery: Celery, workers: int = 3) -> list[dict[str, int]]:
    """One pass from each of `workers` reconcilers at once, as several workers' threads would run them."""
    sessions = session_factory(settings.database_url)
    results: list[dict[str, int]] = []
    threads = [
        threading.Thread(target=lambda: results.append(reconcile_once(sessions, celery, settings)))
        for _ in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_long_queue_is_left_alone_and_a_lost_message_is_sent_again_once(
    settings: Settings, quiet_redis: redis.Redis
) -> None:
    celery = make_celery(settings)
    ids = queued_jobs(settings, 30, published_ago=120)  # far past every time-based rule
    for job_id in ids:
        publish_job(celery, job_id, "inference")

    for _ in range(3):
        results = reconcile_from(settings, celery)
        assert sum(r.get("republished", 0) for r in results) == 0, results
    assert in_queue(quiet_redis, celery) == Counter(ids)  # no extra message
    assert publish_counts(settings, ids) == [1] * 30

    lost = ids[::3]  # the broker loses ten messages
    for key in queue_keys(celery):
        for raw in quiet_redis.lrange(key, 0, -1):
            if run_message_job(raw) in lost:
                quiet_redis.lrem(key, 1, raw)
    results = reconcile_from(settings, celery) + reconcile_from(settings, celery)
    assert sum(r.get("republished", 0) for r in results) == len(lost), results
    assert in_queue(quiet_redis, celery) == Counter(ids)  # each lost one re-sent exactly once
    assert publish_counts(settings, ids) == [2 if job_id in lost else 1 for job_id in ids]


def test_the_broker_snapshot_sees_queued_and_taken_messages(settings: Settings, quiet_redis: redis.Redis) -> None:
    celery = make_celery(settings)
    publish_job(celery, "job_waiting", "inference")
    publish_job(celery, "job_training", "training")
    (key,) = [key for key in queue_keys(celery) if quiet_redis.llen(key)]
    raw = quiet_redis.rpop(key)  # what a worker does on delivery: the message moves to `unacked`
    quiet_redis.hset("unacked", "tag", f'[{raw.decode()}, "", "inference"]')  # type: ignore[union-attr]
    publish_job(celery, "job_waiting_2", "inference")
    seen = snapshot(celery, ("inference", "training"))
    assert seen == BrokerSnapshot(frozenset({"job_waiting_2", "job_training"}), frozenset({"job_waiting"}))


def test_a_taken_message_waits_for_the_time_based_rule(settings: Settings) -> None:
    """A worker took the message but has not started the job: it may be about to; re-send only after the wait."""
    celery = make_celery(settings.model_copy(update={"broker_url": "filesystem://"}))
    sent: list[str] = []
    recent, old = queued_jobs(settings, 1, published_ago=0.5), queued_jobs(settings, 1, published_ago=30)
    seen = BrokerSnapshot(frozenset(), frozenset(recent + old))
    sessions = session_factory(settings.database_url)
    celery.send_task = lambda name, args, **_: sent.append(args[0])  # type: ignore[method-assign]
    counts = reconcile_once(sessions, celery, settings, inspect=lambda *_: seen)
    assert old[0] in sent and recent[0] not in sent, (counts, sent)


def test_without_broker_evidence_the_time_based_rule_applies(settings: Settings) -> None:
    """The filesystem broker cannot be read: a job is re-sent after `republish_after_seconds`, not before."""
    celery = make_celery(settings.model_copy(update={"broker_url": "filesystem://"}))
    sent: list[str] = []
    celery.send_task = lambda name, args, **_: sent.append(args[0])  # type: ignore[method-assign]
    fresh, stale = queued_jobs(settings, 1, published_ago=1), queued_jobs(settings, 1, published_ago=30)
    reconcile_once(session_factory(settings.database_url), celery, settings, inspect=lambda *_: None)
    assert stale[0] in sent and fresh[0] not in sent


def test_only_one_reconciler_acts_at_a_time(settings: Settings) -> None:
    celery = make_celery(settings.model_copy(update={"broker_url": "filesystem://"}))
    sessions = session_factory(settings.database_url)
    engine = engine_for(settings.database_url)
    with reconciler_lock(engine) as mine:
        assert mine
        assert reconcile_once(sessions, celery, settings, inspect=lambda *_: None) == {"busy": 1}
    assert "busy" not in reconcile_once(sessions, celery, settings, inspect=lambda *_: None)


def test_a_job_whose_lease_expired_gets_one_urgent_copy_whatever_the_broker_holds(settings: Settings) -> None:
    """An expired lease is the evidence that its worker is gone. A message the broker still holds does not help
    in time: Celery re-queues a killed process's message at the end of the queue, and a copy sent before the
    expiry may have reached a worker on another host while the lease still held ("held", and dropped). One
    urgent copy goes after the expiry, not one a pass."""
    celery = make_celery(settings.model_copy(update={"broker_url": "filesystem://"}))
    sent: list[str] = []
    celery.send_task = lambda name, args, **_: sent.append(args[0])  # type: ignore[method-assign]
    expired = {"state": JobState.running, "lease_owner": "other-host:1:ns", "attempts": 1}
    expired |= {"lease_expires_at": utcnow() - timedelta(seconds=0.5), "started_at": utcnow() - timedelta(seconds=9)}
    requeued = queued_jobs(settings, 1, published_ago=1, **expired)  # at the end of the queue
    spent = queued_jobs(settings, 1, published_ago=1, **expired)  # its copy was dropped as "held"
    seen = BrokerSnapshot(frozenset(requeued), frozenset())
    sessions = session_factory(settings.database_url)
    reconcile_once(sessions, celery, settings, inspect=lambda *_: seen)
    assert requeued[0] in sent and spent[0] in sent
    reconcile_once(sessions, celery, settings, inspect=lambda *_: seen)
    assert sent.count(requeued[0]) == 1 and sent.count(spent[0]) == 1


def _owner_of(pid: int) -> str:
    return current_owner().rsplit(":", 2)[0] + f":{pid}:" + current_owner().rsplit(":", 1)[1]


def test_a_dead_worker_on_this_host_is_known_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not owner_is_dead(_owner_of(child.pid))
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # killed, not reaped: a zombie
        assert owner_is_dead(_owner_of(child.pid))
    finally:
        child.wait()
    assert owner_is_dead(_owner_of(child.pid))
    assert not owner_is_dead(current_owner())
    assert not owner_is_dead(f"another-host:{child.pid}:{current_owner().rsplit(':', 1)[1]}")
    assert not owner_is_dead(f"{socket.gethostname()}:{child.pid}")  # the old name, without a namespace
    assert not owner_is_dead(f"{socket.gethostname()}:{child.pid}:4026531999")  # another pid namespace
    assert not owner_is_dead(None)


def test_a_job_held_by_a_dead_owner_is_taken_over(settings: Settings) -> None:
    lease = {"state": JobState.running, "lease_owner": "w:1:ns", "lease_expires_at": utcnow() + timedelta(minutes=5)}
    (job_id,) = queued_jobs(settings, 1, published_ago=0, attempts=1, **lease)
    with Session(engine_for(settings.database_url)) as session:
        assert claim(session, job_id, "w:2:ns", 30).reason == "held"
        assert claim(session, job_id, "w:2:ns", 30, dead_owner="w:3:ns").reason == "held"  # not its owner
        taken = claim(session, job_id, "w:2:ns", 30, dead_owner="w:1:ns")
    assert taken.reason == "claimed" and taken.job is not None
    assert taken.job.attempts == 2 and taken.job.lease_owner == "w:2:ns"


def test_a_job_whose_worker_died_on_this_host_is_resent_at_once_ahead_of_the_queue(settings: Settings) -> None:
    """Its lease has minutes to run, but its owner is a dead process here: the reconciler re-sends it now, at the
    urgent priority, so it does not wait behind the backlog."""
    celery = make_celery(settings.model_copy(update={"broker_url": "filesystem://"}))
    sent: list[tuple[str, int]] = []
    celery.send_task = lambda name, args, **kw: sent.append((args[0], kw["priority"]))  # type: ignore[method-assign]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    live = {"state": JobState.running, "lease_expires_at": utcnow() + timedelta(minutes=5), "attempts": 1}
    live["started_at"] = utcnow()  # claimed after its one message was sent
    (dead_job,) = queued_jobs(settings, 1, published_ago=1, lease_owner=_owner_of(child.pid), **live)
    (live_job,) = queued_jobs(settings, 1, published_ago=1, lease_owner=current_owner(), **live)
    sessions = session_factory(settings.database_url)
    with reconciler_lock(engine_for(settings.database_url)):  # another host's reconciler holds the global lock
        assert reconcile_once(sessions, celery, settings, inspect=lambda *_: None) == {"busy": 1, "republished": 1}
    assert (dead_job, URGENT_PRIORITY) in sent and live_job not in [job for job, _ in sent]
    reconcile_once(sessions, celery, settings, inspect=lambda *_: None)  # one urgent copy, not one a pass
    assert [job for job, _ in sent].count(dead_job) == 1
