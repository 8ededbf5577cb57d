"""`make serve`: the whole service on one machine with no external server.

Migrates the database, makes sure a development API key exists (ATELIER_DEV_API_KEY, or one
generated once and kept in var/dev_api_key), starts one Celery worker per queue as subprocesses and
runs the API on 127.0.0.1:$PORT (default 8000). Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

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


def start_workers(env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """One worker for inference and one for training, so a long training never blocks an edit."""
    workers = []
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
        workers.append(subprocess.Popen(command, cwd=ROOT, env=env))
    return workers


def main() -> None:
    settings = get_settings()
    var_dir = ROOT / "var"
    var_dir.mkdir(exist_ok=True)
    upgrade(settings.database_url)
    key = dev_key(var_dir)
    with session_scope(settings.database_url) as session:
        ensure_tenant_with_key(session, "dev", key)
    port = int(os.environ.get("PORT", "8000"))
    workers = start_workers(dict(os.environ))
    sys.stdout.write(
        f"\nAtelier is starting on http://127.0.0.1:{port}  (Swagger UI: http://127.0.0.1:{port}/docs)\n"
        f"Development API key: {key}\n"
        f"  export ATELIER_KEY={key}\n\n"
    )
    sys.stdout.flush()
    try:
        uvicorn.run("api.main:app_factory", factory=True, host="127.0.0.1", port=port, log_level="info")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()


if __name__ == "__main__":
    main()
