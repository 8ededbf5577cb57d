"""The adapter registry's API without a worker: import validated by content (nothing stored on a 422), list with
filters, get, download, delete, and the 422s of `adapters` on jobs and of training requests."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select

from store.adapters import save_adapter
from store.artifacts import LocalArtifactStore
from store.db import session_scope
from store.settings import Settings
from store.tables import Adapter, Job
from tests.conftest import ZOO_MODEL, make_tenant
from tests.images import b64, png_bytes

HIDDEN = 128  # the zoo text encoder's width
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"


def base_shape(name: str) -> list[int]:
    path = ZOO_MODEL / "unet" / "diffusion_pytorch_model.safetensors"
    with path.open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return list(header[f"{name}.weight"]["shape"])


def lora_file(rank: int = 2, a_in: int | None = None) -> bytes:
    out_features, in_features = base_shape(TO_Q)
    return save_safetensors(
        {
            f"unet.{TO_Q}.lora_A.weight": torch.randn(rank, a_in or in_features),
            f"unet.{TO_Q}.lora_B.weight": torch.zeros(out_features, rank),
        }
    )


def ti_file(token: str = "<imp>", width: int = HIDDEN, rows: int = 1) -> bytes:
    return save_safetensors({token: torch.randn(rows, width)})


def counts(settings: Settings, tenant_id: str) -> tuple[int, int]:
    """(adapter rows, adapter files on disk) of the tenant."""
    with session_scope(settings.database_url) as session:
        rows = session.scalar(select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant_id))
    folder = Path(settings.artifacts_dir) / tenant_id / "adapters"
    on_disk = sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
    return int(rows or 0), on_disk


def post(client: TestClient, auth: dict[str, str], data: bytes, type: str, **form: str):  # type: ignore[no-untyped-def]
    files = {"file": ("adapter.safetensors", data, "application/octet-stream")}
    return client.post("/v1/adapters", files=files, data={"type": type, **form}, headers=auth)


def pickled_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"<imp>": torch.zeros(1, HIDDEN)}, buffer)  # what a .pt/.bin embedding looks like (a pickle)
    return buffer.getvalue()


BAD_FILES = {
    "pickle": (lambda: pickled_checkpoint(), "textual-inversion", "not a valid safetensors"),
    "plain-pickle": (lambda: pickle.dumps({"a": 1}), "lora", "not a valid safetensors"),
    "truncated": (lambda: ti_file()[:-100], "textual-inversion", "not a valid safetensors"),
    "ti-width": (lambda: ti_file(width=HIDDEN + 1), "textual-inversion", "does not fit"),
    "ti-known-word": (lambda: ti_file(token="circle"), "textual-inversion", "already a word"),
    "ti-two-tensors": (
        lambda: save_safetensors({"<a>": torch.zeros(1, HIDDEN), "<b>": torch.zeros(1, HIDDEN)}),
        "textual-inversion",
        "one tensor",
    ),
    "lora-shape": (lambda: lora_file(a_in=7), "lora", "do not fit"),
    "lora-unknown-layer": (
        lambda: save_safetensors({"unet.nowhere.lora_A.weight": torch.zeros(2, 4)}),
        "lora",
        "no such layer",
    ),
    "lora-foreign-key": (lambda: save_safetensors({"model.diffusion.w": torch.zeros(2, 2)}), "lora", "not a LoRA"),
    "integer-tensor": (lambda: save_safetensors({"<i>": torch.zeros(1, HIDDEN, dtype=torch.int64)}), "lora", "float"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_import_is_422_and_stores_nothing(
    client: TestClient, settings: Settings, tenant: tuple[str, str], auth: dict[str, str], case: str
) -> None:
    make, type, message = BAD_FILES[case]
    response = post(client, auth, make(), type)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["details"][0]["field"] == "file"
    assert counts(settings, tenant[0]) == (0, 0)


def test_import_list_get_download_delete(
    client: TestClient, settings: Settings, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    embedding = ti_file(rows=2)
    imported = post(client, auth, embedding, "textual-inversion", name="my star")
    assert imported.status_code == 201, imported.text
    ti = imported.json()
    assert ti["type"] == "textual-inversion" and ti["tokens"] == ["<imp>"] and ti["name"] == "my star"
    assert ti["base_model"] == settings.default_model and ti["job_id"] is None
    assert ti["files"][0]["size_bytes"] == len(embedding)
    lora = post(client, auth, lora_file(), "lora", token="<trigger>")
    assert lora.status_code == 201, lora.text
    assert lora.json()["tokens"] == ["<trigger>"]

    listed = client.get("/v1/adapters", headers=auth).json()["data"]
    assert [a["id"] for a in listed] == [lora.json()["id"], ti["id"]]  # newest first
    only_lora = client.get("/v1/adapters", params={"type": "lora"}, headers=auth).json()["data"]
    assert [a["id"] for a in only_lora] == [lora.json()["id"]]
    other_model = client.get("/v1/adapters", params={"base_model": "another-model"}, headers=auth).json()["data"]
    assert other_model == []
    assert client.get("/v1/adapters", params={"type": "nonsense"}, headers=auth).status_code == 422

    assert client.get(f"/v1/adapters/{ti['id']}", headers=auth).json() == ti
    download = client.get(ti["download_url"], headers=auth)
    assert download.status_code == 200 and download.content == embedding

    assert client.delete(f"/v1/adapters/{ti['id']}", headers=auth).status_code == 204
    assert client.get(f"/v1/adapters/{ti['id']}", headers=auth).status_code == 404
    assert counts(settings, tenant[0]) == (1, 1)


def test_another_tenants_adapter_is_not_found(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    from tests.conftest import make_tenant

    _, other_key = make_tenant(settings)
    other = {"Authorization": f"Bearer {other_key}"}
    created = post(client, other, ti_file(token="<theirs>"), "textual-inversion").json()
    assert client.get(f"/v1/adapters/{created['id']}", headers=auth).status_code == 404
    assert client.delete(f"/v1/adapters/{created['id']}", headers=auth).status_code == 404
    body = {"prompt": "a red circle", "steps": 2, "adapters": [{"id": created["id"]}]}
    refused = client.post("/v1/generations/text-to-image", json=body, headers=auth)
    assert refused.status_code == 422 and refused.json()["error"]["details"][0]["field"] == "adapters[0].id"


def test_job_adapters_are_checked(
    client: TestClient, settings: Settings, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    with session_scope(settings.database_url) as session:
        foreign = save_adapter(
            session,
            LocalArtifactStore(settings.artifacts_dir),
            tenant_id=tenant[0],
            name="for another model",
            type="textual-inversion",
            tokens=["<x>"],
            base_model="some-other-model",
            data=ti_file(token="<x>"),
            training={},
            metrics={},
        ).id
    cases = {
        "missing": ([{"id": "adp_0123456789abcdef"}], "adapters[0].id", "not found"),
        "other base model": ([{"id": foreign}], "adapters[0].id", "trained for base model 'some-other-model'"),
        "bad id": ([{"id": "not-an-id"}], "adapters.0.id", "pattern"),
        "scale": ([{"id": foreign, "scale": 9}], "adapters.0.scale", "less than or equal"),
        "twice": ([{"id": foreign}, {"id": foreign}], "adapters", "once"),
    }
    for name, (adapters, field, message) in cases.items():
        body = {"prompt": "a red circle", "steps": 2, "adapters": adapters}
        response = client.post("/v1/generations/text-to-image", json=body, headers=auth)
        assert response.status_code == 422, (name, response.text)
        details = response.json()["error"]["details"]
        assert details[0]["field"] == field and message in details[0]["message"], (name, details)


def test_a_jobs_options_are_its_own_fields(client: TestClient, settings: Settings, auth: dict[str, str]) -> None:
    """Seed and adapters are stored in the job's own columns, not among the method's params; the job view shows
    them as fields, and in `params` as it always did."""
    imported = post(client, auth, ti_file(token="<opt>"), "textual-inversion").json()
    body = {"prompt": "a <opt>", "steps": 2, "seed": 5, "adapters": [{"id": imported["id"], "scale": 0.5}]}
    job = client.post("/v1/generations/text-to-image", json=body, headers=auth).json()
    applied = [{"id": imported["id"], "scale": 0.5, "type": "textual-inversion"}]
    assert (job["model"], job["seed"], job["adapters"]) == (settings.default_model, 5, applied)
    assert job["params"] == {
        "prompt": "a <opt>", "negative_prompt": "", "steps": 2, "guidance_scale": 7.5, "width": 64, "height": 64,
        "num_images": 1, "seed": 5, "adapters": applied,
    }  # fmt: skip
    with session_scope(settings.database_url) as session:
        row = session.get(Job, job["id"])
        assert row is not None
        assert (row.seed, row.adapters) == (5, applied)
        assert "seed" not in row.params and "adapters" not in row.params


def test_training_requests_are_checked(client: TestClient, auth: dict[str, str]) -> None:
    image = b64(png_bytes())
    good = {"images": [image] * 3, "token": "<s1>", "class_word": "diamond", "steps": 2}
    cases = {
        "two images": ({**good, "images": [image] * 2}, "images"),
        "eleven images": ({**good, "images": [image] * 11}, "images"),
        "token with a space": ({**good, "token": "my thing"}, "token"),
        "no token": ({k: v for k, v in good.items() if k != "token"}, "token"),
        "adapters": ({**good, "adapters": [{"id": "adp_00"}]}, "adapters"),
        "rank": ({**good, "rank": 0}, "rank"),
        "steps": ({**good, "steps": 0}, "steps"),
    }
    for name, (body, field) in cases.items():
        kind = "lora" if name == "rank" else "textual-inversion"
        response = client.post(f"/v1/trainings/{kind}", json=body, headers=auth)
        assert response.status_code == 422, (name, response.text)
        assert response.json()["error"]["details"][0]["field"] == field, (name, response.json())


def test_sdxl_adapters_are_checked_against_both_text_encoders(settings: Settings, tmp_path: Path) -> None:
    """On an SDXL model: an embedding of `clip_l` and `clip_g` (one per text encoder, each of its encoder's width)
    with its token given imports; without the token, with a wrong width, or in the one-encoder layout it is a 422,
    as the two-encoder layout is on an SD model. A LoRA may touch the second text encoder's layers too."""
    from api.main import create_app
    from tests.families import SDXL_WIDTHS, save_folder, sdxl_components

    components = sdxl_components()
    save_folder(components, tmp_path / "sdxl")
    (tmp_path / "zoo").symlink_to(ZOO_MODEL, target_is_directory=True)
    _, key = make_tenant(settings)
    auth = {"Authorization": f"Bearer {key}"}
    narrow, wide = SDXL_WIDTHS

    def embedding(first: int = narrow, second: int = wide, rows: int = 2) -> bytes:
        return save_safetensors({"clip_l": torch.randn(rows, first), "clip_g": torch.randn(rows, second)})

    layer = "text_model.encoder.layers.0.self_attn.q_proj"
    lora = save_safetensors(
        {
            f"text_encoder_2.{layer}.lora_A.weight": torch.randn(2, wide),
            f"text_encoder_2.{layer}.lora_B.weight": torch.zeros(wide, 2),
        }
    )
    with TestClient(create_app(settings.model_copy(update={"models_dir": tmp_path}))) as client:
        made = post(client, auth, embedding(), "textual-inversion", base_model="sdxl", token="<xl-star>")
        assert made.status_code == 201, made.text
        assert made.json()["tokens"] == ["<xl-star>"]
        assert post(client, auth, lora, "lora", base_model="sdxl").status_code == 201
        refused = {
            "no token": (embedding(), "sdxl", "token", "names no token"),
            "clip_g width": (embedding(second=wide + 1), "sdxl", "file", "does not fit"),
            "row counts": (
                save_safetensors({"clip_l": torch.randn(1, narrow), "clip_g": torch.randn(2, wide)}),
                "sdxl",
                "file",
                "same number of vectors",
            ),
            "one encoder": (ti_file(width=narrow), "sdxl", "file", "holds tensors clip_l and clip_g"),
            "on sd": (embedding(), "zoo", "file", "needs an SDXL base model"),
        }
        for case, (data, model, field, message) in refused.items():
            token = "" if case == "no token" else "<xl-moon>"
            response = post(client, auth, data, "textual-inversion", base_model=model, token=token)
            assert response.status_code == 422, (case, response.text)
            detail = response.json()["error"]["details"][0]
            assert detail["field"] == field and message in detail["message"], (case, detail)
        on_sd = post(client, auth, lora, "lora", base_model="zoo")
        assert on_sd.status_code == 422 and "no such layer" in on_sd.text
