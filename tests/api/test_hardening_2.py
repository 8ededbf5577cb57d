"""Issue 14's API defects, second batch: `/metrics` behind the admin key, 413 for an over-limit chunked body, and
storage errors that tell the client what failed but never where (paths go to the log)."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from store.adapters import get_adapter, save_adapter
from store.artifacts import LocalArtifactStore, StorageUnavailable
from store.db import session_scope
from store.settings import Settings
from store.tables import Job, StoredFile
from tests.conftest import ADMIN_KEY
from tests.images import png_bytes

TEXT_TO_IMAGE = "/v1/generations/text-to-image"
SDEDIT = "/v1/edits/sdedit"


def count(settings: Settings, table: Any, tenant_id: str) -> int:
    with session_scope(settings.database_url) as session:
        query = select(func.count()).select_from(table).where(table.tenant_id == tenant_id)
        return int(session.scalar(query) or 0)


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


# 1. /metrics counts every tenant's jobs: it takes the admin key, and is closed when none is configured.


def test_metrics_without_a_key_is_a_401(client: TestClient) -> None:
    response = client.get("/metrics")
    assert error_of(response, 401)["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "atelier_jobs" not in response.text


def test_metrics_with_a_tenant_key_is_a_401(client: TestClient, auth: dict[str, str]) -> None:
    assert error_of(client.get("/metrics", headers=auth), 401)["code"] == "unauthorized"


def test_metrics_with_the_admin_key(client: TestClient) -> None:
    response = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert "atelier_http_requests_total" in response.text


def test_metrics_are_closed_without_a_configured_admin_key(settings: Settings) -> None:
    from api.main import create_app

    with TestClient(create_app(settings.model_copy(update={"admin_key": None}))) as client:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
            response = client.get("/metrics", headers=headers)
            assert error_of(response, 401)["code"] == "unauthorized", headers


# 2. A body over ATELIER_MAX_REQUEST_BYTES (2 MiB in the tests) sent chunked, with no Content-Length, is a 413 too.


def chunked(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """The body as a generator: httpx sends it with Transfer-Encoding: chunked and no Content-Length."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def multipart(field: str, data: bytes, filename: str, content_type: str, **form: str) -> tuple[bytes, str]:
    boundary = "atelier-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in form.items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    body = b"".join(parts) + head + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


OVER_LIMIT = 3 * 1024 * 1024


def test_an_over_limit_chunked_json_body_is_a_413(
    client: TestClient, settings: Settings, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    body = b'{"prompt": "a red circle", "negative_prompt": "' + b"x" * OVER_LIMIT + b'"}'
    headers = {**auth, "Content-Type": "application/json"}
    response = client.post(TEXT_TO_IMAGE, content=chunked(body), headers=headers)
    assert "content-length" not in response.request.headers
    error = error_of(response, 413)
    assert error["code"] == "too_large" and "size limit" in error["message"]
    assert count(settings, Job, tenant[0]) == 0


@pytest.mark.parametrize("route", ["/v1/files", "/v1/adapters"])
def test_an_over_limit_chunked_upload_is_a_413(
    client: TestClient, settings: Settings, tenant: tuple[str, str], auth: dict[str, str], route: str
) -> None:
    body, content_type = multipart("file", b"\0" * OVER_LIMIT, "big.bin", "application/octet-stream", type="lora")
    response = client.post(route, content=chunked(body), headers={**auth, "Content-Type": content_type})
    assert "content-length" not in response.request.headers
    assert error_of(response, 413)["code"] == "too_large"
    assert count(settings, StoredFile, tenant[0]) == 0


def test_a_chunked_body_under_the_limit_still_passes(client: TestClient, auth: dict[str, str]) -> None:
    body, content_type = multipart("file", png_bytes(), "a.png", "image/png")
    response = client.post("/v1/files", content=chunked(body, 256), headers={**auth, "Content-Type": content_type})
    assert response.status_code == 201, response.text


# 3. Storage errors: the client gets 503 storage_unavailable and no server path; the log gets the detail.


@pytest.fixture()
def broken_store(app: FastAPI, tmp_path: Path, tenant: tuple[str, str]) -> Iterator[Path]:
    """The app's artifact store swapped for one that cannot write the tenant's files (a plain file sits where the
    tenant's folder goes); yields the store's root, the path no client may see."""
    root = tmp_path / "server-only-artifacts"
    store = LocalArtifactStore(root)
    (root / tenant[0]).write_text("not a folder")
    saved = app.state.artifacts  # app.state keeps its own dict: monkeypatch.setattr would not restore it
    app.state.artifacts = store
    try:
        yield root
    finally:
        app.state.artifacts = saved


def assert_no_path(response: Any, root: Path) -> None:
    assert str(root) not in response.text and str(root.parent) not in response.text
    assert "Errno" not in response.text and "/tmp" not in response.text


def test_an_upload_the_store_cannot_write_is_a_503_without_paths(
    client: TestClient,
    settings: Settings,
    tenant: tuple[str, str],
    auth: dict[str, str],
    broken_store: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="atelier.api"):
        response = client.post("/v1/files", files={"file": ("a.png", png_bytes(), "image/png")}, headers=auth)
    assert error_of(response, 503)["code"] == "storage_unavailable"
    assert_no_path(response, broken_store)
    assert str(broken_store) in caplog.text  # the detail, path included, is in the server's log
    assert count(settings, StoredFile, tenant[0]) == 0


def test_a_job_whose_inline_image_the_store_cannot_write_is_a_503_without_paths(
    client: TestClient, settings: Settings, tenant: tuple[str, str], auth: dict[str, str], broken_store: Path
) -> None:
    image = base64.b64encode(png_bytes()).decode()
    response = client.post(SDEDIT, json={"image": image, "prompt": "a blue square"}, headers=auth)
    assert error_of(response, 503)["code"] == "storage_unavailable"
    assert_no_path(response, broken_store)
    assert count(settings, Job, tenant[0]) == 0 and count(settings, StoredFile, tenant[0]) == 0


def test_a_file_whose_bytes_are_gone_is_a_503_without_paths(
    client: TestClient, app: FastAPI, settings: Settings, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    uploaded = client.post("/v1/files", files={"file": ("a.png", png_bytes(), "image/png")}, headers=auth).json()
    with session_scope(settings.database_url) as session:
        key = session.get(StoredFile, uploaded["id"]).key  # type: ignore[union-attr]
    app.state.artifacts.delete(key)
    with caplog.at_level(logging.ERROR, logger="atelier.api"):
        response = client.get(f"/v1/files/{uploaded['id']}", headers=auth)
    assert error_of(response, 503)["code"] == "storage_unavailable"
    assert_no_path(response, settings.artifacts_dir)
    assert key in caplog.text
    assert client.get(f"/v1/files/{uploaded['id']}/metadata", headers=auth).status_code == 200


def test_an_adapter_whose_file_is_gone_is_a_503_without_paths(
    client: TestClient, app: FastAPI, settings: Settings, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    with session_scope(settings.database_url) as session:
        row = save_adapter(
            session,
            app.state.artifacts,
            tenant_id=tenant[0],
            name="gone",
            type="lora",
            tokens=[],
            base_model=settings.default_model,
            data=b"bytes that will be lost",
            training={},
            metrics={},
        )
        adapter_id, key = row.id, str(row.files[0]["key"])
    app.state.artifacts.delete(key)
    response = client.get(f"/v1/adapters/{adapter_id}/download", headers=auth)
    assert error_of(response, 503)["code"] == "storage_unavailable"
    assert_no_path(response, settings.artifacts_dir)
    with session_scope(settings.database_url) as session:
        assert get_adapter(session, tenant[0], adapter_id) is not None


def test_store_errors_name_the_operation_never_the_path(tmp_path: Path) -> None:
    """What a worker writes into a job's error message (`StorageUnavailable: ...`) carries no path either."""
    store = LocalArtifactStore(tmp_path)
    (tmp_path / "ten_x").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    for operation, call in (
        ("write", lambda: store.put("ten_x/files/file_1", b"data", "image/png")),
        ("read", lambda: store.get("folder")),
        ("delete", lambda: store.delete("folder")),
    ):
        with pytest.raises(StorageUnavailable) as caught:
            call()
        assert str(caught.value).startswith(f"could not {operation} an artifact (")
        assert str(tmp_path) not in str(caught.value)
        assert isinstance(caught.value.__cause__, OSError) and str(tmp_path) in str(caught.value.__cause__)
