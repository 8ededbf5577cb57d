"""`make serve`: the whole service on one machine with no external server.

Migrates the database, makes sure a development API key exists (ATELIER_DEV_API_KEY, or one
generated once and kept in var/dev_api_key), starts one Celery worker per queue as subprocesses and
runs the API on 127.0.0.1:$PORT (default 8000). Ctrl-C or SIGTERM stops everything: the API, then the
workers, which get STOP_TIMEOUT seconds to finish the job in hand before they are killed.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import uvicorn

from store.db import session_scope
from store.migrate import upgrade
from store.settings import ROOT, get_settings
from store.tenants import KEY_PREFIX, ensure_tenant_with_key


def dev_key(var_dir: Path) -> str:
    key = os.environ.get("ATELIER_DEV_API_KEY")
    if key:
        return key
    path = var_dir / "dev_api_key"
    if path.is_file():
        return path.read_text().strip()
    key = KEY_PREFIX + secrets.token_urlsafe(24)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


STOP_TIMEOUT = 20.0  # seconds the workers get after SIGTERM to finish the job in hand


def start_workers(env: dict[str, str], workers: list[subprocess.Popen[bytes]]) -> None:
    """One worker for inference and one for training, so a long training never blocks an edit.

    Each is added to `workers` as soon as it starts (a signal in between still stops it) and leads its own process
    group: a terminal's Ctrl-C reaches this process only, which stops the workers itself."""
    for queue in ("inference", "training"):
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            queue,
            "-c",
            "1",
            "--pool",
            "prefork",
            "-n",
            f"{queue}@%h",
            "--loglevel",
            "INFO",
        ]
        workers.append(subprocess.Popen(command, cwd=ROOT, env=env, process_group=0))


def stop_workers(workers: list[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM each worker (Celery's warm shutdown), wait up to `timeout` seconds for all of them, then SIGKILL what
    is left of each one's process group (its pool children too)."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            sys.stderr.write(f"worker {worker.pid} did not stop in {timeout:.0f} s; killing it\n")
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.wait()


def _exit_on_signal(signum: int, _: FrameType | None) -> None:
    """SIGTERM (and SIGINT) end the program through its `finally`; by default SIGTERM would skip it. uvicorn handles
    both while it serves, then restores this handler and raises the signal again once the API has stopped."""
    raise SystemExit(128 + signum)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_on_signal)
    settings = get_settings()
    var_dir = ROOT / "var"
    var_dir.mkdir(exist_ok=True)
    upgrade(settings.database_url)
    key = dev_key(var_dir)
    with session_scope(settings.database_url) as session:
        ensure_tenant_with_key(session, "dev", key)
    port = int(os.environ.get("PORT", "8000"))
    workers: list[subprocess.Popen[bytes]] = []
    try:
        start_workers(dict(os.environ), workers)
        sys.stdout.write(
            f"\nAtelier is starting on http://127.0.0.1:{port}  (Swagger UI: http://127.0.0.1:{port}/docs)\n"
            f"Development API key: {key}\n"
            f"  export ATELIER_KEY={key}\n\n"
        )
        sys.stdout.flush()
        uvicorn.run("api.main:app_factory", factory=True, host="127.0.0.1", port=port, log_level="info")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # the clean-up is bounded: a second Ctrl-C must not cut it short
        stop_workers(workers)


if __name__ == "__main__":
    main()
