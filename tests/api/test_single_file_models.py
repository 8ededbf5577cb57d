"""Single-file checkpoints in the catalog, read from their safetensors headers alone: the released families' layouts
(real-size headers over sparse files, no weights) show their family, prediction type, native size and methods as
their folders would; pickled checkpoints are refused with a 422 and nothing stored; a corrupt or unknown file is
left out of the listing, and a job naming it is told why."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from fastapi.testclient import TestClient

from api.catalog import list_models
from models.common.components import Components
from store.settings import Settings
from tests.conftest import make_tenant
from tests.control_models import CONTROLNET
from tests.families import save_folder, sd2_v_components, sdxl_components
from tests.ldm_layout import save_single_file, to_ldm, write_header_only
from tests.models.test_single_file_loading import empty_family

CONDITION = "file_0123456789abcdef01234567"  # never read: the control model is refused first
# bundled config folder -> the released checkpoint it stands for, as diffusers' single-file loader classifies it
RELEASED = {"sd1": "v1", "sd2-v": "v2", "sdxl": "xl_base"}


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<family>.safetensors` headers of the released layouts, and an SD 2.x one marked epsilon by its sidecar."""
    out = tmp_path_factory.mktemp("released")
    for folder, kind in RELEASED.items():
        state = to_ldm(empty_family(folder), open_clip=folder.startswith("sd2"))
        assert infer_diffusers_model_type(state) == kind  # diffusers reads the same layout as ours
        write_header_only(state, out / f"{folder}.safetensors")
    (out / "sd2-base.safetensors").symlink_to(out / "sd2-v.safetensors")
    (out / "sd2-base.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    return out


def test_released_layouts_show_family_prediction_size_and_methods(released: Path) -> None:
    models = {m.name: m for m in list_models(released, "none")}
    shown = {name: (m.family, m.prediction_type, m.sample_size, m.unet_in_channels) for name, m in models.items()}
    assert shown == {
        "sd1": ("sd1", "epsilon", 512, 4),
        "sd2-v": ("sd2", "v_prediction", 768, 4),
        "sd2-base": ("sd2", "epsilon", 512, 4),
        "sdxl": ("sdxl", "epsilon", 1024, 4),
    }
    for model in models.values():
        assert {"unet", "text-to-image", "cross-attention"} <= set(model.capabilities), model.name
    assert "diffedit" in models["sd1"].methods and models["sd2-v"].methods == models["sd1"].methods
    assert set(models["sdxl"].methods) == {"text-to-image", "sdedit", "region-edit"}  # SDXL folders' rule


@pytest.mark.parametrize(
    ("make", "open_clip", "expected"),
    [(sd2_v_components, True, ("custom", "v_prediction", 32)), (sdxl_components, False, ("sdxl", "epsilon", 64))],
)
def test_a_tiny_file_reads_its_architecture_from_the_config_folder_it_names(
    tmp_path: Path, make: Callable[[], Components], open_clip: bool, expected: tuple[str, str, int]
) -> None:
    """A file of no released family's widths (the tiny fixtures) is listed as its folder is (SDXL's marks make it
    SDXL at any width); without a sidecar naming its configs it is listed with no methods."""
    components = make()
    save_folder(components, tmp_path / "tiny")
    save_folder(components, tmp_path / "tiny-configs", weights=False)
    save_single_file(components, tmp_path / "tiny-file.safetensors", open_clip=open_clip)
    save_single_file(components, tmp_path / "orphan.safetensors", open_clip=open_clip)
    (tmp_path / "tiny-file.json").write_text(json.dumps({"config": "tiny-configs"}))
    models = {m.name: m.model_dump() for m in list_models(tmp_path, "none")}
    folder, single = models["tiny"], models["tiny-file"]
    same = ("family", "prediction_type", "sample_size", "capabilities", "methods", "unet_in_channels")
    assert {k: single[k] for k in same} == {k: folder[k] for k in same}
    assert (single["family"], single["prediction_type"], single["sample_size"]) == expected
    assert models["orphan"]["family"] == expected[0]
    assert models["orphan"]["capabilities"] == [] and models["orphan"]["methods"] == []


def submit(settings: Settings, models_dir: Path, model: str) -> tuple[int, dict[str, Any], list[Any]]:
    """POST a text-to-image job on `model`: (status, body, the tenant's jobs afterwards)."""
    from api.main import create_app

    _, key = make_tenant(settings)
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings.model_copy(update={"models_dir": models_dir}))) as client:
        response = client.post("/v1/generations/text-to-image", json={"prompt": "a cat", "model": model}, headers=auth)
        jobs = client.get("/v1/jobs", headers=auth)
        assert jobs.status_code == 200, jobs.text
        return response.status_code, response.json(), jobs.json()["data"]


def only_detail(body: dict[str, Any]) -> str:
    (detail,) = body["error"]["details"]
    assert detail["field"] == "model"
    return str(detail["message"])


@pytest.mark.parametrize("model", ["old", "old.ckpt"])
def test_a_pickled_checkpoint_is_a_422_with_nothing_stored(settings: Settings, tmp_path: Path, model: str) -> None:
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04\x95pickle bytes")
    assert list_models(tmp_path, "none") == []
    status, body, jobs = submit(settings, tmp_path, model)
    assert status == 422, body
    assert only_detail(body) == (
        "pickled checkpoints are not loaded (unpickling can run code); convert old.ckpt to .safetensors"
    )
    assert jobs == []


def lora_like(path: Path) -> None:
    """A valid safetensors file that is no Stable Diffusion checkpoint (a LoRA's keys)."""
    from safetensors.torch import save_file

    save_file({"unet.down.lora_A.weight": torch.zeros(4, 8)}, str(path))


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("garbage", lambda p: p.write_bytes(b"\x00" * 3), "garbage.safetensors is too short to be a safetensors file"),
        ("notjson", lambda p: p.write_bytes((9).to_bytes(8, "little") + b"{not json"), "its header is not JSON"),
        ("lora", lora_like, "is not a Stable Diffusion checkpoint in the original layout"),
    ],
)
def test_a_corrupt_or_unknown_file_is_left_out_and_a_job_on_it_is_told_why(
    settings: Settings, released: Path, tmp_path: Path, name: str, make: Any, message: str
) -> None:
    (tmp_path / "sd1.safetensors").symlink_to(released / "sd1.safetensors")
    make(tmp_path / f"{name}.safetensors")
    assert [m.name for m in list_models(tmp_path, "none")] == ["sd1"]
    status, body, jobs = submit(settings, tmp_path, name)
    assert status == 422 and message in only_detail(body), body
    assert jobs == []


def test_a_truncated_file_or_a_bad_sidecar_is_told_why(settings: Settings, released: Path, tmp_path: Path) -> None:
    with (released / "sd1.safetensors").open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        handle.seek(0)
        (tmp_path / "cut.safetensors").write_bytes(handle.read(8 + length + 10))  # the header and 10 bytes of data
    (tmp_path / "odd.safetensors").symlink_to(released / "sd1.safetensors")
    (tmp_path / "odd.json").write_text(json.dumps({"prediction_type": "sample"}))
    assert list_models(tmp_path, "none") == []
    status, body, _ = submit(settings, tmp_path, "cut")
    assert status == 422 and "cut.safetensors is truncated" in only_detail(body), body
    status, body, _ = submit(settings, tmp_path, "odd")
    assert status == 422, body
    assert only_detail(body) == "odd.json: prediction_type must be epsilon or v_prediction, got 'sample'"
    (tmp_path / "odd.json").write_text(json.dumps({"config": "absent"}))
    status, body, _ = submit(settings, tmp_path, "odd")
    assert status == 422, body
    assert only_detail(body) == "the config folder 'absent' that odd.json names has no unet/ config"
    (tmp_path / "odd.json").write_text(json.dumps({"prediction_type": "v_prediction"}))  # SD 1.x has no v configs
    status, body, _ = submit(settings, tmp_path, "odd")
    assert status == 422 and only_detail(body).startswith("odd.safetensors has no bundled configs"), body


def test_a_single_file_model_takes_jobs_at_its_native_size(settings: Settings, released: Path) -> None:
    status, body, jobs = submit(settings, released, "sd2-v")
    assert status == 201, body
    assert (body["params"]["width"], body["params"]["height"]) == (768, 768) and body["model"] == "sd2-v"
    assert [job["id"] for job in jobs] == [body["id"]]


def test_adapter_imports_and_controls_on_a_single_file_base_are_422(settings: Settings, released: Path) -> None:
    """Adapter files are checked against a folder's diffusers-named layers, and a control model against a folder's
    UNet config: on a single-file base both are refused with a 422, nothing stored."""
    from safetensors.torch import save

    from api.main import create_app

    _, key = make_tenant(settings)
    auth = {"Authorization": f"Bearer {key}"}
    lora = save({"unet.a.lora_A.weight": torch.zeros(4, 8), "unet.a.lora_B.weight": torch.zeros(8, 4)})
    with TestClient(create_app(settings.model_copy(update={"models_dir": released}))) as client:
        files = {"file": ("adapter.safetensors", lora, "application/octet-stream")}
        response = client.post("/v1/adapters", files=files, data={"type": "lora", "base_model": "sd1"}, headers=auth)
        assert response.status_code == 422, response.text
        (detail,) = response.json()["error"]["details"]
        assert detail["field"] == "base_model" and "sd1 is a single-file checkpoint" in detail["message"]
        assert client.get("/v1/adapters", headers=auth).json()["data"] == []
        models_dir = released.parent / "with-control"
        models_dir.mkdir(exist_ok=True)
        (models_dir / "sd1.safetensors").symlink_to(released / "sd1.safetensors")
        (models_dir / CONTROLNET).symlink_to(settings.models_dir / CONTROLNET, target_is_directory=True)
    with TestClient(create_app(settings.model_copy(update={"models_dir": models_dir}))) as client:
        body = {"prompt": "a cat", "model": "sd1", "controls": [{"model": CONTROLNET, "condition": CONDITION}]}
        response = client.post("/v1/generations/text-to-image", json=body, headers=auth)
        assert response.status_code == 422, response.text
        (detail,) = response.json()["error"]["details"]
        assert detail["field"] == "controls[0].model"
        assert "controls on single-file base models are not supported yet" in detail["message"], detail
        assert client.get("/v1/jobs", headers=auth).json()["data"] == []
