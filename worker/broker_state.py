"""What the broker holds: which jobs have a run message waiting in a queue, and which a worker has taken.

The reconciler re-publishes a queued job only on evidence that its message is gone; a long queue is not
evidence. This module reads that evidence from a Redis broker (kombu's layout: one list per queue and
priority, and the `unacked` hash of messages delivered to a worker and not yet acknowledged). A transport
it cannot read (the filesystem broker) gives None, and the reconciler falls back to its time-based rule.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from worker.celery_app import RUN_JOB

log = logging.getLogger("atelier.reconciler")


@dataclass(frozen=True)
class BrokerSnapshot:
    """Job ids with a run message in a queue (`waiting`) or delivered to a worker, unacknowledged (`taken`)."""

    waiting: frozenset[str]
    taken: frozenset[str]

    def holds(self, job_id: str) -> bool:
        return job_id in self.waiting or job_id in self.taken


def run_message_job(raw: bytes | str) -> str | None:
    """The job id a raw kombu message runs, or None for any other message (a webhook, something unreadable)."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an `unacked` entry: [message, exchange, routing_key]
            message = message[0]
        if message.get("headers", {}).get("task") != RUN_JOB:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def _ids(raws: Iterable[bytes | str]) -> frozenset[str]:
    return frozenset(job_id for job_id in map(run_message_job, raws) if job_id is not None)


def snapshot(celery: Celery, queues: Iterable[str]) -> BrokerSnapshot | None:
    """Read the broker; None if its transport cannot be inspected. Raises if the broker is unreachable."""
    with celery.connection_for_read() as connection:
        if connection.transport.driver_type != "redis":  # kombu's redis, rediss and sentinel transports
            return None
        channel: Any = connection.default_channel
        client = channel.client
        pipe = client.pipeline()
        for queue in queues:
            for priority in channel.priority_steps:
                pipe.lrange(channel._q_for_pri(queue, priority), 0, -1)
        pipe.hvals(channel.unacked_key)
        *lists, unacked = pipe.execute()
    return BrokerSnapshot(waiting=_ids(raw for items in lists for raw in items), taken=_ids(unacked))
