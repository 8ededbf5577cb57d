"""SDXL through the real stack (issue 12): the tiny SDXL-shaped model (tests/families.py) in the models directory,
loaded by a Celery worker process with both text encoders, runs text-to-image as it runs in-process (also with its
ControlNet, tests/control_models.py), and a region edit with an imported SDXL textual-inversion embedding; a method
SDXL does not run is refused before the worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save as save_safetensors

from models.control.controlnet import Control, condition_tensor
from models.control.preprocess import preprocess
from models.generation import text_to_image
from models.shapes.world import Scene, ShapeObject, render
from tests.conftest import wait_for
from tests.control_models import SDXL_CONTROLNET, SDXL_TINY, tiny_controlnet
from tests.families import SDXL_IMAGE_SIZE, SDXL_WIDTHS, sdxl_components
from tests.service.test_editing_e2e_region import download, upload

pytestmark = pytest.mark.usefixtures("worker")
PROMPT = "a large red circle at the center"


def succeeded(client: TestClient, auth: dict[str, str], route: str, body: dict[str, object]) -> np.ndarray:
    created = client.post(route, json={"model": SDXL_TINY, "steps": 3, "seed": 5, **body}, headers=auth)
    assert created.status_code == 201, created.text
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job
    return download(client, auth, job["outputs"][0]["file_id"])


def test_text_to_image_on_sdxl_is_the_in_process_run(client: TestClient, auth: dict[str, str]) -> None:
    """No size given: SDXL's native one; the worker's image equals the method run in-process on the same weights
    and seed (within 1/255: the worker's CPU threads may round differently)."""
    served = succeeded(client, auth, "/v1/generations/text-to-image", {"prompt": PROMPT, "guidance_scale": 5.0})
    assert served.shape == (SDXL_IMAGE_SIZE, SDXL_IMAGE_SIZE, 3)
    params = text_to_image.Params(PROMPT, steps=3, guidance_scale=5.0)
    local = text_to_image.run(sdxl_components(seed=0), params, generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(served - np.asarray(local, dtype=np.int16)).max() <= 1


def test_an_sdxl_controlnet_job_is_the_in_process_run(client: TestClient, auth: dict[str, str]) -> None:
    """An edge map for the SDXL model's ControlNet (with a scale and a step range): the worker's image equals the
    method run in-process with the same ControlNet, condition and seed (within 1/255), and the control changes it."""
    scene = Scene((ShapeObject("square", "blue", "large", "top left", "solid"),), "dark")
    edges = preprocess("canny", render(scene, SDXL_IMAGE_SIZE).image)
    controls = [{"model": SDXL_CONTROLNET, "condition": upload(client, auth, edges), "scale": 0.8, "end": 0.7}]
    served = succeeded(
        client, auth, "/v1/generations/text-to-image", {"prompt": PROMPT, "guidance_scale": 5.0, "controls": controls}
    )
    sdxl = sdxl_components(seed=0)
    condition = condition_tensor(Image.fromarray(edges), sdxl.device, sdxl.dtype)
    control = Control(tiny_controlnet(sdxl.unet, sdxl.vae_scale, seed=1), condition, scale=0.8, end=0.7)
    params = text_to_image.Params(PROMPT, steps=3, guidance_scale=5.0)
    local = text_to_image.run(sdxl, params, {"controls": [control]}, generator=torch.Generator().manual_seed(5))
    assert np.abs(served - np.asarray(local.images[0], dtype=np.int16)).max() <= 1
    plain = text_to_image.run(sdxl, params, generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(served - np.asarray(plain, dtype=np.int16)).max() > 8


def test_region_edit_with_an_imported_sdxl_embedding(client: TestClient, auth: dict[str, str]) -> None:
    """An SDXL embedding (clip_l, clip_g) imported for the model changes a region edit whose prompt calls its
    token; outside the mask the image is kept."""
    generator = torch.Generator().manual_seed(3)
    embedding = save_safetensors(
        {"clip_l": torch.randn(1, SDXL_WIDTHS[0], generator=generator) * 4,
         "clip_g": torch.randn(1, SDXL_WIDTHS[1], generator=generator) * 4}
    )  # fmt: skip
    files = {"file": ("xl-star.safetensors", embedding, "application/octet-stream")}
    form = {"type": "textual-inversion", "base_model": SDXL_TINY, "token": "<xl-star>"}
    imported = client.post("/v1/adapters", files=files, data=form, headers=auth)
    assert imported.status_code == 201, imported.text
    cells = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    photo = np.kron(cells, np.ones((8, 8, 1), dtype=np.uint8))
    mask = np.zeros((SDXL_IMAGE_SIZE, SDXL_IMAGE_SIZE), dtype=np.uint8)
    mask[:32, :32] = 255
    body = {"prompt": "a photo of <xl-star>", "image": upload(client, auth, photo), "mask": upload(client, auth, mask)}
    plain = succeeded(client, auth, "/v1/edits/region-edit", body)
    adapters = [{"id": imported.json()["id"]}]
    with_token = succeeded(client, auth, "/v1/edits/region-edit", {**body, "adapters": adapters})
    assert np.array_equal(with_token[40:, :], photo[40:, :].astype(np.int16))  # the mask grown by one cell
    assert np.abs(with_token[:32, :32] - plain[:32, :32]).max() > 8


def test_a_method_sdxl_does_not_run_never_reaches_the_worker(client: TestClient, auth: dict[str, str]) -> None:
    body = {"model": SDXL_TINY, "image": upload(client, auth, np.zeros((64, 64, 3), np.uint8)), "prompt": PROMPT}
    refused = client.post("/v1/edits/ddim-inversion", json=body, headers=auth)
    assert refused.status_code == 422, refused.text
    assert "is a sdxl model" in refused.json()["error"]["details"][0]["message"]
