"""ddim-inversion, ddib and diffedit through the service: a diffedit job end to end, and the 422s naming the field."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.shapes.world import Scene, ShapeObject, caption, render
from tests.conftest import wait_for
from tests.images import b64

SCENE = Scene((ShapeObject("circle", "red", "large", "center"),), "dark")
REFERENCE = caption(SCENE)  # "a large red circle at the center on a dark background"
QUERY = REFERENCE.replace("circle", "square")


def scene_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render(SCENE).image).save(buffer, format="PNG")
    return buffer.getvalue()


def download(client: TestClient, file_id: str, auth: dict[str, str]) -> Image.Image:
    response = client.get(f"/v1/files/{file_id}", headers=auth)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


@pytest.mark.usefixtures("worker")
def test_diffedit_end_to_end(client: TestClient, auth: dict[str, str]) -> None:
    """Upload, submit, wait: the edited image and the binary mask come back as files, with progress and metrics."""
    uploaded = client.post("/v1/files", files={"file": ("in.png", scene_png(), "image/png")}, headers=auth)
    assert uploaded.status_code == 201, uploaded.text
    body = {
        "image": uploaded.json()["id"],
        "reference_prompt": REFERENCE,
        "query_prompt": QUERY,
        "steps": 10,
        "encoding_ratio": 0.5,
        "n_mask_samples": 4,
        "seed": 7,
    }
    created = client.post("/v1/edits/diffedit", json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    assert job["progress"] == {"step": 4 + 2 * 5, "total": 14}  # mask samples, encoding, decoding
    assert job["metrics"]["encoding_steps"] == 5 and 0 < job["metrics"]["mask_fraction"] <= 1
    assert len(job["outputs"]) == 2  # image-0.png, then mask.png
    edited, mask = (download(client, output["file_id"], auth) for output in job["outputs"])
    assert edited.size == mask.size == (64, 64) and edited.mode == "RGB"
    values = np.asarray(mask.convert("L"))
    assert set(np.unique(values)) <= {0, 255}
    assert (values == 255).mean() == pytest.approx(job["metrics"]["mask_fraction"], abs=1e-3)


def test_methods_listed(client: TestClient, auth: dict[str, str]) -> None:
    listed = {m["kind"]: m for m in client.get("/v1/methods", headers=auth).json()}
    for kind in ("ddim-inversion", "ddib", "diffedit"):
        assert listed[kind]["route"] == f"/v1/edits/{kind}" and listed[kind]["image_fields"] == ["image"]


IMAGE = b64(scene_png())


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("ddim-inversion", {"steps": 0}, "steps"),
        ("ddim-inversion", {"steps": 201}, "steps"),
        ("ddim-inversion", {"guidance_scale": 0.5}, "guidance_scale"),
        ("ddim-inversion", {"prompt": "x" * 1001}, "prompt"),
        ("ddim-inversion", {"image": None}, "image"),
        ("ddim-inversion", {"strength": 0.5}, "strength"),
        ("ddib", {"target_prompt": None}, "target_prompt"),
        ("ddib", {"source_prompt": ""}, "source_prompt"),
        ("ddib", {"guidance_scale": 31}, "guidance_scale"),
        ("diffedit", {"encoding_ratio": 0}, "encoding_ratio"),
        ("diffedit", {"encoding_ratio": 1.5}, "encoding_ratio"),
        ("diffedit", {"mask_threshold": 0}, "mask_threshold"),
        ("diffedit", {"n_mask_samples": 0}, "n_mask_samples"),
        ("diffedit", {"n_mask_samples": 65}, "n_mask_samples"),
        ("diffedit", {"mask_dilation": -1}, "mask_dilation"),
        ("diffedit", {"query_prompt": None}, "query_prompt"),
        ("diffedit", {"reference_prompt": "x" * 1001}, "reference_prompt"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(
    client: TestClient, auth: dict[str, str], path: str, body: dict[str, object], field: str
) -> None:
    valid: dict[str, dict[str, object]] = {
        "ddim-inversion": {"image": IMAGE, "prompt": REFERENCE},
        "ddib": {"image": IMAGE, "source_prompt": REFERENCE, "target_prompt": QUERY},
        "diffedit": {"image": IMAGE, "reference_prompt": REFERENCE, "query_prompt": QUERY},
    }
    request = {**valid[path], **body}
    request = {k: v for k, v in request.items() if v is not None}  # None: leave the field out
    response = client.post(f"/v1/edits/{path}", json=request, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert any(detail["field"] == field for detail in error["details"]), error
