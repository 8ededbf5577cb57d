"""Catalog, health, metrics, OpenAPI and the import boundaries."""

from __future__ import annotations

import subprocess
import sys

from fastapi.testclient import TestClient

from contract.registry import methods
from store.settings import ROOT


def test_methods_come_from_the_registry(client: TestClient, auth: dict[str, str]) -> None:
    listed = client.get("/v1/methods", headers=auth).json()
    assert {m["kind"] for m in listed} == set(methods())
    sdedit = next(m for m in listed if m["kind"] == "sdedit")
    assert sdedit["route"] == "/v1/edits/sdedit" and sdedit["queue"] == "inference"
    assert sdedit["image_fields"] == ["image"] and "unet" in sdedit["backbones"]
    assert sdedit["parameters"]["properties"]["strength"]["exclusiveMinimum"] == 0.0


def test_openapi_has_one_route_per_method_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for method in methods().values():
        operation = spec["paths"][method.path]["post"]
        schema_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = spec["components"]["schemas"][schema_ref.split("/")[-1]]
        assert schema.get("examples"), method.kind
        assert all("description" in p or "$ref" in p or "anyOf" in p for p in schema["properties"].values())


def test_models_lists_the_bundled_model(client: TestClient, auth: dict[str, str]) -> None:
    models = client.get("/v1/models", headers=auth).json()
    default = next(m for m in models if m["default"])
    assert default["name"] == "shapes-sd-tiny"
    assert default["pipeline"] == "StableDiffusionPipeline"
    assert "text-to-image" in default["capabilities"] and default["sample_size"] == 64


def test_health_ready_and_metrics(client: TestClient, auth: dict[str, str]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json()
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    client.get("/v1/jobs", headers=auth)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'atelier_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in metrics.text


def test_readyz_reports_an_unreachable_broker(settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from api.main import create_app

    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("error")


def test_api_never_imports_torch() -> None:
    code = (
        "import sys, api.main, contract.registry; api.main.create_app(); "
        "sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_models_import_nothing_of_the_service() -> None:
    code = (
        "import sys, models.generation.text_to_image, models.editing.sdedit\n"
        "bad = [m for m in ('fastapi', 'celery', 'sqlalchemy', 'store', 'api', 'worker') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold() -> None:
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
