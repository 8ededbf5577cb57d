"""Liveness and readiness (open to all), Prometheus metrics (admin key: they count every tenant's jobs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy import func, select, text

from api.deps import AdminDep, SessionDep
from api.errors import error_responses
from store.tables import Job

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request, session: SessionDep) -> JSONResponse:
    """The database and the broker are reachable (503 otherwise)."""
    checks: dict[str, Any] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        with request.app.state.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **error_responses(401)},
)
def metrics(request: Request, _: AdminDep, session: SessionDep) -> Response:
    """Prometheus text format: request counters and jobs by kind and state, for every tenant (admin key)."""
    registry = CollectorRegistry()
    jobs = Gauge("atelier_jobs", "Jobs by kind and state", ["kind", "state"], registry=registry)
    for kind, state, count in session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)):
        jobs.labels(kind=kind, state=state).set(count)
    body = generate_latest(registry) + generate_latest(request.app.state.metrics_registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
