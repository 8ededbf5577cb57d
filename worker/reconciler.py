"""Re-publish what the broker lost: the database says which jobs should be moving and aren't."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from store.jobs import give_up, mark_published, republish_due, stale_jobs
from store.settings import Settings
from store.tables import JobState, utcnow
from worker.celery_app import publish_job, publish_webhook

log = logging.getLogger("atelier.reconciler")


def reconcile_once(sessions: sessionmaker[Session], celery: Celery, settings: Settings) -> dict[str, int]:
    """One pass; returns counts of what it did."""
    now = utcnow()
    counts = {"republished": 0, "gave_up": 0}
    with sessions() as session:
        candidates = stale_jobs(session, now - timedelta(seconds=settings.republish_after_seconds))
        for job in candidates:
            if job.state == JobState.running and job.attempts >= job.max_attempts:
                if give_up(session, job.id, "worker_lost", f"the job ended its worker {job.attempts} times"):
                    counts["gave_up"] += 1
                    if job.callback_url:
                        publish_webhook(celery, job.id)
                continue
            if not republish_due(job, now, settings.republish_after_seconds):
                continue
            try:
                publish_job(celery, job.id, job.queue)
            except Exception:
                log.warning("broker unreachable; will retry", exc_info=True)
                break
            mark_published(session, job.id)
            counts["republished"] += 1
    if any(counts.values()):
        log.info("reconciler: %s", counts)
    return counts


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
