"""The real stack: API, database, broker and a Celery worker process."""

from __future__ import annotations

import io
import json
import subprocess
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from store.db import session_scope
from store.settings import Settings
from store.tables import Job, StoredFile
from tests.conftest import wait_for
from tests.images import png_bytes
from tests.service.test_durability import insert_job
from worker.celery_app import make_celery, publish_job

pytestmark = pytest.mark.usefixtures("worker")


def download_png(client: TestClient | httpx.Client, file_id: str, auth: dict[str, str]) -> Image.Image:
    response = client.get(f"/v1/files/{file_id}", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_text_to_image_end_to_end(client: TestClient, auth: dict[str, str]) -> None:
    body = {"prompt": "a large red circle at the center", "steps": 8, "num_images": 2, "seed": 3}
    created = client.post("/v1/generations/text-to-image", json=body, headers=auth)
    assert created.status_code == 201, created.text
    assert created.json()["state"] in ("queued", "running", "succeeded")
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    assert job["progress"] == {"step": 8, "total": 8}
    assert job["attempts"] == 1 and job["error"] is None
    assert len(job["outputs"]) == 2
    images = [download_png(client, o["file_id"], auth) for o in job["outputs"]]
    assert all(im.size == (64, 64) for im in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert job["run_seconds"] > 0 and job["metrics"]["steps"] == 8


def test_sdedit_over_http_with_sse(live_server: str, tenant: tuple[str, str]) -> None:
    """Upload, submit sdedit, follow the event stream to the end, download and check the PNG."""
    auth = {"Authorization": f"Bearer {tenant[1]}"}
    with httpx.Client(base_url=live_server, timeout=30) as http:
        uploaded = http.post("/v1/files", files={"file": ("in.png", png_bytes(), "image/png")}, headers=auth)
        assert uploaded.status_code == 201
        body = {
            "image": uploaded.json()["id"],
            "prompt": "a large blue square at the center",
            "strength": 0.7,
            "steps": 20,
        }
        job = http.post("/v1/edits/sdedit", json=body, headers=auth).json()
        events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=auth, timeout=120) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name:
                    events.append((name, json.loads(line[6:])))
        names = [n for n, _ in events]
        assert names[-1] == "succeeded" and names.count("succeeded") == 1
        assert "progress" in names
        steps = [data["progress"]["step"] for n, data in events if n == "progress"]
        assert steps == sorted(steps)
        final = events[-1][1]
        assert final["progress"]["step"] == final["progress"]["total"] == 14  # round(20 * 0.7)
        image = download_png(http, final["outputs"][0]["file_id"], auth)
        assert image.size == (64, 64) and image.mode == "RGB"


def test_idempotency_key(client: TestClient, auth: dict[str, str], settings: Settings, tenant: tuple[str, str]) -> None:
    body = {"prompt": "a small green triangle at the top left", "steps": 2}
    headers = {**auth, "Idempotency-Key": "order-42"}
    first = client.post("/v1/generations/text-to-image", json=body, headers=headers)
    again = client.post("/v1/generations/text-to-image", json=body, headers=headers)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/generations/text-to-image", json={**body, "steps": 3}, headers=headers)
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant[0])) == 1
    wait_for(client, first.json()["id"], auth)


def test_cancel_running_job_stops_at_next_step(client: TestClient, auth: dict[str, str]) -> None:
    body = {"prompt": "a large purple hexagon", "steps": 100, "num_images": 8}  # cost 800: the default limit
    job = client.post("/v1/generations/text-to-image", json=body, headers=auth).json()
    deadline = time.time() + 60
    while time.time() < deadline:
        state = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
        if state["state"] == "running" and state["progress"]["step"] >= 2:
            break
        time.sleep(0.05)
    canceled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert canceled.status_code == 200 and canceled.json()["cancel_requested"]
    final = wait_for(client, job["id"], auth, timeout=30)
    assert final["state"] == "canceled"
    assert final["progress"]["step"] < 100
    assert final["outputs"] == []
    # Terminal states never change.
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth).json()["state"] == "canceled"


def test_list_jobs_filters_and_paginates(client: TestClient, auth: dict[str, str]) -> None:
    ids = [
        client.post(
            "/v1/generations/text-to-image", json={"prompt": f"a red circle {i}", "steps": 1}, headers=auth
        ).json()["id"]
        for i in range(3)
    ]
    for job_id in ids:
        wait_for(client, job_id, auth)
    page = client.get("/v1/jobs", params={"limit": 2, "kind": "text-to-image"}, headers=auth).json()
    assert len(page["data"]) == 2 and page["next_cursor"]
    rest = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}, headers=auth).json()
    seen = [j["id"] for j in page["data"] + rest["data"]]
    assert seen == list(reversed(ids))
    assert client.get("/v1/jobs", params={"status": "queued"}, headers=auth).json()["data"] == []
    assert client.get("/v1/jobs", params={"status": "nonsense"}, headers=auth).status_code == 422
    assert client.get("/v1/jobs", params={"cursor": "garbage"}, headers=auth).status_code == 422


def test_failed_job_reports_error_without_traceback(
    client: TestClient, settings: Settings, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    """The API refuses a prompt over the model's token limit (tests/api/test_text_checks.py); one that reaches the
    worker all the same (a row written before that check existed) fails there with the reason."""
    job_id = insert_job(settings, tenant[0], {"prompt": " ".join(["circle"] * 100), "steps": 2})
    publish_job(make_celery(settings), job_id, "inference")
    job = wait_for(client, job_id, auth)
    assert job["state"] == "failed"
    assert job["error"]["code"] == "invalid_input"
    assert "tokens" in job["error"]["message"] and "Traceback" not in job["error"]["message"]


def test_outputs_belong_to_the_tenant(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    from tests.conftest import make_tenant

    job = wait_for(
        client,
        client.post("/v1/generations/text-to-image", json={"prompt": "a blue square", "steps": 2}, headers=auth).json()[
            "id"
        ],
        auth,
    )
    file_id = job["outputs"][0]["file_id"]
    _, other_key = make_tenant(settings)
    other = {"Authorization": f"Bearer {other_key}"}
    assert client.get(f"/v1/files/{file_id}", headers=other).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}", headers=other).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=other).status_code == 404
    with session_scope(settings.database_url) as session:
        row = session.get(StoredFile, file_id)
        assert row is not None and row.job_id == job["id"] and row.source == "output"


def test_worker_process_is_alive(worker: subprocess.Popen[bytes]) -> None:
    assert worker.poll() is None
