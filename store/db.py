"""Engines and sessions for Postgres (production) and SQLite (embedded)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout so the API and workers share it."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


_ENGINES: dict[str, Engine] = {}
_READ_ENGINES: dict[str, Engine] = {}


def engine_for(url: str) -> Engine:
    """The process's engine for `url` (one pool per process)."""
    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url)
    return _ENGINES[url]


def read_engine_for(url: str) -> Engine:
    """The process's engine for one-statement reads (status polls), a pool of its own on Postgres: autocommit, so
    a read is one round trip instead of BEGIN, the statement and ROLLBACK, and no ping before each use (a read may
    simply run again: callers retry it once through a dropped connection, `store.retry.retrying`). SQLite shares
    `engine_for`'s engine."""
    if url.startswith("sqlite"):
        return engine_for(url)
    if url not in _READ_ENGINES:
        _READ_ENGINES[url] = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=10, max_overflow=10)
    return _READ_ENGINES[url]


def _forget_inherited_connections() -> None:
    """After fork (Celery's prefork pool), never touch the parent's pooled connections: a connection
    used by two processes corrupts both. `close=False` leaves them to the parent."""
    for engine in (*_ENGINES.values(), *_READ_ENGINES.values()):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
