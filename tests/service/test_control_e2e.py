"""ControlNet, T2I-Adapter and GLIGEN through the real stack: API, database, broker and a Celery worker process,
with the untrained test control models (tests/control_models.py) beside the zoo model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.control.preprocess import preprocess
from models.shapes.world import Scene, ShapeObject, render
from tests.conftest import wait_for
from tests.control_models import ADAPTER, CONTROLNET, GLIGEN
from tests.service.test_editing_e2e_region import download, upload

pytestmark = pytest.mark.usefixtures("worker")

PHOTO = render(Scene((ShapeObject("square", "yellow", "large", "top left"),), "dark"), 64).image
PROMPT = "a large red circle at the bottom right"


def run(client: TestClient, auth: dict[str, str], route: str, body: dict[str, Any]) -> tuple[dict, list[np.ndarray]]:  # type: ignore[type-arg]
    created = client.post(route, json={"prompt": PROMPT, "steps": 4, "seed": 11, **body}, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    return job, [download(client, auth, output["file_id"]) for output in job["outputs"]]


def test_controlnet_from_a_photo_through_canny(client: TestClient, auth: dict[str, str]) -> None:
    """Upload a photo, name `canny`: the job writes the edge map it used beside the image; the control changes the
    image; scale 0 gives exactly the uncontrolled job's image."""
    photo = upload(client, auth, PHOTO)
    plain, (plain_image,) = run(client, auth, "/v1/generations/text-to-image", {})
    controls = [{"model": CONTROLNET, "condition": photo, "preprocessor": "canny"}]
    job, (image, condition) = run(client, auth, "/v1/generations/text-to-image", {"controls": controls})
    assert np.array_equal(condition, preprocess("canny", PHOTO))
    assert job["controls"][0]["condition"] == photo and not np.array_equal(image, plain_image)
    off = [{**controls[0], "scale": 0.0}]
    _, (off_image, _) = run(client, auth, "/v1/generations/text-to-image", {"controls": off})
    assert np.array_equal(off_image, plain_image)


def test_controlnet_and_t2i_adapter_in_one_sdedit_job(client: TestClient, auth: dict[str, str]) -> None:
    """Two controls on an edit: an inline base64 edge map for the ControlNet, a scribble for the adapter."""
    image = upload(client, auth, PHOTO)
    sketch = upload(client, auth, 255 - preprocess("canny", PHOTO))  # dark strokes on white paper
    _, (plain,) = run(client, auth, "/v1/edits/sdedit", {"image": image, "strength": 0.8})
    controls = [
        {"model": CONTROLNET, "condition": upload(client, auth, preprocess("canny", PHOTO)), "scale": 0.8},
        {"model": ADAPTER, "condition": sketch, "preprocessor": "scribble"},
    ]
    job, (edited, edges, strokes) = run(
        client, auth, "/v1/edits/sdedit", {"image": image, "strength": 0.8, "controls": controls}
    )
    assert [c["model"] for c in job["controls"]] == [CONTROLNET, ADAPTER]
    assert np.array_equal(strokes, preprocess("canny", PHOTO))  # the scribble binarizer inverts the paper
    assert np.array_equal(edges, preprocess("canny", PHOTO)) and not np.array_equal(edited, plain)


def test_gligen_grounding_changes_the_image_and_is_recorded(client: TestClient, auth: dict[str, str]) -> None:
    grounding = [{"phrase": "a red circle", "box": [0.5, 0.5, 1.0, 1.0]}]
    _, (plain,) = run(client, auth, "/v1/generations/text-to-image", {"model": GLIGEN})
    job, (grounded,) = run(
        client,
        auth,
        "/v1/generations/text-to-image",
        {"model": GLIGEN, "grounding": grounding, "grounding_fraction": 0.5},
    )
    assert job["grounding"] == {"boxes": grounding, "fraction": 0.5}
    assert not np.array_equal(grounded, plain)
