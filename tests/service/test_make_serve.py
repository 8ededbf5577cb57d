"""`make serve`'s program on a fresh folder: embedded SQLite, filesystem broker, real workers, no server; and
how it stops: SIGTERM ends the API and its workers, a worker that will not stop is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from api.devserver import stop_workers
from store.settings import ROOT
from tests.conftest import ZOO_MODEL, free_port, stop_process
from tests.images import png_bytes


def start_devserver(tmp_path: Path, port: int, key: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`python -m api.devserver` in its own session on a fresh folder; returns it and its log (workers' included)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "CELERY_BROKER_URL") and not k.startswith("ATELIER_")
    }
    env.update(
        {
            "PORT": str(port),
            "ATELIER_DEV_API_KEY": key,
            "ATELIER_DATABASE_URL": f"sqlite:///{tmp_path / 'dev.db'}",
            "ATELIER_BROKER_URL": "filesystem://",
            "ATELIER_BROKER_DIR": str(tmp_path / "broker"),
            "ATELIER_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
            "ATELIER_MODELS_DIR": os.environ.get("ATELIER_TEST_MODELS_DIR", str(ZOO_MODEL.parent)),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log_path = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "api.devserver"],
        cwd=ROOT,
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, log_path


def wait_until_ready(base: str, log_path: Path, deadline: float) -> None:
    """The API answers /readyz and both workers (inference, training) have logged `ready.`."""
    while time.time() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200 and log_path.read_text().count(" ready.") >= 2:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(log_path.read_text()[-3000:])


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_devserver(process: subprocess.Popen[bytes]) -> None:
    """stop_process, then SIGKILL whatever of the devserver's workers outlived it (they lead their own groups)."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stop_process(process)
    for leftover in descendants:
        if alive(leftover):
            leftover.kill()


def test_devserver_runs_an_edit_with_no_external_server(tmp_path: Path) -> None:
    port = free_port()
    key = "atl_dev-key-for-test"
    process, log_path = start_devserver(tmp_path, port, key)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError(log_path.read_text()[-3000:])
        assert f"Development API key: {key}" in log_path.read_text()
        with httpx.Client(base_url=base, headers=auth, timeout=30) as http:
            file_id = http.post("/v1/files", files={"file": ("a.png", png_bytes(), "image/png")}).json()["id"]
            job = http.post("/v1/edits/sdedit", json={"image": file_id, "prompt": "a blue square", "steps": 10}).json()
            while job["state"] not in ("succeeded", "failed", "canceled") and time.time() < deadline + 60:
                time.sleep(0.2)
                job = http.get(f"/v1/jobs/{job['id']}").json()
            assert job["state"] == "succeeded", (job, log_path.read_text()[-3000:])
            assert http.get(job["outputs"][0]["url"]).content.startswith(b"\x89PNG")
    finally:
        stop_devserver(process)


def test_sigterm_stops_the_devserver_and_its_workers(tmp_path: Path) -> None:
    """SIGTERM to the devserver alone (as `kill` or a supervisor sends it) stops the API and both Celery workers,
    pool children included; none is left running under PID 1, taking jobs."""
    port = free_port()
    process, log_path = start_devserver(tmp_path, port, "atl_dev-key-for-sigterm")
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", log_path, time.time() + 120)
        workers = psutil.Process(process.pid).children(recursive=True)
        assert sum("celery" in " ".join(w.cmdline()) for w in workers) >= 4, workers  # 2 workers + 2 pool children
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        left = [w for w in workers if alive(w)]
        assert not left, (left, log_path.read_text()[-3000:])
        assert process.returncode == 128 + signal.SIGTERM  # it stopped through its clean-up, not killed outright
    finally:
        stop_devserver(process)


def test_a_worker_that_ignores_sigterm_is_killed_with_its_children() -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, process_group=0)
    try:
        assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"
        children = psutil.Process(worker.pid).children()
        started = time.monotonic()
        stop_workers([worker], timeout=1.0)
        assert time.monotonic() - started < 10
        assert worker.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while any(alive(child) for child in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert children and not any(alive(child) for child in children)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
