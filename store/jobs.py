"""The job lifecycle in the database: conditional claim, lease, guarded terminal writes.

The row is the truth. Every transition is one conditional UPDATE, so two workers holding the same
message (at-least-once delivery) can never both run a job, and a terminal state never changes.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Engine, Row, and_, bindparam, func, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from store.tables import TERMINAL_STATES, ApiKey, Job, JobState, utcnow

ClaimReason = Literal["claimed", "not_found", "terminal", "held", "exhausted", "deferred"]
"""claimed: this worker runs it; not_found; terminal: it already ended; held: another worker's live lease;
exhausted: its attempts ran out (it is failed now); deferred: its tenant runs `max_running` jobs already."""


@dataclass(frozen=True)
class Claim:
    """What a worker learns when it tries to claim a job."""

    job: Job | None
    reason: ClaimReason


@dataclass(frozen=True)
class TenantCap:
    """At most `max_running` of tenant `tenant_id`'s jobs run at once."""

    tenant_id: str
    max_running: int


def _others_running(job_id: str) -> Any:
    """The number of running jobs of the job's tenant other than the job itself (correlated with `Job`)."""
    other = aliased(Job)
    return (
        select(func.count())
        .where(other.tenant_id == Job.tenant_id, other.state == JobState.running, other.id != job_id)
        .scalar_subquery()
    )


def claim(
    session: Session,
    job_id: str,
    owner: str,
    lease_seconds: float,
    dead_owner: str | None = None,
    cap: TenantCap | None = None,
) -> Claim:
    """Take the job if it is queued, or running under an expired lease (or under `dead_owner`'s, a worker known
    to be dead), attempts remain, and (with `cap`) its tenant has fewer than `cap.max_running` others running.
    On Postgres the cap holds exactly: claims of one tenant's jobs take a transaction lock on the tenant."""
    now = utcnow()
    claimable = or_(
        Job.state == JobState.queued,
        and_(Job.state == JobState.running, Job.lease_expires_at < now),
        and_(Job.state == JobState.running, Job.lease_owner == (dead_owner or "")),
    )
    conditions = [Job.id == job_id, claimable, Job.attempts < Job.max_attempts, Job.cancel_requested.is_(False)]
    if cap is not None:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(select(func.pg_advisory_xact_lock(func.hashtext(cap.tenant_id))))
        conditions.append(_others_running(job_id) < cap.max_running)
    result = session.execute(
        update(Job)
        .where(*conditions)
        .values(
            state=JobState.running,
            attempts=Job.attempts + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            updated_at=now,
            error_code=None,
            error_message=None,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return Claim(None, "not_found")
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return Claim(job, "claimed")
    if job.state == JobState.running and job.lease_owner == owner:  # a retried claim whose commit went through
        return Claim(job, "claimed")
    if job.state in TERMINAL_STATES:
        return Claim(job, "terminal")
    if job.cancel_requested and _cancel_unstarted(session, job_id):
        return Claim(session.get(Job, job_id, populate_existing=True), "terminal")
    expired = job.state == JobState.running and job.lease_expires_at is not None and job.lease_expires_at < now
    orphaned = job.state == JobState.running and dead_owner is not None and job.lease_owner == dead_owner
    if (job.state == JobState.queued or expired or orphaned) and job.attempts >= job.max_attempts:
        give_up(session, job_id, "worker_lost", f"the job ended its worker {job.attempts} times", dead_owner)
        return Claim(session.get(Job, job_id, populate_existing=True), "exhausted")
    if (job.state == JobState.queued or expired or orphaned) and cap is not None:
        return Claim(job, "deferred")
    return Claim(job, "held")


def _cancel_unstarted(session: Session, job_id: str) -> bool:
    """End a job whose cancel was asked for while nobody held a live lease on it."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(Job.state == JobState.queued, and_(Job.state == JobState.running, Job.lease_expires_at < now)),
        )
        .values(state=JobState.canceled, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def give_up(session: Session, job_id: str, code: str, message: str, dead_owner: str | None = None) -> bool:
    """Fail a job nobody holds a live lease on (its attempts are spent); `dead_owner`'s lease counts as gone."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(
                Job.state == JobState.queued,
                and_(Job.state == JobState.running, Job.lease_expires_at < now),
                and_(Job.state == JobState.running, Job.lease_owner == (dead_owner or "")),
            ),
        )
        .values(state=JobState.failed, error_code=code, error_message=message, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def heartbeat(
    session: Session, job_id: str, owner: str, lease_seconds: float, step: int | None = None, total: int | None = None
) -> bool | None:
    """Renew the lease (and record progress) in one statement.

    Returns the job's cancel_requested flag, or None if this worker no longer holds the job.
    """
    now = utcnow()
    values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now}
    if step is not None:
        values["progress_step"] = step
    if total is not None:
        values["progress_total"] = total
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.running, Job.lease_owner == owner)
        .values(**values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).first()
    session.commit()
    return None if row is None else bool(row[0])


def finish(
    session: Session,
    job_id: str,
    owner: str,
    state: JobState,
    *,
    output_file_ids: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    progress: tuple[int, int] | None = None,
) -> bool:
    """The guarded terminal write: only the lease holder of a running job may end it."""
    now = utcnow()
    values: dict[str, Any] = {"state": state, "finished_at": now, "updated_at": now, "lease_expires_at": None}
    if progress is not None:
        values["progress_step"], values["progress_total"] = progress
    if output_file_ids is not None:
        values["output_file_ids"] = output_file_ids
    if metrics is not None:
        values["metrics"] = metrics
    if result is not None:
        values["result"] = result
    if error_code is not None:
        values["error_code"] = error_code
        values["error_message"] = error_message
    updated = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.running, Job.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(updated.rowcount)  # type: ignore[attr-defined]


def finished_by(session: Session, job_id: str, owner: str, state: JobState) -> bool:
    """Whether `owner`'s terminal write of `state` is already in the row (a retried `finish`)."""
    row = session.execute(select(Job.state, Job.lease_owner).where(Job.id == job_id)).first()
    return row is not None and row.state == state and row.lease_owner == owner


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel: a queued job ends now; a running one is flagged and stops at its next step."""
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == JobState.queued)
        .values(state=JobState.canceled, cancel_requested=True, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == JobState.running)
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    refreshed = session.get(Job, job.id, populate_existing=True)
    assert refreshed is not None
    return refreshed


def mark_published(session: Session, job_id: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(published_at=utcnow(), publish_count=Job.publish_count + 1)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def mark_unpublished(session: Session, job_id: str) -> None:
    """The publish failed: make the job the reconciler's first candidate."""
    session.execute(
        update(Job).where(Job.id == job_id).values(published_at=None).execution_options(synchronize_session=False)
    )
    session.commit()


def republish_due(job: Job, now: datetime, after_seconds: float) -> bool:
    """Whether a job's message may be lost: unpublished, or not taken up for a backed-off while.

    The wait doubles with each publish (up to 16x), so a long backlog is not flooded with copies.
    """
    if job.published_at is None:
        return True
    backoff = after_seconds * min(2 ** max(job.publish_count - 1, 0), 16)
    return (now - job.published_at).total_seconds() >= backoff


def stale_jobs(session: Session, published_before: datetime, limit: int = 1000) -> list[Job]:
    """Candidates the broker may have lost: queued and not published since `published_before` (the reconciler
    then asks the broker, or applies `republish_due`), or running on an expired lease. Longest-unpublished first."""
    now = utcnow()
    query = (
        select(Job)
        .where(
            or_(
                and_(
                    Job.state == JobState.queued,
                    or_(Job.published_at.is_(None), Job.published_at < published_before),
                ),
                and_(Job.state == JobState.running, Job.lease_expires_at < now),
            )
        )
        .order_by(Job.published_at.asc().nulls_first(), Job.created_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def running_on_host(session: Session, owner_prefix: str, limit: int = 200) -> list[Job]:
    """Running jobs whose lease owner's name begins with `owner_prefix` (a host's workers), live lease or not."""
    query = select(Job).where(Job.state == JobState.running, Job.lease_owner.startswith(owner_prefix, autoescape=True))
    return list(session.scalars(query.limit(limit)))


RECONCILER_LOCK = 0x41544C52
"""The Postgres advisory lock key that one reconciler at a time holds ("ATLR")."""


@contextmanager
def reconciler_lock(engine: Engine, scope: str = "") -> Iterator[bool]:
    """Yields whether this process may reconcile now; one process at a time does, so two workers never re-send
    the same rows. `scope` names a narrower lock (one host's own jobs), held apart from the global one.
    Postgres: a session advisory lock on a connection of its own, held for the pass and released with it (also
    when the process dies). SQLite: an exclusive lock on a file beside the database."""
    key = RECONCILER_LOCK
    if scope:  # a stable 63-bit key of its own
        key = int.from_bytes(hashlib.blake2b(scope.encode(), digest_size=8).digest(), "big") >> 1
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            held = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}))
            connection.commit()
            try:
                yield held
            finally:
                if held:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield True
        return
    suffix = f".{key:x}" if scope else ""
    with Path(f"{database}.reconciler{suffix}.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError for a cursor this service did not issue (a naive or out-of-range time included)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, job_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        moment = datetime.fromisoformat(created)
        if moment.tzinfo is None or not isinstance(job_id, str):
            raise ValueError("naive time or no job id")
        return moment.astimezone(UTC), job_id  # OverflowError past year 1 or 9999 in UTC
    except Exception as exc:
        raise ValueError("invalid cursor") from exc


def list_jobs(
    session: Session, tenant_id: str, *, state: str | None, kind: str | None, cursor: str | None, limit: int
) -> tuple[list[Job], str | None]:
    """Newest first, keyset-paginated by (created_at, id)."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if state:
        query = query.where(Job.state == state)
    if kind:
        query = query.where(Job.kind == kind)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


_JOBS = Job.__table__
_JOB_FOR_KEY = (
    select(ApiKey.id.label("key_id"), _JOBS)
    .select_from(
        ApiKey.__table__.outerjoin(
            _JOBS, and_(_JOBS.c.id == bindparam("job_id"), _JOBS.c.tenant_id == ApiKey.tenant_id)
        )
    )
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)
"""Built once: building the statement cost more than running it (SQLAlchemy then caches its compiled form)."""


def job_for_key(connection: Connection, key_hash: str, job_id: str) -> tuple[bool, Row[Any] | None]:
    """A status poll's whole database work in one statement, without the ORM: (whether `key_hash` is a live key,
    the job `job_id` as a row if it belongs to that key's tenant, else None). The row has the job's columns as
    attributes (what `JobOut.of` reads)."""
    row = connection.execute(_JOB_FOR_KEY, {"job_id": job_id, "key_hash": key_hash}).one_or_none()
    if row is None:
        return False, None
    return True, (row if row.id is not None else None)
