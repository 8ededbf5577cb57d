"""A single-file checkpoint through the real stack (issue 12): the tiny SD 1.x-shaped model (tests/families.py) as one
`.safetensors` in the original layout, beside a folder of its configs, is listed by the API and loaded by a Celery
worker process; its text-to-image job makes the image the method makes in-process on the same weights and seed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from models.generation import text_to_image
from store.settings import Settings
from tests.conftest import wait_for
from tests.families import SD1_IMAGE_SIZE, save_folder, sd1_components
from tests.ldm_layout import save_single_file
from tests.service.test_editing_e2e_region import download

pytestmark = pytest.mark.usefixtures("worker")
NAME = "test-sd1-single-file"
PROMPT = "a large red circle at the center"


@pytest.fixture()
def single_file(settings: Settings) -> Iterator[str]:
    """`<NAME>.safetensors` and its sidecar naming `<NAME>-configs` (configs only) in the session's models directory,
    removed afterwards."""
    components = sd1_components(seed=0)
    configs = settings.models_dir / f"{NAME}-configs"
    save_folder(components, configs, weights=False)
    save_single_file(components, settings.models_dir / f"{NAME}.safetensors", open_clip=False)
    (settings.models_dir / f"{NAME}.json").write_text(json.dumps({"config": configs.name}))
    yield NAME
    for suffix in (".safetensors", ".json"):
        (settings.models_dir / f"{NAME}{suffix}").unlink()
    shutil.rmtree(configs)


def test_a_single_file_model_runs_text_to_image_as_in_process(
    client: TestClient, auth: dict[str, str], single_file: str
) -> None:
    listed = {m["name"]: m for m in client.get("/v1/models", headers=auth).json()}
    assert single_file in listed and "text-to-image" in listed[single_file]["methods"]
    body = {"model": single_file, "prompt": PROMPT, "steps": 3, "seed": 5}
    created = client.post("/v1/generations/text-to-image", json=body, headers=auth)
    assert created.status_code == 201, created.text
    assert created.json()["params"]["width"] == SD1_IMAGE_SIZE  # the native size, from its configs
    job = wait_for(client, created.json()["id"], auth)
    assert job["state"] == "succeeded", job.get("error")
    served = download(client, auth, job["outputs"][0]["file_id"])
    params = text_to_image.Params(PROMPT, steps=3)
    local = text_to_image.run(sd1_components(seed=0), params, generator=torch.Generator().manual_seed(5)).images[0]
    assert served.shape == (SD1_IMAGE_SIZE, SD1_IMAGE_SIZE, 3)
    assert np.abs(served - np.asarray(local, dtype=np.int16)).max() <= 1  # the worker's threads may round otherwise
