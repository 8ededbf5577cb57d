"""Re-publish what the broker lost: the database says which jobs should be moving, the broker which are.

One reconciler acts at a time across all workers (`store.jobs.reconciler_lock`); the jobs of this host's
dead processes are re-sent under a lock of the host's own, so they never wait for another host's reconciler.
A queued job is re-published only on evidence that its message is gone: the Redis broker holds it neither in
a queue nor taken by a worker (`worker.broker_state`), checked twice, a moment apart, so a message in flight
between the two is not mistaken for a lost one. A long queue is not evidence. Where the broker cannot be read
(filesystem), or a worker took the message but has not started the job, the time-based rule
(`store.jobs.republish_due`) applies. A running job whose lease expired lost its worker: it gets one urgent
copy (then the time-based rule), or fails as `worker_lost` once its attempts are spent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from store.jobs import (
    give_up,
    mark_published,
    reconciler_lock,
    republish_due,
    running_on_host,
    stale_jobs,
)
from store.settings import Settings
from store.tables import Job, JobState, utcnow
from worker.broker_state import BrokerSnapshot, snapshot
from worker.celery_app import QUEUES, URGENT_PRIORITY, publish_job, publish_webhook
from worker.owners import host_prefix, owner_is_dead

log = logging.getLogger("atelier.reconciler")

Inspect = Callable[[Celery, Iterable[str]], BrokerSnapshot | None]
CONFIRM_DELAY = 0.5
"""Seconds between the two broker reads that must both miss a message before its job counts as lost."""


def reconcile_once(
    sessions: sessionmaker[Session], celery: Celery, settings: Settings, inspect: Inspect = snapshot
) -> dict[str, int]:
    """One pass, if no other reconciler is in one; returns counts of what it did (`busy`: another one was)."""
    engine = sessions.kw["bind"]
    assert isinstance(engine, Engine)
    with reconciler_lock(engine) as mine:
        counts = _pass(sessions, celery, settings, inspect) if mine else {"busy": 1}
    # This host's dead processes are known only here: their jobs must not wait for the global lock's holder.
    with reconciler_lock(engine, scope=host_prefix()) as mine_here:
        if mine_here:
            with sessions() as session:
                orphans = _publish(session, celery, _orphaned_here(session, utcnow(), settings))
            if orphans:
                counts["republished"] = counts.get("republished", 0) + orphans
    if any(value for key, value in counts.items() if key != "busy"):
        log.info("reconciler: %s", counts)
    return counts


def _pass(sessions: sessionmaker[Session], celery: Celery, settings: Settings, inspect: Inspect) -> dict[str, int]:
    now = utcnow()
    counts = {"republished": 0, "gave_up": 0, "in_broker": 0}
    with sessions() as session:
        candidates = stale_jobs(session, now - timedelta(seconds=settings.republish_grace_seconds))
        try:
            seen = inspect(celery, QUEUES) if candidates else None
        except Exception:
            log.warning("broker unreachable; will retry", exc_info=True)
            return counts
        due: list[Job] = []
        missing: list[Job] = []
        for job in candidates:
            if job.state == JobState.running:  # on an expired lease: its worker is gone
                if job.attempts >= job.max_attempts:
                    if give_up(session, job.id, "worker_lost", f"the job ended its worker {job.attempts} times"):
                        counts["gave_up"] += 1
                        if job.callback_url:
                            publish_webhook(celery, job.id)
                elif sent_since_expiry(job):  # one urgent copy after the lease ran out, then time-based
                    if republish_due(job, now, settings.republish_after_seconds):
                        due.append(job)
                    elif seen is not None and job.id in seen.waiting:
                        counts["in_broker"] += 1
                else:
                    due.append(job)
            elif job.published_at is None:  # its publish failed
                due.append(job)
            elif seen is None or job.id in seen.taken:  # no evidence, or a worker took it: wait, then resend
                if republish_due(job, now, settings.republish_after_seconds):
                    due.append(job)
            elif job.id in seen.waiting:
                counts["in_broker"] += 1
            else:
                missing.append(job)
        if missing:
            due += _confirm_missing(session, celery, missing, inspect)
        counts["republished"] = _publish(session, celery, due)
    return counts


def _publish(session: Session, celery: Celery, due: list[Job]) -> int:
    """Send one urgent message for each job in `due` (ahead of the backlog); how many were sent."""
    sent = 0
    for job in due:
        try:
            publish_job(celery, job.id, job.queue, URGENT_PRIORITY)
        except Exception:
            log.warning("broker unreachable; will retry", exc_info=True)
            break
        mark_published(session, job.id)
        sent += 1
    return sent


def sent_since_expiry(job: Job) -> bool:
    """Whether a message was sent for a running job after its lease ran out. Until one is, whatever the broker
    holds for it does not help: Celery re-queues a killed process's message at the end of the queue, and a copy
    sent before the expiry may have reached a worker on another host while the lease still held ("held", and
    dropped). An expired lease is the evidence that its worker is gone."""
    published, expires = job.published_at, job.lease_expires_at
    return published is not None and expires is not None and published >= expires


def sent_before_attempt(job: Job) -> bool:
    """Whether every message of the job predates its current attempt's claim: that attempt consumed it, so
    nothing will bring the job back but a new one (its lost worker cannot)."""
    return job.published_at is None or (job.started_at is not None and job.published_at <= job.started_at)


def _orphaned_here(session: Session, now: datetime, settings: Settings) -> list[Job]:
    """Running jobs whose worker process died on this host: they need not wait for their lease
    (`worker.owners`); the worker that gets the message takes them over. Celery re-queues a killed pool
    process's message itself, but at the end of the queue; one urgent copy puts the job ahead of the backlog
    (then the time-based rule, if it is still not taken)."""
    orphaned = [job for job in running_on_host(session, host_prefix()) if owner_is_dead(job.lease_owner)]
    after = settings.republish_after_seconds
    return [job for job in orphaned if sent_before_attempt(job) or republish_due(job, now, after)]


def _confirm_missing(session: Session, celery: Celery, missing: list[Job], inspect: Inspect) -> list[Job]:
    """Of the queued jobs the broker did not hold, those it still does not hold a moment later and that are
    still queued (a worker may have claimed one in between)."""
    time.sleep(CONFIRM_DELAY)
    again = inspect(celery, QUEUES)
    if again is None:
        return []
    lost = []
    for job in missing:
        session.refresh(job)
        if job.state == JobState.queued and not again.holds(job.id):
            lost.append(job)
    return lost


class Reconciler(threading.Thread):
    """Runs `reconcile_once` every `reconcile_interval` seconds in the background."""

    def __init__(self, sessions: sessionmaker[Session], celery: Celery, settings: Settings) -> None:
        super().__init__(daemon=True, name="reconciler")
        self.sessions, self.celery, self.settings = sessions, celery, settings
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.settings.reconcile_interval):
            try:
                reconcile_once(self.sessions, self.celery, self.settings)
            except Exception:
                log.exception("reconciler pass failed")
