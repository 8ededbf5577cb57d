"""Custom Diffusion through the service: two trainings, the closed-form merge job, a generation with the merged
adapter, the registry rows, and a merge of a non-custom-diffusion adapter refused as invalid input."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load as load_safetensors

from models.personalization.common import Adapter
from models.shapes.world import Scene, ShapeObject, render
from tests.conftest import wait_for


def png(shape: str, position: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render(Scene((ShapeObject(shape, "yellow", "large", position),))).image).save(buffer, "PNG")
    return buffer.getvalue()


def upload(client: TestClient, auth: dict[str, str], shape: str) -> list[str]:
    ids = []
    for position in ("center", "top left", "bottom right"):
        response = client.post("/v1/files", files={"file": ("x.png", png(shape, position), "image/png")}, headers=auth)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def run_job(client: TestClient, auth: dict[str, str], path: str, body: dict[str, Any]) -> dict[str, Any]:
    created = client.post(path, json=body, headers=auth)
    assert created.status_code == 201, created.text
    return wait_for(client, created.json()["id"], auth, timeout=240)


@pytest.mark.usefixtures("worker")
def test_custom_diffusion_train_merge_and_generate(client: TestClient, auth: dict[str, str]) -> None:
    common = {"class_word": "circle", "steps": 2, "num_class_images": 1, "class_steps": 2, "checkpoint_every": 1}
    adapters = []
    for token, shape in (("<st1>", "star"), ("<ht1>", "heart")):
        job = run_job(client, auth, "/v1/trainings/custom-diffusion",
                      {"images": upload(client, auth, shape), "token": token, **common})  # fmt: skip
        assert job["state"] == "succeeded", job
        assert job["progress"] == {"step": 2, "total": 2}
        adapters.append(job["result"]["adapter_id"])
        row = client.get(f"/v1/adapters/{adapters[-1]}", headers=auth).json()
        assert row["type"] == "custom-diffusion" and row["tokens"] == [token]
        # the stock-diffusers files come out as job outputs too: the attention processors, then the token
        assert len(job["outputs"]) == 2, job["outputs"]
        procs = client.get(f"/v1/files/{job['outputs'][0]['file_id']}", headers=auth)
        assert procs.status_code == 200
        assert any(key.endswith("to_k_custom_diffusion.weight") for key in load_safetensors(procs.content))

    merged_job = run_job(client, auth, "/v1/trainings/custom-diffusion-merge",
                         {"adapters": [{"id": a} for a in adapters], "regularization_captions": 16})  # fmt: skip
    assert merged_job["state"] == "succeeded", merged_job
    merged_id = merged_job["result"]["adapter_id"]
    downloaded = client.get(f"/v1/adapters/{merged_id}/download", headers=auth)
    assert downloaded.status_code == 200
    merged = Adapter.from_bytes(downloaded.content)
    assert merged.type == "custom-diffusion" and merged.tokens == ["<st1>", "<ht1>"]

    generated = run_job(client, auth, "/v1/generations/text-to-image",
                        {"prompt": "a <st1> circle and a <ht1> circle", "steps": 3,
                         "adapters": [{"id": merged_id, "scale": 1.0}]})  # fmt: skip
    assert generated["state"] == "succeeded", generated


@pytest.mark.usefixtures("worker")
def test_merge_of_a_perfusion_adapter_fails_as_invalid_input(client: TestClient, auth: dict[str, str]) -> None:
    ids = []
    for token, kind in (("<pq1>", "perfusion"), ("<cq1>", "custom-diffusion")):
        body = {"images": upload(client, auth, "star"), "token": token, "class_word": "circle", "steps": 1}
        if kind == "custom-diffusion":
            body |= {"num_class_images": 1, "class_steps": 1}
        job = run_job(client, auth, f"/v1/trainings/{kind}", body)
        assert job["state"] == "succeeded", job
        ids.append(job["result"]["adapter_id"])
    job = run_job(client, auth, "/v1/trainings/custom-diffusion-merge", {"adapters": [{"id": i} for i in ids]})
    assert job["state"] == "failed" and job["error"]["code"] == "invalid_input", job
    assert "custom-diffusion adapter" in job["error"]["message"]
