"""Celery tasks: thin, like web views. Each takes a job id and hands it to the real logic."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import signals

from contract.webhook_targets import Allowlist, TargetRefused
from store.artifacts import artifact_store
from store.db import session_factory
from store.job_ends import announce_end
from store.jobs import mark_published
from store.migrate import upgrade
from store.settings import get_settings
from store.tables import TERMINAL_STATES, Job, utcnow
from worker.celery_app import DELIVER_WEBHOOK, RUN_JOB, celery_app, publish_job

if TYPE_CHECKING:  # the execution module imports torch; a task module must not
    from worker.execution import RunOutcome

log = logging.getLogger("atelier.worker")
ENDED: frozenset[RunOutcome] = frozenset({*TERMINAL_STATES, "exhausted", "terminal"})
"""Outcomes of `execute_job` after which the job is over (by this run or before it): its webhook is due."""
_context: Any = None


def context() -> Any:
    """The process's WorkerContext, built on first use (in the pool child, after fork)."""
    global _context
    if _context is None:
        from worker.execution import WorkerContext
        from worker.runtime import ModelCache, device_policy

        settings = get_settings()
        _context = WorkerContext(
            settings=settings,
            sessions=session_factory(settings.database_url),
            artifacts=artifact_store(settings),
            cache=ModelCache(
                settings.models_dir, device_policy(settings), settings.allow_downloads, settings.model_cache_bytes
            ),
        )
    return _context


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Run one job by id."""
    from worker.execution import execute_job

    result = execute_job(context(), job_id, node=run_job.request.hostname)
    if result in ENDED:
        _after_end(job_id)
    elif result == "deferred":  # its tenant runs its quota of jobs: back to the end of the queue, after a pause
        _requeue(job_id)
    return result


DEFER_SECONDS = 0.5
"""The pause before a deferred job's message goes back to the queue, so a queue of nothing but one tenant's
deferred jobs does not spin."""


def _requeue(job_id: str) -> None:
    time.sleep(DEFER_SECONDS)
    with session_factory(get_settings().database_url)() as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        try:
            publish_job(celery_app, job_id, job.queue)
        except Exception:  # the reconciler re-sends it: the broker does not hold it
            log.warning("could not re-queue deferred job %s", job_id, exc_info=True)
            return
        mark_published(session, job_id)


def _after_end(job_id: str) -> None:
    """After a job's terminal write: wake the API requests waiting on it; send the job's webhook if it has one."""
    settings = get_settings()
    announce_end(settings.broker_url, job_id)
    with session_factory(settings.database_url)() as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        if job.callback_url and job.webhook_delivered_at is None:
            celery_app.send_task(DELIVER_WEBHOOK, args=[job_id], queue="inference")


@celery_app.task(name=DELIVER_WEBHOOK, bind=True, acks_late=True, ignore_result=True, max_retries=None)
def deliver_webhook(self: Any, job_id: str) -> str:
    """POST the terminal state to the job's callback URL, retried with backoff."""
    from worker.webhooks import deliver

    settings = get_settings()
    allow = Allowlist.parse(settings.webhook_allow_private)
    with session_factory(settings.database_url)() as session:
        job = session.get(Job, job_id)
        if job is None or not job.callback_url or job.webhook_delivered_at is not None:
            return "skipped"
        job.webhook_attempts += 1
        session.commit()
        try:
            status = deliver(job, settings.webhook_secret, settings.webhook_timeout, allow)
            ok = 200 <= status < 300
        except TargetRefused as exc:  # the rule will not change its mind: no retry
            log.warning("webhook for %s refused: %s", job_id, exc)
            return "refused"
        except Exception:
            ok = False
        if ok:
            job.webhook_delivered_at = utcnow()
            session.commit()
            return "delivered"
        if job.webhook_attempts >= settings.webhook_max_attempts:
            log.warning("webhook for %s given up after %d attempts", job_id, job.webhook_attempts)
            return "given_up"
    raise self.retry(countdown=min(2 ** (self.request.retries + 1), 60))


@signals.worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Load torch and the default base model when the pool child starts, not on the first job."""
    ctx = context()
    try:
        ctx.cache.get(ctx.settings.default_model)
    except Exception:
        log.warning("could not preload %s", ctx.settings.default_model, exc_info=True)


@signals.worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    """Each worker instance runs the reconciler beside its pool."""
    from worker.reconciler import Reconciler

    settings = get_settings()
    upgrade(settings.database_url)
    Reconciler(session_factory(settings.database_url), celery_app, settings).start()
