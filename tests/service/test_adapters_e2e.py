"""Personalization through the service with a real worker: train TI and LoRA, the adapter rows and files, use them
in a text-to-image job, the base model exactly as before afterwards, and a training job resumed after its worker
was killed."""

from __future__ import annotations

import io
import os
import signal
import subprocess

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load as load_safetensors

from models.generation import text_to_image
from models.shapes.world import Scene, ShapeObject, render
from tests.conftest import ZOO_MODEL, wait_for
from tests.service.test_durability import pool_children, wait_running
from worker.runtime import DevicePolicy, load_components

pytestmark = pytest.mark.usefixtures("worker")


def star_images() -> list[str]:
    """Three training images as base64 PNG data URLs."""
    import base64

    encoded = []
    for color in ("red", "blue", "green"):
        buffer = io.BytesIO()
        Image.fromarray(render(Scene((ShapeObject("star", color, "large", "center"),))).image).save(buffer, "PNG")
        encoded.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return encoded


def image_of(client: TestClient, job: dict, auth: dict[str, str]) -> np.ndarray:  # type: ignore[type-arg]
    response = client.get(job["outputs"][0]["url"], headers=auth)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def generate(client: TestClient, auth: dict[str, str], body: dict) -> dict:  # type: ignore[type-arg]
    created = client.post("/v1/generations/text-to-image", json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    return job


def train(client: TestClient, auth: dict[str, str], kind: str, **options: object) -> dict:  # type: ignore[type-arg]
    body = {"images": star_images(), "token": "<s1>", "class_word": "diamond", "steps": 4, "seed": 1, **options}
    created = client.post(f"/v1/trainings/{kind}", json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth, timeout=180)
    assert job["state"] == "succeeded", job
    return job


def test_train_use_and_leave_the_base_model_as_it_was(client: TestClient, auth: dict[str, str]) -> None:
    # 1. Two trainings make two adapter rows with their files, linked to their jobs.
    ti_job = train(client, auth, "textual-inversion", learning_rate=0.05, name="star (TI)", token="<s2>")
    lora_job = train(client, auth, "lora", learning_rate=0.02, rank=2, alpha=2.0)
    assert ti_job["progress"] == {"step": 4, "total": 4} and ti_job["metrics"]["steps"] == 4
    adapters = {}
    for job, kind in ((ti_job, "textual-inversion"), (lora_job, "lora")):
        adapter = client.get(f"/v1/adapters/{job['result']['adapter_id']}", headers=auth).json()
        token = "<s2>" if kind == "textual-inversion" else "<s1>"
        assert adapter["type"] == kind and adapter["job_id"] == job["id"] and adapter["tokens"] == [token]
        assert adapter["base_model"] == job["model"] and adapter["training"]["steps"] == 4
        data = client.get(adapter["download_url"], headers=auth).content
        assert len(data) == adapter["files"][0]["size_bytes"]
        adapters[kind] = (adapter, load_safetensors(data))
    assert adapters["textual-inversion"][0]["name"] == "star (TI)"
    assert list(adapters["textual-inversion"][1]) == ["<s2>"]
    assert all(key.startswith("unet.") for key in adapters["lora"][1])
    listed = client.get("/v1/adapters", params={"type": "lora"}, headers=auth).json()["data"]
    assert [a["id"] for a in listed] == [adapters["lora"][0]["id"]]

    # 2. A generation with the LoRA, then with the LoRA and the embedding together (one token each: a token names
    # one concept per job).
    probe = {"prompt": "a <s1> diamond at the center", "steps": 6, "seed": 5}
    with_lora = {**probe, "adapters": [{"id": adapters["lora"][0]["id"], "scale": 1.0}]}
    lora_gen = wait_for(
        client, client.post("/v1/generations/text-to-image", json=with_lora, headers=auth).json()["id"], auth
    )
    assert lora_gen["state"] == "succeeded", lora_gen
    both = {**probe, "prompt": "a <s1> <s2> diamond at the center"}
    both["adapters"] = [{"id": a["id"]} for a, _ in adapters.values()]
    both_gen = wait_for(
        client, client.post("/v1/generations/text-to-image", json=both, headers=auth).json()["id"], auth
    )
    assert both_gen["state"] == "succeeded", both_gen

    # 3. A base-model job afterwards gives the image a fresh worker gives (computed here on a freshly loaded model).
    base_job = wait_for(
        client, client.post("/v1/generations/text-to-image", json=probe, headers=auth).json()["id"], auth
    )
    assert base_job["state"] == "succeeded", base_job
    torch.set_num_threads(1)
    fresh = load_components(ZOO_MODEL, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))
    params = text_to_image.Params(prompt=probe["prompt"], steps=6)
    expected = np.asarray(text_to_image.run(fresh, params, generator=torch.Generator().manual_seed(5)).images[0])
    base = image_of(client, base_job, auth)
    assert np.array_equal(base, expected)
    assert not np.array_equal(image_of(client, lora_gen, auth), base)
    assert not np.array_equal(image_of(client, both_gen, auth), image_of(client, lora_gen, auth))

    # 4. Deleted: gone from the registry, and a new job naming it is refused.
    assert client.delete(f"/v1/adapters/{adapters['lora'][0]['id']}", headers=auth).status_code == 204
    refused = client.post("/v1/generations/text-to-image", json=with_lora, headers=auth)
    assert refused.status_code == 422 and "not found" in refused.json()["error"]["message"]


def test_training_resumes_from_its_checkpoint_after_the_worker_is_killed(
    client: TestClient, worker: subprocess.Popen[bytes], auth: dict[str, str]
) -> None:
    body = {
        "images": star_images(),
        "token": "<s1>",
        "class_word": "diamond",
        "steps": 60,
        "checkpoint_every": 5,
        "batch_size": 2,
        "seed": 2,
    }
    job_id = client.post("/v1/trainings/textual-inversion", json=body, headers=auth).json()["id"]
    wait_running(client, job_id, auth, min_step=12)  # past the checkpoints at 5 and 10
    for pid in pool_children(worker):
        os.kill(pid, signal.SIGKILL)
    job = wait_for(client, job_id, auth, timeout=240)
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    assert job["metrics"]["resumed_from"] >= 10 and job["metrics"]["resumed_from"] % 5 == 0
    adapter = client.get(f"/v1/adapters/{job['result']['adapter_id']}", headers=auth).json()
    assert adapter["job_id"] == job_id and adapter["metrics"]["resumed_from"] == job["metrics"]["resumed_from"]
