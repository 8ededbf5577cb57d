"""Catalog, health, metrics, OpenAPI and the import boundaries."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from fastapi.testclient import TestClient

from api.errors import ErrorBody
from contract.registry import methods
from store.settings import ROOT
from tests.conftest import ADMIN_KEY


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


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, item in spec["paths"].items() for method, op in item.items()]


def test_openapi_lists_each_operation_under_one_tag(client: TestClient) -> None:
    """Swagger UI shows an operation once per tag: a creation route under `jobs` and its group was listed twice."""
    spec = client.get("/openapi.json").json()
    declared = [tag["name"] for tag in spec["tags"]]
    for method, path, operation in operations(spec):
        assert len(operation["tags"]) == 1 and operation["tags"][0] in declared, (method, path, operation["tags"])
    for method_spec in methods().values():
        assert spec["paths"][method_spec.path]["post"]["tags"] == [method_spec.group]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events"):
        assert all(op["tags"] == ["jobs"] for op in spec["paths"][path].values()), path
    ids = [op["operationId"] for _, _, op in operations(spec)]
    assert len(ids) == len(set(ids))


def test_openapi_documents_the_error_responses(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    for method, path, operation in operations(spec):
        responses = operation["responses"]
        expected = set()
        if path not in ("/healthz", "/readyz"):
            expected.add("401")
        if "{" in path:
            expected.add("404")
        if "requestBody" in operation:
            expected |= {"400", "413", "422"}
        if operation.get("parameters"):
            expected.add("422")
        assert expected <= set(responses), (method, path, sorted(responses))
        for status in set(responses) - {"200", "201", "204"}:
            assert responses[status]["content"]["application/json"]["schema"] == error_ref, (method, path, status)
        if "401" in responses:
            assert "WWW-Authenticate" in responses["401"]["headers"]
    for method_spec in methods().values():
        assert {"503"} <= set(spec["paths"][method_spec.path]["post"]["responses"])  # inline images are stored
    assert "503" in spec["paths"]["/v1/files/{file_id}"]["get"]["responses"]


def test_error_bodies_match_the_documented_schema(client: TestClient, auth: dict[str, str]) -> None:
    for response in (
        client.get("/v1/jobs"),
        client.get("/v1/jobs/job_missing", headers=auth),
        client.post("/v1/edits/sdedit", json={"prompt": 1}, headers=auth),
    ):
        body = response.json()
        assert ErrorBody.model_validate(body).model_dump(exclude_none=True) == body, body


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
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
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
