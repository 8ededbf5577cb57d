"""`make serve`'s program on a fresh folder: embedded SQLite, filesystem broker, real workers, no server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from store.settings import ROOT
from tests.conftest import ZOO_MODEL, free_port, stop_process
from tests.images import png_bytes


def test_devserver_runs_an_edit_with_no_external_server(tmp_path: Path) -> None:
    port = free_port()
    key = "atl_dev-key-for-test"
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
        stop_process(process)
