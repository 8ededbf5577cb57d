"""instruct-pix2pix through the service: one job end to end on zoo/shapes-ip2p-tiny, and the 422s naming the field."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.shapes.world import Scene, ShapeObject, render
from tests.conftest import wait_for
from tests.images import b64

MODEL = "shapes-ip2p-tiny"
SCENE = Scene((ShapeObject("circle", "red", "large", "center"),), "light")


def scene_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render(SCENE).image).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = b64(scene_png())


@pytest.mark.usefixtures("worker")
def test_instruct_pix2pix_end_to_end(client: TestClient, auth: dict[str, str]) -> None:
    """Submit without naming a model (the server picks the one with the capability, since the default lacks it),
    wait: one edited image of the input's size, progress per step."""
    body = {"image": IMAGE, "instruction": "make the circle blue", "steps": 6, "seed": 3}
    created = client.post("/v1/edits/instruct-pix2pix", json=body, headers=auth)
    assert created.status_code == 201, created.text
    assert created.json()["model"] == MODEL
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    assert job["progress"] == {"step": 6, "total": 6}
    assert job["metrics"]["image_guidance_scale"] == 1.5 and job["metrics"]["guidance_scale"] == 7.5
    assert len(job["outputs"]) == 1
    response = client.get(f"/v1/files/{job['outputs'][0]['file_id']}", headers=auth)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    edited = Image.open(io.BytesIO(response.content))
    assert edited.size == (64, 64)


def test_listed_with_its_requirement(client: TestClient, auth: dict[str, str]) -> None:
    listed = {m["kind"]: m for m in client.get("/v1/methods", headers=auth).json()}
    method = listed["instruct-pix2pix"]
    assert method["route"] == "/v1/edits/instruct-pix2pix" and method["requires"] == ["instruct-pix2pix"]
    models = {m["name"]: m for m in client.get("/v1/models", headers=auth).json()}
    assert "instruct-pix2pix" in models[MODEL]["capabilities"] and models[MODEL]["unet_in_channels"] == 8


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "shapes-sd-tiny"}, "model"),
        ({"instruction": None}, "instruction"),
        ({"instruction": ""}, "instruction"),
        ({"instruction": "x" * 1001}, "instruction"),
        ({"image": None}, "image"),
        ({"steps": 0}, "steps"),
        ({"steps": 201}, "steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"guidance_scale": 31}, "guidance_scale"),
        ({"image_guidance_scale": 0.9}, "image_guidance_scale"),
        ({"image_guidance_scale": 31}, "image_guidance_scale"),
        ({"strength": 0.5}, "strength"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(
    client: TestClient, auth: dict[str, str], body: dict[str, object], field: str
) -> None:
    request = {"model": MODEL, "image": IMAGE, "instruction": "make the circle blue", **body}
    request = {k: v for k, v in request.items() if v is not None}  # None: leave the field out
    response = client.post("/v1/edits/instruct-pix2pix", json=request, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert any(detail["field"] == field for detail in error["details"]), error
