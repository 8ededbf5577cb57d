"""Per-tenant quotas (issue 14): one tenant's 1024 x 1024 request held the only inference worker for 455 s, and
nothing limited how many jobs or how much work one tenant queued. Each refusal stores nothing."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from fastapi.testclient import TestClient

from store.settings import Settings
from store.tables import Job
from tests.api.test_hardening_2 import TEXT_TO_IMAGE, count, error_of
from tests.conftest import ADMIN_KEY, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SMALL = {"prompt": "a red circle", "steps": 1}


def tenant_with(client: TestClient, **limits: Any) -> tuple[str, dict[str, str]]:
    """A new tenant with these quota overrides, and its key's auth header."""
    tenant_id = client.post("/v1/admin/tenants", json={"name": f"quota-{secrets.token_hex(4)}"}, headers=ADMIN).json()[
        "id"
    ]
    patched = client.patch(f"/v1/admin/tenants/{tenant_id}", json={"limits": limits}, headers=ADMIN)
    assert patched.status_code == 200, patched.text
    assert patched.json()["limits"] == {**dict.fromkeys(patched.json()["limits"]), **limits}
    key = client.post(f"/v1/admin/tenants/{tenant_id}/keys", json={"name": "k"}, headers=ADMIN).json()["key"]
    return tenant_id, {"Authorization": f"Bearer {key}"}


def test_submissions_over_the_rate_are_429_with_retry_after(client: TestClient, settings: Settings) -> None:
    tenant_id, auth = tenant_with(client, submissions_per_minute=3)
    for _ in range(3):
        assert client.post(TEXT_TO_IMAGE, json=SMALL, headers=auth).status_code == 201
    response = client.post(TEXT_TO_IMAGE, json=SMALL, headers=auth)
    error = error_of(response, 429)
    assert error["code"] == "rate_limited" and "limit is 3" in error["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert count(settings, Job, tenant_id) == 3
    other = tenant_with(client)[1]  # another tenant is not held back
    assert client.post(TEXT_TO_IMAGE, json=SMALL, headers=other).status_code == 201


def test_an_idempotent_replay_is_not_a_new_submission(client: TestClient) -> None:
    _, auth = tenant_with(client, submissions_per_minute=1)
    replay = {**auth, "Idempotency-Key": "quota-replay"}
    first = client.post(TEXT_TO_IMAGE, json=SMALL, headers=replay)
    again = client.post(TEXT_TO_IMAGE, json=SMALL, headers=replay)
    assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_jobs_over_the_active_limit_are_429_until_one_ends(client: TestClient, settings: Settings) -> None:
    tenant_id, auth = tenant_with(client, max_active_jobs=2)
    ids = [client.post(TEXT_TO_IMAGE, json={**SMALL, "steps": 150}, headers=auth).json()["id"] for _ in range(2)]
    response = client.post(TEXT_TO_IMAGE, json=SMALL, headers=auth)
    error = error_of(response, 429)
    assert error["code"] == "too_many_jobs" and "2 jobs queued or running" in error["message"]
    assert int(response.headers["Retry-After"]) > 0
    assert count(settings, Job, tenant_id) == 2
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    wait_for(client, ids[0], auth)  # a queued job ends at once; a running one (a live worker) at its next step
    assert client.post(TEXT_TO_IMAGE, json=SMALL, headers=auth).status_code == 201


@pytest.mark.parametrize(
    ("body", "cost"),
    [
        ({"prompt": "a red circle", "width": 1024, "height": 1024, "steps": 25}, "6400"),  # the defect's request
        ({"prompt": "a red circle", "width": 256, "height": 256, "steps": 25, "num_images": 8}, "3200"),
    ],
)
def test_a_job_over_the_cost_limit_is_refused_at_submission(
    client: TestClient,
    settings: Settings,
    tenant: tuple[str, str],
    auth: dict[str, str],
    body: dict[str, Any],
    cost: str,
) -> None:
    """The zoo model's native size is 64 x 64: 1024 x 1024 is 256 times its pixels, so 25 steps cost 6400 against
    the default limit of 800."""
    error = error_of(client.post(TEXT_TO_IMAGE, json=body, headers=auth), 422)
    assert error["code"] == "over_cost_limit"
    assert f"cost is {cost}" in error["message"] and "limit is 800" in error["message"]
    assert count(settings, Job, tenant[0]) == 0


def test_the_cost_limit_is_per_tenant(client: TestClient, settings: Settings) -> None:
    tenant_id, auth = tenant_with(client, max_job_cost=10)
    body = {"prompt": "a red circle", "width": 128, "height": 128, "steps": 3}  # 4 x 3 = 12
    assert error_of(client.post(TEXT_TO_IMAGE, json=body, headers=auth), 422)["code"] == "over_cost_limit"
    assert client.post(TEXT_TO_IMAGE, json={**body, "steps": 2}, headers=auth).status_code == 201  # 8
    assert count(settings, Job, tenant_id) == 1


@pytest.mark.parametrize(
    "limits",
    [{"max_running_jobs": 0}, {"max_active_jobs": -1}, {"max_job_cost": 0}, {"unknown": 1}, {"max_running_jobs": True}],
)
def test_bad_limits_are_422(client: TestClient, limits: dict[str, Any]) -> None:
    tenant_id, _ = tenant_with(client)
    response = client.patch(f"/v1/admin/tenants/{tenant_id}", json={"limits": limits}, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert client.patch("/v1/admin/tenants/ten_missing", json={"limits": {}}, headers=ADMIN).status_code == 404
