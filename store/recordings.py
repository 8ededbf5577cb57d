"""Which worker holds a sparse region edit's recording, so that a follow-up edit of the same image goes to it.

A sparse `region-edit` keeps the original's activations in its worker process's memory (the activation cache,
docs/sparse-cache.md); a follow-up edit with another mask is a hit only on that process. Jobs otherwise go to
whichever worker takes them from the queue. So the worker notes, after a region edit whose recording it holds,
`atelier:recording:<route key> -> {node, owner}` in Redis (`remember`, for an hour); the API, submitting a region
edit, looks its route key up (`holder_of`) and, when that worker process runs no job (`is_free`), sends the run
message to the worker's own queue (Celery's direct queue, `worker_direct`) instead of the shared one.

The route key hashes what the recording depends on as the request says it (the model, the adapters, the input
file, prompt, negative prompt, guidance, steps, strength and seed): computable without torch, so the API can.
It names a job's recording, not proves it: the worker's activation key (`region_edit.activation_key`, over the
pixels and the noise) decides hit or miss, so a stale entry (the recording evicted, the worker restarted) costs a
miss, never a wrong result. A routed message that no worker takes (the worker died) is re-sent to the shared queue
by the reconciler like any message the shared queues do not hold; a duplicate is harmless (claims are conditional).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.job_ends import redis_client
from store.tables import Job, JobState

log = logging.getLogger("atelier.recordings")

PREFIX = "atelier:recording:"
TTL_SECONDS = 3600
ROUTED_KINDS = frozenset({"region-edit"})
RECORDING_FIELDS = ("image", "prompt", "negative_prompt", "guidance_scale", "steps", "strength")


@dataclass(frozen=True)
class Holder:
    """A worker process holding a recording: its Celery node name (whose direct queue reaches it) and its
    lease-owner name (how its running jobs are found)."""

    node: str
    owner: str


def route_key(kind: str, model: str, params: dict[str, Any], seed: int, adapters: list[Any]) -> str | None:
    """The route key of a job's recording; None for a job that keeps none (another method, or a dense edit)."""
    if kind not in ROUTED_KINDS or not params.get("sparse", True):
        return None
    fields = {name: params.get(name) for name in RECORDING_FIELDS}
    payload = json.dumps([model, adapters, fields, seed], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def job_route_key(job: Job) -> str | None:
    return route_key(job.kind, job.model, job.params, job.seed, job.adapters)


def route_for(session: Session, broker_url: str, job: Job) -> str | None:
    """The node to send `job` to: the free worker holding its recording, else None (the shared queue)."""
    key = job_route_key(job)
    client = redis_client(broker_url) if key is not None else None
    if key is None or client is None:
        return None
    holder = holder_of(client, key)
    return holder.node if holder is not None and is_free(session, holder) else None


def remember(client: Any, key: str, holder: Holder) -> None:
    """Note that `holder` keeps the recording of `key` (a Redis client; failures are logged and ignored)."""
    try:
        client.set(PREFIX + key, json.dumps({"node": holder.node, "owner": holder.owner}), ex=TTL_SECONDS)
    except Exception:
        log.warning("could not note the holder of recording %s", key, exc_info=True)


def holder_of(client: Any, key: str) -> Holder | None:
    try:
        raw = client.get(PREFIX + key)
    except Exception:
        log.warning("could not look up recording %s", key, exc_info=True)
        return None
    if raw is None:
        return None
    found = json.loads(raw)
    return Holder(node=str(found["node"]), owner=str(found["owner"]))


def is_free(session: Session, holder: Holder) -> bool:
    """Whether the holding process runs no job now (a follow-up sent to it would start at once)."""
    running = session.execute(
        select(Job.id).where(Job.state == JobState.running, Job.lease_owner == holder.owner).limit(1)
    ).first()
    return running is None
