"""Every bad input gets a clear error and leaves no row and no file behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from store.db import session_scope
from store.settings import Settings
from store.tables import Job, StoredFile
from tests.images import b64, bomb_png, encoded, png_bytes


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


def upload(client: TestClient, auth: dict[str, str], data: bytes, name: str = "x.png", ctype: str = "image/png"):  # type: ignore[no-untyped-def]
    return client.post("/v1/files", files={"file": (name, data, ctype)}, headers=auth)


@pytest.mark.usefixtures("nothing_stored")
class TestUploadsRefused:
    def test_not_an_image(self, client: TestClient, auth: dict[str, str]) -> None:
        response = upload(client, auth, b"hello, I am text pretending to be a PNG")
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_image"

    def test_truncated_image(self, client: TestClient, auth: dict[str, str]) -> None:
        data = png_bytes(256, 256)
        response = upload(client, auth, data[: len(data) // 2])
        assert response.status_code == 422
        assert "truncated" in response.json()["error"]["message"] or "readable" in response.json()["error"]["message"]

    def test_unsupported_format_by_content_not_name(self, client: TestClient, auth: dict[str, str]) -> None:
        gif = encoded(png_bytes(), "GIF")
        response = upload(client, auth, gif, name="looks-like.png", ctype="image/png")
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "unsupported_image"
        assert "GIF" in response.json()["error"]["message"]

    def test_decompression_bomb_is_refused_quickly(self, client: TestClient, auth: dict[str, str]) -> None:
        bomb = bomb_png()
        assert len(bomb) < 200_000
        started = time.perf_counter()
        response = upload(client, auth, bomb)
        assert response.status_code in (413, 422)
        assert response.json()["error"]["code"] == "image_too_large"
        assert time.perf_counter() - started < 2.0
        assert client.get("/healthz").status_code == 200

    def test_over_pixel_limit(self, client: TestClient, auth: dict[str, str]) -> None:
        response = upload(client, auth, png_bytes(2056, 2056))  # limit in tests: 2048 * 2048
        assert response.status_code == 413

    def test_body_over_size_limit(self, client: TestClient, auth: dict[str, str]) -> None:
        response = upload(client, auth, b"\x89PNG" + b"\x00" * (3 * 1024 * 1024))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"

    def test_missing_key(self, client: TestClient) -> None:
        response = client.post("/v1/files", files={"file": ("x.png", png_bytes(), "image/png")})
        assert response.status_code == 401


@pytest.mark.usefixtures("nothing_stored")
class TestJobsRefused:
    def post(self, client: TestClient, auth: dict[str, str], path: str, body: dict) -> dict:  # type: ignore[type-arg]
        response = client.post(path, json=body, headers=auth)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] in ("invalid_request", "invalid_image", "unsupported_image")
        return error  # type: ignore[no-any-return]

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"prompt": "x" * 1001}, "prompt"),
            ({"prompt": ""}, "prompt"),
            ({"prompt": "a red circle", "width": 60}, "width"),
            ({"prompt": "a red circle", "height": 100}, "height"),
            ({"prompt": "a red circle", "steps": 0}, "steps"),
            ({"prompt": "a red circle", "steps": 10_000}, "steps"),
            ({"prompt": "a red circle", "guidance_scale": 0.5}, "guidance_scale"),
            ({"prompt": "a red circle", "num_images": 99}, "num_images"),
            ({"prompt": "a red circle", "seed": -1}, "seed"),
            ({"prompt": "a red circle", "surprise": 1}, "surprise"),
            ({"prompt": "a red circle", "callback_url": "not a url"}, "callback_url"),
        ],
    )
    def test_text_to_image_fields(self, client: TestClient, auth: dict[str, str], body: dict, field: str) -> None:  # type: ignore[type-arg]
        error = self.post(client, auth, "/v1/generations/text-to-image", body)
        assert any(d["field"] == field for d in error["details"]), error

    @pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
    def test_sdedit_strength_bounds(self, client: TestClient, auth: dict[str, str], strength: float) -> None:
        body = {"image": b64(png_bytes()), "prompt": "a blue square", "strength": strength}
        error = self.post(client, auth, "/v1/edits/sdedit", body)
        assert error["details"][0]["field"] == "strength"

    def test_malformed_base64(self, client: TestClient, auth: dict[str, str]) -> None:
        error = self.post(client, auth, "/v1/edits/sdedit", {"image": "%%%not-base64%%%", "prompt": "a blue square"})
        assert "image" in error["message"]

    def test_base64_of_text_is_not_an_image(self, client: TestClient, auth: dict[str, str]) -> None:
        error = self.post(client, auth, "/v1/edits/sdedit", {"image": b64(b"plain text"), "prompt": "a blue square"})
        assert error["code"] == "invalid_image"

    def test_inline_image_side_not_multiple_of_8(self, client: TestClient, auth: dict[str, str]) -> None:
        error = self.post(client, auth, "/v1/edits/sdedit", {"image": b64(png_bytes(60, 64)), "prompt": "a square"})
        assert "multiples of 8" in error["message"]

    def test_inline_bomb(self, client: TestClient, auth: dict[str, str]) -> None:
        response = client.post("/v1/edits/sdedit", json={"image": b64(bomb_png()), "prompt": "x"}, headers=auth)
        assert response.status_code in (413, 422)

    def test_unknown_file_id(self, client: TestClient, auth: dict[str, str]) -> None:
        response = client.post(
            "/v1/edits/sdedit", json={"image": "file_000000000000000000000000", "prompt": "x"}, headers=auth
        )
        assert response.status_code == 404

    def test_unknown_model(self, client: TestClient, auth: dict[str, str]) -> None:
        response = client.post(
            "/v1/generations/text-to-image", json={"prompt": "a red circle", "model": "no-such-model"}, headers=auth
        )
        assert response.status_code == 404
        assert "no-such-model" in response.json()["error"]["message"]

    def test_unknown_method(self, client: TestClient, auth: dict[str, str]) -> None:
        response = client.post("/v1/edits/no-such-method", json={"prompt": "x"}, headers=auth)
        assert response.status_code == 404

    def test_not_json(self, client: TestClient, auth: dict[str, str]) -> None:
        response = client.post(
            "/v1/generations/text-to-image", content=b"{nope", headers={**auth, "Content-Type": "application/json"}
        )
        assert response.status_code == 422


def test_foreign_file_is_404_and_nothing_stored(client: TestClient, settings: Settings) -> None:
    from tests.conftest import make_tenant

    owner_id, owner_key = make_tenant(settings)
    other_id, other_key = make_tenant(settings)
    uploaded = upload(client, {"Authorization": f"Bearer {owner_key}"}, png_bytes())
    assert uploaded.status_code == 201
    file_id = uploaded.json()["id"]
    other = {"Authorization": f"Bearer {other_key}"}
    assert client.get(f"/v1/files/{file_id}", headers=other).status_code == 404
    assert client.get(f"/v1/files/{file_id}/metadata", headers=other).status_code == 404
    response = client.post("/v1/edits/sdedit", json={"image": file_id, "prompt": "a square"}, headers=other)
    assert response.status_code == 404
    assert counts(settings, other_id) == (0, 0, 0)


def test_revoked_key_is_401(client: TestClient, settings: Settings) -> None:
    from tests.conftest import ADMIN_KEY

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    tenant = client.post("/v1/admin/tenants", json={"name": "revocation-test"}, headers=admin).json()
    key = client.post(f"/v1/admin/tenants/{tenant['id']}/keys", json={"name": "k"}, headers=admin).json()
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    assert client.delete(f"/v1/admin/keys/{key['id']}", headers=admin).status_code == 204
    response = client.get("/v1/jobs", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_admin_routes_need_the_admin_key(client: TestClient, auth: dict[str, str]) -> None:
    assert client.post("/v1/admin/tenants", json={"name": "x"}, headers=auth).status_code == 401
    assert client.post("/v1/admin/tenants", json={"name": "x"}).status_code == 401


def test_internal_errors_do_not_leak(client: TestClient, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import api.routes.jobs as jobs_routes

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(jobs_routes, "list_jobs", explode)
    response = client.get("/v1/jobs", headers=auth)
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error", "message": "internal server error"}}
    assert "Traceback" not in response.text and "secret" not in response.text
