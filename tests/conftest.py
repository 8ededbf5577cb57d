"""Shared fixtures: a migrated database, the app, API keys, a real Celery worker subprocess.

With DATABASE_URL and CELERY_BROKER_URL set (CI: PostgreSQL and Redis) the suite runs against them;
otherwise against an embedded SQLite file and the filesystem broker.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from store.db import engine_for, session_scope
from store.migrate import upgrade
from store.settings import ROOT, Settings
from store.tenants import create_key, create_tenant

ZOO_MODEL = ROOT / "zoo" / "shapes-sd-tiny"
ADMIN_KEY = "test-admin-key"
WEBHOOK_SECRET = "test-webhook-secret"


def _reset_database(url: str) -> None:
    engine = engine_for(url)
    if url.startswith("postgresql"):
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    upgrade(url)


def own_database(settings: Settings, name: str) -> Settings:
    """`settings` with a fresh, migrated database of its own (`<database>_<name>`): for tests that drive jobs by
    hand, out of reach of the session's live worker, whose reconciler acts on every job of its database."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "postgresql":
        own = url.set(database=f"{url.database}_{name}")
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            if not connection.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": own.database}):
                connection.execute(text(f'CREATE DATABASE "{own.database}"'))
        admin.dispose()
    else:
        own = url.set(database=f"{url.database}.{name}")
    database_url = own.render_as_string(hide_password=False)
    _reset_database(database_url)
    return settings.model_copy(update={"database_url": database_url})


def _reset_broker(url: str) -> None:
    if url.startswith("redis"):
        import redis

        redis.Redis.from_url(url).flushdb()


def _test_models(out: Path) -> Path:
    """The zoo's base models and the untrained test control models (tests/control_models.py), in one folder."""
    from tests.control_models import write_test_models

    write_test_models(ZOO_MODEL.parent, ZOO_MODEL.name, out)
    return out


@pytest.fixture(scope="session")
def env_settings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that configures every process of the test run (API, worker, helpers)."""
    base = tmp_path_factory.mktemp("atelier")
    database_url = os.environ.get("DATABASE_URL") or f"sqlite:///{base / 'atelier.db'}"
    broker_url = os.environ.get("CELERY_BROKER_URL") or "filesystem://"
    return {
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "ATELIER_BROKER_DIR": str(base / "broker"),
        "ATELIER_ARTIFACTS_DIR": str(base / "artifacts"),
        "ATELIER_MODELS_DIR": os.environ.get("ATELIER_TEST_MODELS_DIR") or str(_test_models(base / "models")),
        "ATELIER_ADMIN_KEY": ADMIN_KEY,
        "ATELIER_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ATELIER_WEBHOOK_ALLOW_PRIVATE": "127.0.0.1",  # the webhook tests' receivers listen on 127.0.0.1
        "ATELIER_JOB_LEASE_SECONDS": "3",
        "ATELIER_REPUBLISH_AFTER_SECONDS": "2",
        "ATELIER_RECONCILE_INTERVAL": "1",
        "ATELIER_PROGRESS_INTERVAL": "0.05",
        "ATELIER_MAX_REQUEST_BYTES": str(2 * 1024 * 1024),
        "ATELIER_MAX_IMAGE_PIXELS": str(2048 * 2048),
    }


@pytest.fixture(scope="session")
def settings(env_settings: dict[str, str]) -> Iterator[Settings]:
    saved = {k: os.environ.get(k) for k in env_settings}
    os.environ.update(env_settings)
    from store.settings import get_settings

    get_settings.cache_clear()
    current = Settings()
    _reset_database(current.database_url)
    _reset_broker(current.broker_url)
    yield current
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from api.main import create_app

    return create_app(settings)


@pytest.fixture()
def client(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def make_tenant(settings: Settings, name: str | None = None) -> tuple[str, str]:
    """A new tenant and one key for it: (tenant_id, raw_key)."""
    with session_scope(settings.database_url) as session:
        tenant = create_tenant(session, name or f"tenant-{secrets.token_hex(4)}")
        _, raw = create_key(session, tenant.id)
        return tenant.id, raw


@pytest.fixture()
def tenant(settings: Settings) -> tuple[str, str]:
    return make_tenant(settings)


@pytest.fixture()
def auth(tenant: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant[1]}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_env(env_settings: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(env_settings)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_worker(
    env_settings: dict[str, str], log_path: Path, queues: str = "inference,training"
) -> subprocess.Popen[bytes]:
    """A real Celery worker process (prefork, one child) on the test broker and database."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        queues,
        "-c",
        "1",
        "--pool",
        "prefork",
        "-n",
        f"test-{secrets.token_hex(3)}@%h",
        "--loglevel",
        "INFO",
    ]
    log = log_path.open("wb")
    process = subprocess.Popen(
        command, cwd=ROOT, env=_process_env(env_settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited: {log_path.read_text()[-3000:]}")
        if b"ready." in log_path.read_bytes():
            return process
        time.sleep(0.3)
    stop_process(process)
    raise RuntimeError(f"worker did not start: {log_path.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever is left of the group (pool children, a devserver's workers)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def worker_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's worker writes its log."""
    return tmp_path_factory.mktemp("worker") / "worker.log"


@pytest.fixture(scope="session")
def worker(settings: Settings, env_settings: dict[str, str], worker_log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """One real worker for the whole session."""
    process = start_worker(env_settings, worker_log)
    yield process
    stop_process(process)


@pytest.fixture(scope="session")
def live_server(
    settings: Settings, env_settings: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The API served by uvicorn in its own process; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app_factory",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=_process_env(env_settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        stop_process(process)
        raise RuntimeError(f"server did not start: {log_path.read_text()[-3000:]}")
    yield base
    stop_process(process)


def wait_for(client: TestClient | httpx.Client, job_id: str, headers: dict[str, str], timeout: float = 120) -> dict:  # type: ignore[type-arg]
    """Poll a job until it is terminal; returns its JSON."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] in ("succeeded", "failed", "canceled"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")
