"""Issue 14's API defects, each refused or fixed at the edge: a forged cursor, booleans as numbers, NaN/Inf adapter
weights, download and 401 headers, and webhook targets on private addresses (SSRF), with nothing stored."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select, update

from contract.registry import methods
from contract.spec import MethodSpec
from store.db import session_scope
from store.settings import Settings
from store.tables import Adapter, Job, JobState, utcnow
from tests.conftest import ADMIN_KEY, ZOO_MODEL
from tests.images import png_bytes

TEXT_TO_IMAGE = "/v1/generations/text-to-image"
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
HIDDEN = 128  # the zoo text encoder's width


def job_count(settings: Settings, tenant_id: str) -> int:
    with session_scope(settings.database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id)) or 0)


def field_of(response: Any) -> str:
    assert response.status_code == 422, response.text
    return str(response.json()["error"]["details"][0]["field"])


# 1. A cursor holding a naive or out-of-range time is a 422 naming `cursor`, not a 500.


def forged_cursor(created: str, job_id: str = "job_000000000000000000000000") -> str:
    return base64.urlsafe_b64encode(json.dumps([created, job_id]).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "created",
    ["2024-05-01T12:00:00", "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"],
    ids=["naive", "before-year-1-in-utc", "after-year-9999-in-utc"],
)
def test_a_cursor_with_a_naive_or_out_of_range_time_is_a_422(
    client: TestClient, auth: dict[str, str], created: str
) -> None:
    response = client.get("/v1/jobs", params={"cursor": forged_cursor(created)}, headers=auth)
    assert field_of(response) == "cursor"
    assert response.json()["error"]["code"] == "invalid_request"


def test_a_cursor_with_an_aware_time_still_pages(client: TestClient, auth: dict[str, str]) -> None:
    response = client.get("/v1/jobs", params={"cursor": forged_cursor("2024-05-01T12:00:00+02:00")}, headers=auth)
    assert response.status_code == 200, response.text
    assert response.json()["data"] == []


# 2. JSON booleans are not numbers: `"steps": true` is not 1.

SPECS = sorted(methods().values(), key=lambda spec: spec.kind)


def numeric(annotation: Any) -> str | None:
    """ "number" for an int or float field, "numbers" for a list or tuple of them, else None."""
    if annotation in (int, float):
        return "number"
    args = getattr(annotation, "__args__", ())
    inner = [getattr(arg, "__origin__", arg) for arg in args]  # Annotated[int, ...] -> int
    if getattr(annotation, "__origin__", None) in (list, tuple) and inner and all(a in (int, float) for a in inner):
        return "numbers"
    return None


def example(spec: MethodSpec) -> dict[str, Any]:
    extra = spec.request.model_config.get("json_schema_extra")
    assert isinstance(extra, dict)
    return dict(extra["examples"][0])  # type: ignore[index, call-overload]


@pytest.mark.parametrize("spec", SPECS, ids=[spec.kind for spec in SPECS])
def test_no_number_field_of_any_request_takes_a_boolean(spec: MethodSpec) -> None:
    """Every int and float field (and list of them) of every method's request refuses true, as JSON sends it."""
    checked = 0
    for name, info in spec.request.model_fields.items():
        kind = numeric(info.annotation)
        if kind is None:
            continue
        value: Any = True if kind == "number" else [True]
        with pytest.raises(ValidationError) as caught:
            spec.request.model_validate_json(json.dumps({**example(spec), name: value}))
        refusals = [e for e in caught.value.errors() if e["loc"][0] == name and e["type"] in ("int_type", "float_type")]
        assert refusals, (name, caught.value.errors())
        checked += 1
    assert checked, f"{spec.kind}: no number field found (the walk is broken)"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": True}, "steps"),
        ({"seed": False}, "seed"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"seed": True}, "seed"),
        ({"num_images": True}, "num_images"),
        ({"grounding_fraction": True}, "grounding_fraction"),
        ({"adapters": [{"id": "adp_0123456789abcdef01234567", "scale": True}]}, "adapters.0.scale"),
        ({"controls": [{"model": "x", "condition": "file_x", "scale": True}]}, "controls.0.scale"),
        ({"controls": [{"model": "x", "condition": "file_x", "low_threshold": False}]}, "controls.0.low_threshold"),
        ({"grounding": [{"phrase": "a circle", "box": [0, 0, True, 1]}]}, "grounding.0.box.2"),
    ],
)
def test_a_boolean_where_a_number_goes_is_a_422(
    client: TestClient,
    auth: dict[str, str],
    settings: Settings,
    tenant: tuple[str, str],
    body: dict[str, Any],
    field: str,
) -> None:
    response = client.post(TEXT_TO_IMAGE, json={"prompt": "a red circle", **body}, headers=auth)
    assert field_of(response) == field
    assert job_count(settings, tenant[0]) == 0


def test_numbers_still_take_numbers(client: TestClient, auth: dict[str, str]) -> None:
    """Strict, not picky: an integer is a fine float; the job is created."""
    body = {"prompt": "a red circle", "steps": 2, "guidance_scale": 7, "seed": 3}
    response = client.post(TEXT_TO_IMAGE, json=body, headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["params"]["guidance_scale"] == 7.0


# 3. Adapter files with NaN or Inf weights are refused, naming the tensor; nothing is stored.


def to_q_shape() -> list[int]:
    path = ZOO_MODEL / "unet" / "diffusion_pytorch_model.safetensors"
    with path.open("rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return list(header[f"{TO_Q}.weight"]["shape"])


def lora_with(value: float, dtype: torch.dtype) -> bytes:
    out_features, in_features = to_q_shape()
    up = torch.zeros(out_features, 2, dtype=dtype)
    up[3, 1] = value
    return save_safetensors(
        {f"unet.{TO_Q}.lora_A.weight": torch.randn(2, in_features).to(dtype), f"unet.{TO_Q}.lora_B.weight": up}
    )


def adapter_count(settings: Settings, tenant_id: str) -> int:
    with session_scope(settings.database_url) as session:
        return int(session.scalar(select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant_id)) or 0)


def import_adapter(client: TestClient, auth: dict[str, str], data: bytes, type: str, **form: str) -> Any:
    files = {"file": ("adapter.safetensors", data, "application/octet-stream")}
    return client.post("/v1/adapters", files=files, data={"type": type, **form}, headers=auth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_a_lora_with_nan_or_inf_weights_is_refused(
    client: TestClient, auth: dict[str, str], settings: Settings, tenant: tuple[str, str], value: float, dtype: Any
) -> None:
    response = import_adapter(client, auth, lora_with(value, dtype), "lora", token="<s1>")
    assert field_of(response) == "file"
    message = response.json()["error"]["message"]
    assert f"unet.{TO_Q}.lora_B.weight" in message and "NaN or infinite" in message
    assert adapter_count(settings, tenant[0]) == 0
    assert not (settings.artifacts_dir / tenant[0] / "adapters").exists()


def test_an_embedding_with_nan_is_refused(
    client: TestClient, auth: dict[str, str], settings: Settings, tenant: tuple[str, str]
) -> None:
    embedding = torch.randn(1, HIDDEN)
    embedding[0, 7] = float("nan")
    response = import_adapter(client, auth, save_safetensors({"<nan>": embedding}), "textual-inversion")
    assert field_of(response) == "file"
    assert "'<nan>' holds NaN or infinite values" in response.json()["error"]["message"]
    assert adapter_count(settings, tenant[0]) == 0


def test_finite_extremes_are_accepted(client: TestClient, auth: dict[str, str]) -> None:
    """The largest finite values are weights, not NaN/Inf (the check reads exponent bits, not magnitudes)."""
    response = import_adapter(client, auth, lora_with(torch.finfo(torch.float16).max, torch.float16), "lora")
    assert response.status_code == 201, response.text


# 4. Downloads say `nosniff`: a browser must not guess HTML or script from the bytes.


def test_file_downloads_are_nosniff(client: TestClient, auth: dict[str, str]) -> None:
    uploaded = client.post("/v1/files", files={"file": ("x.png", png_bytes(), "image/png")}, headers=auth)
    assert uploaded.status_code == 201, uploaded.text
    download = client.get(f"/v1/files/{uploaded.json()['id']}", headers=auth)
    assert download.status_code == 200
    assert download.headers["X-Content-Type-Options"] == "nosniff"


def test_adapter_downloads_are_nosniff(client: TestClient, auth: dict[str, str]) -> None:
    imported = import_adapter(client, auth, lora_with(0.5, torch.float32), "lora", token="<s1>")
    assert imported.status_code == 201, imported.text
    download = client.get(imported.json()["download_url"], headers=auth)
    assert download.status_code == 200
    assert download.headers["X-Content-Type-Options"] == "nosniff"


# 5. A 401 says how to authenticate.


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/v1/jobs", {}),
        ("GET", "/v1/jobs", {"Authorization": "Bearer atl_not-a-key"}),
        ("GET", "/v1/files/file_x", {"Authorization": "Basic dXNlcjpwYXNz"}),
        ("POST", "/v1/admin/tenants", {}),
        ("POST", "/v1/admin/tenants", {"Authorization": f"Bearer {ADMIN_KEY}-wrong"}),
    ],
)
def test_401s_carry_a_bearer_challenge(client: TestClient, method: str, path: str, headers: dict[str, str]) -> None:
    response = client.request(method, path, headers=headers, json={"name": "x"} if method == "POST" else None)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"


# 6. Webhook targets: public addresses only, unless allowlisted (ATELIER_WEBHOOK_ALLOW_PRIVATE).


@pytest.fixture(scope="module")
def strict_app(settings: Settings) -> FastAPI:
    """The API with no allowlist (the test environment's allows the test receivers on 127.0.0.1)."""
    from api.main import create_app

    return create_app(settings.model_copy(update={"webhook_allow_private": ""}))


@pytest.fixture(scope="module")
def allowing_app(settings: Settings) -> FastAPI:
    from api.main import create_app

    return create_app(settings.model_copy(update={"webhook_allow_private": "10.0.0.0/8, hooks.internal,fd00::/8"}))


@pytest.fixture()
def strict(strict_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(strict_app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture()
def allowing(allowing_app: FastAPI) -> Iterator[TestClient]:
    with TestClient(allowing_app, raise_server_exceptions=False) as test_client:
        yield test_client


def fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> list[str]:
    """Resolve names from `table` only (no network); returns the names looked up."""
    asked: list[str] = []

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        asked.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0)) for address in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def retire(settings: Settings, job_id: str) -> None:
    """An accepted test job must not run or call out later in the session: end it as delivered."""
    with session_scope(settings.database_url) as session:
        now = utcnow()
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.canceled, finished_at=now, webhook_delivered_at=now)
        )


PRIVATE_TARGETS = [
    "http://127.0.0.1:8080/hook",
    "http://127.0.0.2/hook",
    "http://localhost/hook",
    "http://LOCALHOST./hook",
    "http://2130706433/hook",
    "http://0x7f000001/hook",
    "http://0.0.0.0/hook",
    "http://10.1.2.3/hook",
    "http://172.16.0.9/hook",
    "http://172.31.255.1/hook",
    "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]:9000/hook",
    "http://[fc00::1]/hook",
    "http://[fd12:3456::1]/hook",
    "http://[fe80::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "https://100.64.0.1/hook",
]


@pytest.mark.parametrize("url", PRIVATE_TARGETS)
def test_a_private_callback_url_is_a_422(
    strict: TestClient, auth: dict[str, str], settings: Settings, tenant: tuple[str, str], url: str
) -> None:
    response = strict.post(TEXT_TO_IMAGE, json={"prompt": "a red circle", "callback_url": url}, headers=auth)
    assert field_of(response) == "callback_url"
    assert "not a public address" in response.json()["error"]["message"]
    assert job_count(settings, tenant[0]) == 0


def test_a_name_is_judged_by_what_it_resolves_to(
    strict: TestClient,
    auth: dict[str, str],
    settings: Settings,
    tenant: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = fake_dns(
        monkeypatch, {"hooks.example.com": ["93.184.216.34"], "sneaky.example.com": ["8.8.8.8", "10.0.0.7"]}
    )
    sneaky = strict.post(
        TEXT_TO_IMAGE, json={"prompt": "a red circle", "callback_url": "https://sneaky.example.com/h"}, headers=auth
    )
    assert field_of(sneaky) == "callback_url"
    assert "resolves to 10.0.0.7" in sneaky.json()["error"]["message"]
    unknown = strict.post(
        TEXT_TO_IMAGE, json={"prompt": "a red circle", "callback_url": "https://nowhere.example.com/h"}, headers=auth
    )
    assert field_of(unknown) == "callback_url"
    assert "does not resolve" in unknown.json()["error"]["message"]
    assert job_count(settings, tenant[0]) == 0
    public = strict.post(
        TEXT_TO_IMAGE, json={"prompt": "a red circle", "callback_url": "https://hooks.example.com/h"}, headers=auth
    )
    assert public.status_code == 201, public.text
    retire(settings, public.json()["id"])
    with session_scope(settings.database_url) as session:
        job = session.get(Job, public.json()["id"])
        assert job is not None and job.callback_url == "https://hooks.example.com/h"
    assert asked == ["sneaky.example.com", "nowhere.example.com", "hooks.example.com"]


def test_the_allowlist_admits_its_hosts_and_networks_only(
    allowing: TestClient, auth: dict[str, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = fake_dns(monkeypatch, {})  # an allowlisted name is not even resolved
    for url in ("http://10.20.30.40:8080/hook", "http://hooks.internal/hook", "http://[fd00::5]/hook"):
        response = allowing.post(TEXT_TO_IMAGE, json={"prompt": "a red circle", "callback_url": url}, headers=auth)
        assert response.status_code == 201, (url, response.text)
        retire(settings, response.json()["id"])
    assert asked == []
    for url in ("http://192.168.1.1/hook", "http://127.0.0.1/hook", "http://[fe80::1]/hook"):
        response = allowing.post(TEXT_TO_IMAGE, json={"prompt": "a red circle", "callback_url": url}, headers=auth)
        assert field_of(response) == "callback_url", url
