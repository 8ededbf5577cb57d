"""imagic through the service: a job on the training queue end to end, a cancel during fine-tuning that leaves the
worker's cached model as it was, and the 422s naming the field."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.shapes.world import Scene, ShapeObject, caption, render
from tests.conftest import wait_for
from tests.images import b64

SCENE = Scene((ShapeObject("circle", "red", "large", "center"),), "dark")
TARGET = caption(SCENE).replace("red", "blue")  # "a large blue circle at the center on a dark background"
TINY = {"embedding_steps": 3, "finetune_steps": 3, "steps": 4}


def scene_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render(SCENE).image).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = b64(scene_png())


def output_bytes(client: TestClient, job: dict[str, Any], auth: dict[str, str]) -> list[bytes]:
    contents = []
    for output in job["outputs"]:
        response = client.get(f"/v1/files/{output['file_id']}", headers=auth)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        contents.append(response.content)
    return contents


def run_job(client: TestClient, auth: dict[str, str], body: dict[str, object]) -> dict[str, Any]:
    created = client.post("/v1/edits/imagic", json=body, headers=auth)
    assert created.status_code == 201, created.text
    return wait_for(client, created.json()["id"], auth, timeout=240)


@pytest.mark.usefixtures("worker")
def test_imagic_end_to_end_and_cancel_leaves_the_cached_model(client: TestClient, auth: dict[str, str]) -> None:
    """A tiny job succeeds with one image per eta; a job canceled while it fine-tunes stops there; the same
    tiny job afterwards gives byte-identical images, so the worker's cached UNet was not changed."""
    listed = {m["kind"]: m for m in client.get("/v1/methods", headers=auth).json()}
    assert listed["imagic"]["queue"] == "training" and listed["imagic"]["route"] == "/v1/edits/imagic"

    body = {"image": IMAGE, "target_prompt": TARGET, "etas": [0.0, 1.0], "seed": 5, **TINY}
    job = run_job(client, auth, body)
    assert job["state"] == "succeeded", job
    assert job["progress"] == {"step": 3 + 3 + 2 * 4, "total": 14}
    assert job["result"] == {"etas": [0.0, 1.0]}
    assert {"embedding_loss_last", "finetune_loss_last", "embedding_relative_change"} <= set(job["metrics"])
    first = output_bytes(client, job, auth)
    assert len(first) == 2
    for content in first:
        assert Image.open(io.BytesIO(content)).size == (64, 64)

    # Cancel in stage B (a large learning rate: had it touched the cached model, the rerun would differ)
    long_body = {**body, "etas": 0.8, "embedding_steps": 2, "finetune_steps": 5000, "finetune_lr": 1e-2}
    created = client.post("/v1/edits/imagic", json=long_body, headers=auth)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    deadline = time.time() + 120
    while time.time() < deadline:
        state = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
        if state["state"] == "running" and state["progress"] and state["progress"]["step"] >= 5:
            break
        time.sleep(0.05)
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    canceled = wait_for(client, job_id, auth, timeout=60)
    assert canceled["state"] == "canceled", canceled
    assert 2 < canceled["progress"]["step"] < 2 + 5000 and canceled["outputs"] == []

    again = run_job(client, auth, body)
    assert again["state"] == "succeeded", again
    assert output_bytes(client, again, auth) == first


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"target_prompt": None}, "target_prompt"),
        ({"target_prompt": ""}, "target_prompt"),
        ({"etas": []}, "etas"),
        ({"etas": [0.5] * 9}, "etas"),
        ({"etas": -0.1}, "etas"),
        ({"etas": [0.5, 2.5]}, "etas"),
        ({"embedding_steps": -1}, "embedding_steps"),
        ({"embedding_steps": 2001}, "embedding_steps"),
        ({"finetune_steps": 5001}, "finetune_steps"),
        ({"embedding_lr": 0}, "embedding_lr"),
        ({"finetune_lr": 0.5}, "finetune_lr"),
        ({"steps": 0}, "steps"),
        ({"steps": 201}, "steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"image": None}, "image"),
        ({"alpha": 0.5}, "alpha"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(
    client: TestClient, auth: dict[str, str], body: dict[str, object], field: str
) -> None:
    request = {**{"image": IMAGE, "target_prompt": TARGET}, **body}
    request = {k: v for k, v in request.items() if v is not None}  # None: leave the field out
    response = client.post("/v1/edits/imagic", json=request, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert any(detail["field"].split(".")[0] == field for detail in error["details"]), error  # "etas.1": its item
