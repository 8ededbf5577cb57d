"""region-edit through the real stack: API, database, broker and a Celery worker process."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.shapes.world import Scene, ShapeObject, render
from tests.conftest import wait_for

pytestmark = pytest.mark.usefixtures("worker")

SCENE = Scene(
    (ShapeObject("square", "red", "large", "top left"), ShapeObject("circle", "green", "small", "bottom right")),
    "light",
)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client: TestClient, auth: dict[str, str], array: np.ndarray) -> str:
    response = client.post("/v1/files", files={"file": ("in.png", png(array), "image/png")}, headers=auth)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def download(client: TestClient, auth: dict[str, str], file_id: str) -> np.ndarray:
    response = client.get(f"/v1/files/{file_id}", headers=auth)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def first_object_mask(size: int = 64) -> np.ndarray:
    return (render(SCENE, size).masks[0] * 255).astype(np.uint8)


def test_region_edit_end_to_end_sparse_and_dense(client: TestClient, auth: dict[str, str]) -> None:
    """Upload image and mask, run the job sparse and dense: outside the region exactly the input, both ways.
    How close sparse is to dense inside is the model test's business (tests/models/test_region_edit.py)."""
    image = render(SCENE).image
    body = {
        "image": upload(client, auth, image),
        "mask": upload(client, auth, first_object_mask()),
        "prompt": "a large blue circle at the top left and a small green circle at the bottom right",
        "strength": 0.6,
        "steps": 10,
        "seed": 3,
    }
    results = {}
    for sparse in (True, False):
        created = client.post("/v1/edits/region-edit", json={**body, "sparse": sparse}, headers=auth)
        assert created.status_code == 201, created.text
        job = wait_for(client, created.json()["id"], auth)
        assert job["state"] == "succeeded", job
        assert job["progress"] == {"step": 6, "total": 6}  # round(10 * 0.6)
        assert len(job["outputs"]) == 2  # the edit and the region it edited
        assert job["metrics"]["sparse"] == int(sparse) and job["metrics"]["denoising_steps"] == 6
        edited, region = (download(client, auth, o["file_id"]) for o in job["outputs"])
        inside = region[:, :, 0] > 0
        assert inside[first_object_mask() > 0].all() and not inside.all()
        assert np.array_equal(edited[~inside], image[~inside])
        results[sparse] = edited
    assert not np.array_equal(results[True], image)  # the region was edited


def test_a_mask_of_another_size_is_a_422_and_stores_no_job(client: TestClient, auth: dict[str, str]) -> None:
    body = {
        "image": upload(client, auth, render(SCENE).image),
        "mask": upload(client, auth, np.full((32, 32), 255, dtype=np.uint8)),
        "prompt": "a blue circle",
    }
    response = client.post("/v1/edits/region-edit", json=body, headers=auth)
    assert response.status_code == 422
    assert "mask is 32x32, the image is 64x64" in response.json()["error"]["message"]
    assert client.get("/v1/jobs", params={"kind": "region-edit", "status": "queued"}, headers=auth).json()["data"] == []


@pytest.mark.parametrize(("mask", "message"), [(np.zeros((64, 64), dtype=np.uint8), "mask has no white pixels")])
def test_a_bad_mask_fails_the_job_with_invalid_input(
    client: TestClient, auth: dict[str, str], mask: np.ndarray, message: str
) -> None:
    """An all-black mask passes the API (it would have to decode the image to know) and fails the job."""
    body = {
        "image": upload(client, auth, render(SCENE).image),
        "mask": upload(client, auth, mask),
        "prompt": "a blue circle",
        "steps": 4,
    }
    created = client.post("/v1/edits/region-edit", json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "failed" and job["outputs"] == []
    assert job["error"]["code"] == "invalid_input" and message in job["error"]["message"]


def test_region_edit_request_is_validated_at_the_api(client: TestClient, auth: dict[str, str]) -> None:
    image = upload(client, auth, render(SCENE).image)
    for body, field in (
        ({"image": image, "prompt": "a blue circle"}, "mask"),
        ({"image": image, "mask": image, "prompt": "a blue circle", "strength": 0}, "strength"),
        ({"image": image, "mask": image, "prompt": "a blue circle", "sparse": [1]}, "sparse"),
    ):
        response = client.post("/v1/edits/region-edit", json=body, headers=auth)
        assert response.status_code == 422, response.text
        assert any(d["field"] == field for d in response.json()["error"]["details"]), response.json()
    listed = {m["kind"]: m for m in client.get("/v1/methods", headers=auth).json()}
    method = listed["region-edit"]
    assert method["route"] == "/v1/edits/region-edit" and method["image_fields"] == ["image", "mask"]
    assert method["parameters"]["properties"]["sparse"]["default"] is True
