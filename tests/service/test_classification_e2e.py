"""diffusion-classifier and the synthetic dataset through the service: one job of each end to end, and the 422s
naming the field, with nothing stored."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from models.shapes.world import Scene, ShapeObject, render
from store.db import session_scope
from store.settings import Settings
from store.tables import Job, StoredFile
from tests.conftest import wait_for
from tests.images import b64, png_bytes

COLOURS = ["red", "green", "blue"]
TEMPLATE = "a large {} circle at the center on a dark background"


def scene_png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render(Scene((ShapeObject("circle", colour, "large", "center"),), "dark")).image).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


@pytest.mark.usefixtures("worker")
def test_diffusion_classifier_end_to_end(client: TestClient, auth: dict[str, str]) -> None:
    """Two images (an upload and an inline one), class names with a template: one ranking per image, in order."""
    uploaded = client.post("/v1/files", files={"file": ("in.png", scene_png("red"), "image/png")}, headers=auth)
    assert uploaded.status_code == 201, uploaded.text
    body = {
        "images": [uploaded.json()["id"], b64(scene_png("blue"))],
        "class_names": COLOURS,
        "template": TEMPLATE,
        "samples_per_stage": [2, 4],
        "keep_per_stage": [2],
        "seed": 3,
    }
    created = client.post("/v1/classifications/diffusion-classifier", json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    per_image = 3 * 2 + 2 * 4
    assert job["progress"] == {"step": 2 * per_image, "total": 2 * per_image}
    assert job["outputs"] == [] and job["metrics"]["unet_evaluations"] == 2 * per_image
    result = job["result"]
    assert result["classes"] == COLOURS and result["unet_evaluations"] == 2 * per_image
    assert len(result["results"]) == 2
    for answer in result["results"]:
        ranking = answer["ranking"]
        assert sorted(item["class"] for item in ranking) == sorted(COLOURS)
        assert answer["predicted"] == ranking[0]["class"] and answer["unet_evaluations"] == per_image
        assert sum(item["score"] for item in ranking) == pytest.approx(1.0)
        assert ranking[0]["prompt"] == TEMPLATE.format(ranking[0]["class"])


@pytest.mark.usefixtures("worker")
def test_synthetic_dataset_end_to_end(client: TestClient, auth: dict[str, str]) -> None:
    """The archive comes back as an application/zip output whose labels file matches its images."""
    classes = [{"label": c, "prompt": TEMPLATE.format(c), "count": n} for c, n in (("red", 2), ("blue", 1))]
    body = {
        "classes": classes,
        "steps": 3,
        "pseudo_label": True,
        "pseudo_label_samples_per_stage": [2],
        "pseudo_label_keep_per_stage": [],
        "seed": 1,
    }
    created = client.post("/v1/datasets/synthetic", json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    assert len(job["outputs"]) == 1
    response = client.get(job["outputs"][0]["url"], headers=auth)
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        records = [json.loads(line) for line in archive.read("labels.jsonl").decode().splitlines()]
        assert sorted(archive.namelist()) == sorted([r["file"] for r in records] + ["labels.jsonl"])
        for record in records:
            assert Image.open(io.BytesIO(archive.read(record["file"]))).size == (64, 64)
    assert [r["label"] for r in records] == ["red", "red", "blue"]
    rate = sum(r["agrees"] for r in records) / 3
    assert job["result"]["agreement_rate"] == pytest.approx(rate, abs=1e-4) == job["metrics"]["agreement_rate"]
    assert job["result"]["images"] == 3 and job["progress"]["step"] == job["progress"]["total"]


# ------------------------------------------------------------------------------------------------
# Refused requests


def counts(settings: Settings, tenant_id: str) -> tuple[int, int, int]:
    """(job rows, file rows, artifact files) of the tenant."""
    with session_scope(settings.database_url) as session:
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))
        files = session.scalar(select(func.count()).select_from(StoredFile).where(StoredFile.tenant_id == tenant_id))
    folder = Path(settings.artifacts_dir) / tenant_id
    on_disk = sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
    return int(jobs or 0), int(files or 0), on_disk


@pytest.fixture()
def nothing_stored(settings: Settings, tenant: tuple[str, str]):  # type: ignore[no-untyped-def]
    yield
    assert counts(settings, tenant[0]) == (0, 0, 0)


IMAGE = b64(scene_png("red"))
CLASSIFY: dict[str, Any] = {"image": IMAGE, "class_names": COLOURS, "template": TEMPLATE}
DATASET: dict[str, Any] = {"classes": [{"label": c, "prompt": TEMPLATE.format(c), "count": 2} for c in COLOURS]}


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("classifications/diffusion-classifier", {"class_names": ["red"]}, "class_names"),
        ("classifications/diffusion-classifier", {"class_names": [f"c{i}" for i in range(101)]}, "class_names"),
        ("classifications/diffusion-classifier", {"prompts": ["a red circle"], "class_names": None}, "prompts"),
        ("classifications/diffusion-classifier", {"prompts": ["a", "b"]}, "template"),  # both given
        ("classifications/diffusion-classifier", {"class_names": None}, "template"),  # neither given
        ("classifications/diffusion-classifier", {"template": "a circle"}, "template"),
        ("classifications/diffusion-classifier", {"class_names": ["red", "red"]}, "template"),
        ("classifications/diffusion-classifier", {"images": [IMAGE]}, "images"),  # image and images
        ("classifications/diffusion-classifier", {"image": None}, "images"),  # neither
        ("classifications/diffusion-classifier", {"image": None, "images": []}, "images"),
        ("classifications/diffusion-classifier", {"image": None, "images": [IMAGE] * 17}, "images"),
        ("classifications/diffusion-classifier", {"samples_per_stage": [0]}, "samples_per_stage.0"),
        ("classifications/diffusion-classifier", {"samples_per_stage": [1] * 5}, "samples_per_stage"),
        ("classifications/diffusion-classifier", {"samples_per_stage": [600, 600]}, "samples_per_stage"),
        (
            "classifications/diffusion-classifier",
            {"samples_per_stage": [4, 28], "keep_per_stage": []},
            "keep_per_stage",
        ),
        (
            "classifications/diffusion-classifier",
            {"samples_per_stage": [1, 1, 1], "keep_per_stage": [1, 2]},
            "keep_per_stage",
        ),
        (
            "classifications/diffusion-classifier",
            {"class_names": [f"c{i}" for i in range(100)], "samples_per_stage": [300], "keep_per_stage": []},
            "keep_per_stage",
        ),  # 30,000 UNet evaluations per image
        ("classifications/diffusion-classifier", {"t_min": 600, "t_max": 500}, "t_max"),
        ("classifications/diffusion-classifier", {"t_max": 1001}, "t_max"),
        ("classifications/diffusion-classifier", {"error_weighting": "l1"}, "error_weighting"),
        ("classifications/diffusion-classifier", {"batch_size": 0}, "batch_size"),
        ("classifications/diffusion-classifier", {"seed": -1}, "seed"),
        ("datasets/synthetic", {"classes": []}, "classes"),
        ("datasets/synthetic", {"classes": [{"label": "a", "prompt": "a red circle", "count": 0}]}, "classes.0.count"),
        (
            "datasets/synthetic",
            {"classes": [{"label": "a", "prompt": "a red circle", "count": 501}]},
            "classes.0.count",
        ),
        ("datasets/synthetic", {"classes": [{"label": "a", "prompt": ""}]}, "classes.0.prompt"),
        (
            "datasets/synthetic",
            {"classes": [{"label": f"c{i}", "prompt": "x", "count": 500} for i in range(5)]},
            "classes",
        ),
        ("datasets/synthetic", {"classes": [{"label": "a", "prompt": "x", "count": 1}] * 2}, "classes"),
        ("datasets/synthetic", {"classes": DATASET["classes"][:1], "pseudo_label": True}, "pseudo_label"),
        (
            "datasets/synthetic",
            {"pseudo_label_samples_per_stage": [4, 12], "pseudo_label_keep_per_stage": []},
            "pseudo_label_keep_per_stage",
        ),
        ("datasets/synthetic", {"steps": 0}, "steps"),
        ("datasets/synthetic", {"width": 60}, "width"),
        ("datasets/synthetic", {"guidance_scale": 0.5}, "guidance_scale"),
        ("datasets/synthetic", {"labels": ["x"]}, "labels"),  # unknown field
    ],
)
def test_bad_parameters_are_422_naming_the_field(
    client: TestClient, auth: dict[str, str], path: str, body: dict[str, Any], field: str
) -> None:
    valid = CLASSIFY if path.startswith("classifications") else DATASET
    request = {k: v for k, v in {**valid, **body}.items() if v is not None}  # None: leave the field out
    response = client.post(f"/v1/{path}", json=request, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert any(detail["field"] == field for detail in error["details"]), error


@pytest.mark.usefixtures("nothing_stored")
def test_a_bad_image_in_the_list_is_refused(client: TestClient, auth: dict[str, str]) -> None:
    body = {**CLASSIFY, "image": None, "images": [IMAGE, b64(b"plain text")]}
    response = client.post(
        "/v1/classifications/diffusion-classifier", json={k: v for k, v in body.items() if v}, headers=auth
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_image"
    assert "images[1]" in response.json()["error"]["message"]
    odd = {**CLASSIFY, "image": b64(png_bytes(60, 64))}
    response = client.post("/v1/classifications/diffusion-classifier", json=odd, headers=auth)
    assert response.status_code == 422 and "multiples of 8" in response.json()["error"]["message"]
