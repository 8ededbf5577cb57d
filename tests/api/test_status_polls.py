"""The status poll's fast path (`api.routes.jobs.StatusPolls`): a plain `GET /v1/jobs/{id}` is answered before
FastAPI's routing with exactly the route's body; every other answer (401, 404, a `wait`) is still the route's."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.routes.jobs import StatusPolls
from store.settings import Settings
from tests.conftest import make_tenant


def submit(client: TestClient, auth: dict[str, str]) -> str:
    made = client.post("/v1/generations/text-to-image", json={"prompt": "a red circle", "steps": 2}, headers=auth)
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def test_a_plain_poll_takes_the_fast_path_with_the_routes_answer(client: TestClient, auth: dict[str, str]) -> None:
    job_id = submit(client, auth)
    # A terminal job, so that a worker of the same test session cannot move it between the two answers.
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code in (200, 202)
    ended = client.get(f"/v1/jobs/{job_id}?wait=20", headers=auth).json()  # a long poll: answers at the end
    assert ended["state"] in ("canceled", "succeeded", "failed"), ended
    before = StatusPolls.answered
    fast = client.get(f"/v1/jobs/{job_id}", headers=auth)
    assert StatusPolls.answered == before + 1
    routed = client.get(f"/v1/jobs/{job_id}?wait=0", headers=auth)  # a query: FastAPI's route
    assert StatusPolls.answered == before + 1
    assert fast.status_code == routed.status_code == 200
    assert fast.headers["content-type"] == routed.headers["content-type"] == "application/json"
    assert fast.json() == routed.json() and fast.json()["id"] == job_id


def test_the_errors_are_the_routes(client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    job_id = submit(client, auth)
    _, other_key = make_tenant(settings)
    before = StatusPolls.answered
    missing = client.get(f"/v1/jobs/{job_id}")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    dead = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer atl_not-a-key"})
    assert dead.status_code == 401
    elsewhere = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {other_key}"})
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["code"] == "not_found"
    nothing = client.get("/v1/jobs/job_0123456789abcdef01234567", headers=auth)
    assert nothing.status_code == 404
    assert StatusPolls.answered == before


def test_metrics_count_the_fast_answers_under_the_route(client: TestClient, auth: dict[str, str]) -> None:
    from tests.conftest import ADMIN_KEY

    job_id = submit(client, auth)
    client.get(f"/v1/jobs/{job_id}", headers=auth)
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'atelier_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"}' in metrics
