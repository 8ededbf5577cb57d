"""Job-end notifications: the worker announces a job's terminal state on Redis, the API wakes the requests waiting
for it (`GET /v1/jobs/{id}?wait=...`).

A status poll every few milliseconds costs the API and the client a core between them on a small machine, and still
sees the end up to one interval late. With `wait`, a client asks once and gets its answer when the job ends. The
worker publishes `atelier:job-ended:<job id>` after the terminal write (`announce_end`); each API process holds one
pattern subscription to those channels (`JobEnds`) and sets the events of the requests waiting on that job.

Best effort, by design: the database stays the truth. A waiting request re-reads the job at least once a second
whatever it hears, so a lost message (Redis restarting, a job ended by the reconciler or a cancel, which announce
nothing) delays the answer by at most that. Without a Redis broker (the filesystem broker of `make serve`) nothing
is announced and waits fall back to those re-reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

log = logging.getLogger("atelier.job_ends")

CHANNEL_PREFIX = "atelier:job-ended:"
RETRY_SECONDS = 5.0  # after a lost subscription, the pause before a wait starts a new one


def redis_url(broker_url: str) -> str | None:
    """The broker's URL when it is Redis (the channel rides on it), else None."""
    return broker_url if broker_url.startswith(("redis://", "rediss://")) else None


@lru_cache(maxsize=4)
def redis_client(broker_url: str) -> Any | None:
    """A Redis client on the broker (one connection pool per process), or None when the broker is not Redis."""
    url = redis_url(broker_url)
    if url is None:
        return None
    import redis

    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def announce_end(broker_url: str, job_id: str) -> None:
    """Publish that `job_id` reached a terminal state; a failure is logged and ignored (waiters re-read anyway)."""
    client = redis_client(broker_url)
    if client is None:
        return
    try:
        client.publish(CHANNEL_PREFIX + job_id, b"ended")
    except Exception:
        log.warning("could not announce the end of %s", job_id, exc_info=True)


class JobEnds:
    """One API process's subscription to every job's end, and the events of the requests waiting on each job.

    The listener task starts with the first wait (on the running event loop) and restarts after a failure at the
    next one; `close` stops it (the app's shutdown)."""

    def __init__(self, broker_url: str) -> None:
        self.url = redis_url(broker_url)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lost_at = float("-inf")

    @asynccontextmanager
    async def watching(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set when `job_id`'s end is announced, while the block runs."""
        loop = asyncio.get_running_loop()
        idle = self._task is None or self._task.done()
        if self.url is not None and idle and loop.time() - self._lost_at > RETRY_SECONDS:
            self._task = loop.create_task(self._listen(self.url))
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiters.get(job_id, set())
            waiting.discard(event)
            if not waiting:
                self._waiters.pop(job_id, None)

    async def _listen(self, url: str) -> None:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.psubscribe(CHANNEL_PREFIX + "*")
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    job_id = message["channel"].decode()[len(CHANNEL_PREFIX) :]
                    for event in self._waiters.get(job_id, ()):
                        event.set()
        except asyncio.CancelledError:
            raise
        except Exception:  # Redis away: the waits re-read the database; a wait restarts the listener later
            self._lost_at = asyncio.get_running_loop().time()
            log.warning("job-end subscription lost", exc_info=True)
        finally:
            await client.aclose()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._task = None
