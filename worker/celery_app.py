"""The Celery application: transport only (the database holds the truth). Imports no torch."""

from __future__ import annotations

import logging

from celery import Celery
from celery.utils.nodenames import worker_direct
from kombu import Queue

from store.settings import Settings, get_settings

log = logging.getLogger("atelier.queue")

RUN_JOB = "atelier.run_job"
DELIVER_WEBHOOK = "atelier.deliver_webhook"
QUEUES = ("inference", "training")


def make_celery(settings: Settings) -> Celery:
    """A Celery app for the configured broker: late acks, prefetch 1, JSON only, two queues."""
    app = Celery("atelier", broker=settings.broker_url, include=["worker.tasks"])
    transport_options: dict[str, object] = {}
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_dir
        (folder / "out").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        transport_options = {
            "control_folder": str(folder / "control"),
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    elif settings.broker_url.startswith("redis"):
        # A message unacked for this long is redelivered; the lease makes that harmless.
        transport_options = {"visibility_timeout": int(settings.job_hard_time_limit) + 60}
    app.conf.update(
        # Celery lets CELERY_BROKER_URL override `broker`; the settings object is the one source.
        broker_read_url=settings.broker_url,
        broker_write_url=settings.broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A pool child loads torch and the default model at start (worker.tasks._warm_up).
        worker_proc_alive_timeout=120,
        task_queues=[Queue(name) for name in QUEUES],
        # Each worker also consumes a queue of its own, where the API sends a follow-up region edit of an image
        # whose recording that worker holds (store/recordings.py).
        worker_direct=True,
        task_default_queue="inference",
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_hard_time_limit,
        worker_hijack_root_logger=False,
        # A broker blip must not kill a running job (a GPU job of minutes): the row, not the message, says whether
        # it ran, so the message Redis restores after the loss is a harmless duplicate.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


celery_app = make_celery(get_settings())


NORMAL_PRIORITY = 6
URGENT_PRIORITY = 0
"""Redis serves a queue's priority 0 before 3, 6 and 9 (kombu's steps). New jobs go at NORMAL_PRIORITY; what
the reconciler re-sends (a job whose worker died, a message the broker lost) at URGENT_PRIORITY, ahead of the
backlog, since it was submitted before it."""


def publish_job(
    app: Celery, job_id: str, queue: str, priority: int = NORMAL_PRIORITY, node: str | None = None
) -> None:
    """Send the run message for a committed job row (raises if the broker is unreachable); with `node`, to that
    worker's own queue (Celery's direct queue) instead of `queue` (store/recordings.py: follow-up edits)."""
    target: str | Queue = worker_direct(node) if node else queue
    app.send_task(RUN_JOB, args=[job_id], queue=target, priority=priority, retry=True, retry_policy={"max_retries": 2})


def publish_webhook(app: Celery, job_id: str) -> None:
    app.send_task(DELIVER_WEBHOOK, args=[job_id], queue="inference", retry=True, retry_policy={"max_retries": 2})
