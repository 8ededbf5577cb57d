"""prompt-to-prompt through the service: a generated pair and a real-image edit end to end, the route in
OpenAPI and /v1/methods, the 422s naming the field, and the worker-side token check as a failed job."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.shapes.world import Scene, ShapeObject, caption, render
from tests.conftest import wait_for

ROUTE = "/v1/edits/prompt-to-prompt"
SCENE = Scene((ShapeObject("circle", "red", "large", "center"),), "dark")
SOURCE = caption(SCENE)  # "a large red circle at the center on a dark background"
TARGET = SOURCE.replace("red", "blue")


def download(client: TestClient, file_id: str, auth: dict[str, str]) -> Image.Image:
    response = client.get(f"/v1/files/{file_id}", headers=auth)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def scene_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render(SCENE).image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.usefixtures("worker")
def test_generated_pair_with_local_blend_end_to_end(client: TestClient, auth: dict[str, str]) -> None:
    """[source, edited] plus the blend mask come back as files, with per-step progress and the metrics."""
    body = {"source_prompt": SOURCE, "target_prompt": TARGET, "steps": 8, "seed": 3, "local_blend_words": ["blue"]}
    created = client.post(ROUTE, json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    assert job["progress"] == {"step": 8, "total": 8}
    assert job["metrics"]["mode"] == "replace" and job["metrics"]["cross_replace_steps"] == 6
    assert job["metrics"]["inversion"] == "none"
    assert len(job["outputs"]) == 3  # image-0 (source), image-1 (edited), local_blend_mask
    source, edited, mask = (download(client, output["file_id"], auth) for output in job["outputs"])
    assert source.size == edited.size == mask.size == (64, 64)
    assert set(np.unique(np.asarray(mask.convert("L"))).tolist()) <= {0, 255}


@pytest.mark.usefixtures("worker")
def test_real_image_reweight_end_to_end(client: TestClient, auth: dict[str, str]) -> None:
    """An uploaded image is inverted (DDIM, then null-text) before the edit: progress counts all three phases."""
    uploaded = client.post("/v1/files", files={"file": ("in.png", scene_png(), "image/png")}, headers=auth)
    assert uploaded.status_code == 201, uploaded.text
    body = {
        "image": uploaded.json()["id"],
        "source_prompt": SOURCE,
        "target_prompt": SOURCE,
        "mode": "reweight",
        "reweight_token": "red",
        "reweight_factor": 2.0,
        "steps": 6,
        "null_text_steps": 2,
    }
    job = wait_for(client, client.post(ROUTE, json=body, headers=auth).json()["id"], auth)
    assert job["state"] == "succeeded", job
    assert job["progress"] == {"step": 18, "total": 18}  # inversion, null-text optimisation, sampling
    assert job["metrics"]["inversion"] == "null-text"
    images = [download(client, output["file_id"], auth) for output in job["outputs"]]
    assert [image.size for image in images] == [(64, 64), (64, 64)]


def test_route_is_documented_and_listed(client: TestClient, auth: dict[str, str]) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"][ROUTE]["post"]
    assert operation["operationId"] == "create_prompt_to_prompt" and "edits" in operation["tags"]
    kinds = {method["kind"] for method in client.get("/v1/methods", headers=auth).json()}
    assert "prompt-to-prompt" in kinds


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"mode": "reweight"}, "body", "reweight_token is required in mode 'reweight'"),
        ({"mode": "reweight", "reweight_token": "green"}, "body", "'green' is not a word of target_prompt"),
        ({"local_blend_words": ["square"]}, "body", "'square' is a word of neither prompt"),
        ({"target_prompt": "a large blue circle"}, "body", "the prompts need as many words"),
        ({"mode": "swap"}, "mode", "Input should be 'replace', 'refine' or 'reweight'"),
        ({"cross_replace_fraction": 1.5}, "cross_replace_fraction", "less than or equal to 1"),
        ({"reweight_token": "two words"}, "reweight_token", "should match pattern"),
        ({"null_text_steps": 51}, "null_text_steps", "less than or equal to 50"),
        ({"image": ""}, "image", "at least 1 character"),
        ({"tau": 0.5}, "tau", "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_422_naming_the_field(
    client: TestClient, auth: dict[str, str], change: dict[str, object], field: str, message: str
) -> None:
    response = client.post(ROUTE, json={"source_prompt": SOURCE, "target_prompt": TARGET, **change}, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"][0]["field"] == field and message in error["details"][0]["message"], error


@pytest.mark.usefixtures("worker")
def test_unequal_token_counts_fail_the_job_with_the_reason(client: TestClient, auth: dict[str, str]) -> None:
    """As many words, but a word outside the tokenizer's vocabulary takes several tokens: only the worker,
    which has the tokenizer, can tell; the job fails as invalid_input naming both counts."""
    body = {"source_prompt": SOURCE, "target_prompt": SOURCE.replace("red", "zzyzx"), "steps": 2}
    job = wait_for(client, client.post(ROUTE, json=body, headers=auth).json()["id"], auth)
    assert job["state"] == "failed" and job["error"]["code"] == "invalid_input"
    assert "equal token counts" in job["error"]["message"] and "use mode 'refine'" in job["error"]["message"]
