"""Bounded retries of idempotent store work through transient database and storage faults.

A dropped connection (the database restarted, a proxy cut it, `pg_terminate_backend`) or a storage error is
usually gone a moment later. Work that may safely run twice (an upsert under a deterministic id, a guarded
update, a write to a deterministic key) is retried with backoff in a fresh session; when the faults outlast the
retries, `DatabaseUnavailable` names the operation, never the SQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from store.artifacts import StorageUnavailable

log = logging.getLogger("atelier.store")
T = TypeVar("T")

DELAYS = (0.1, 0.3, 1.0, 2.0, 4.0)
"""Seconds slept between attempts: six attempts over about 7.5 s."""


class DatabaseUnavailable(Exception):
    """The database failed through every retry. The message names the operation (clients see it); the last
    driver error, which may quote SQL, is its `__cause__`, for the log."""


def is_transient(exc: BaseException) -> bool:
    """A fault a retry may get past: a lost or refused connection, or a storage error."""
    if isinstance(exc, StorageUnavailable):
        return True
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retrying(operation: str, work: Callable[[], T], delays: tuple[float, ...] | None = None) -> T:
    """`work()`, again after each transient fault, until `delays` run out. Then a storage fault is raised as it
    is, and a database fault as `DatabaseUnavailable`."""
    for attempt, delay in enumerate((*(DELAYS if delays is None else delays), None)):
        try:
            return work()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if delay is None:
                if isinstance(exc, StorageUnavailable):
                    raise
                raise DatabaseUnavailable(f"the database was unavailable while {operation}") from exc
            log.warning("%s: %s (attempt %d); retrying in %.1f s", operation, type(exc).__name__, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def in_session(
    sessions: sessionmaker[Session],
    operation: str,
    work: Callable[[Session], T],
    delays: tuple[float, ...] | None = None,
) -> T:
    """`work(session)` in a fresh session per attempt, retried through transient faults (see `retrying`)."""

    def attempt() -> T:
        session = sessions()
        try:
            return work(session)
        finally:
            close_quietly(session)

    return retrying(operation, attempt, delays)


def close_quietly(session: Session) -> None:
    """Close a session whose connection may be dead: a failure to return it to the pool changes nothing for the
    caller (the pool drops the connection)."""
    try:
        session.close()
    except Exception:
        log.warning("closing a session failed; its connection is dropped", exc_info=True)
