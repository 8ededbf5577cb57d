"""The FastAPI application: routers, error handlers, limits, offline Swagger UI."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.routes import adapters, admin, catalog, files, health, jobs
from store.artifacts import artifact_store
from store.job_ends import JobEnds
from store.settings import Settings, get_settings
from worker.celery_app import make_celery

SWAGGER_ASSETS = Path(fastapi_offline.__file__).parent / "static"

DESCRIPTION = """
Atelier runs diffusion-model image editing, personalization and classification as durable jobs.

1. Upload an image with `POST /v1/files` (or pass it inline as base64).
2. Submit a job with the route of its method; you get a Job back at once.
3. Follow it with `GET /v1/jobs/{id}` or the event stream `GET /v1/jobs/{id}/events`.
4. Download the outputs from `GET /v1/files/{file_id}`.

Authenticate with `Authorization: Bearer <api key>`.
"""


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, by header and by counting what arrives."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = b'{"error":{"code":"too_large","message":"request body exceeds the size limit"}}'
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Count requests by method, route and status, and time them by route (Prometheus), as plain ASGI: Starlette's
    `@app.middleware("http")` runs every request through a task group and a streamed copy of the response, which
    cost more than a status poll itself."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before starting a response

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], path, str(status)).inc()
            self.latency.labels(path).observe(time.perf_counter() - started)


class _TooLarge(StarletteHTTPException):
    """Raised from `receive` once a body without Content-Length (chunked) passes the limit. An HTTPException, so
    FastAPI's body parsing passes it on as it is (any other error there becomes a 400) and it answers 413."""

    def __init__(self) -> None:
        super().__init__(413, "request body exceeds the size limit")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await app.state.job_ends.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = FastAPI(
        lifespan=_lifespan,
        title="Atelier",
        version="1.0.0",
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_tags=[
            {"name": "files", "description": "Images in and out."},
            {"name": "jobs", "description": "Follow, list and cancel jobs."},
            {"name": "generations", "description": "Jobs that make images from text."},
            {"name": "edits", "description": "Jobs that edit an input image."},
            {"name": "trainings", "description": "Personalization jobs that teach the model a concept (an adapter)."},
            {"name": "classifications", "description": "Jobs that classify an image with the diffusion model."},
            {"name": "datasets", "description": "Jobs that generate a labelled image dataset."},
            {"name": "adapters", "description": "Trained and imported adapters; use them in any job's `adapters`."},
            {"name": "catalog", "description": "Methods and base models of this server."},
            {"name": "admin", "description": "Tenants and API keys (admin key)."},
            {"name": "health", "description": "Liveness, readiness, metrics."},
        ],
    )
    app.state.settings = settings
    app.state.artifacts = artifact_store(settings)
    app.state.celery = make_celery(settings)
    app.state.job_ends = JobEnds(settings.broker_url)
    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    requests = Counter("atelier_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("atelier_http_request_seconds", "HTTP request latency", ["route"], registry=registry)

    errors.install(app)
    # Jobs first: a status poll, the most frequent request, then matches the first routes tried.
    for router in (jobs.router, files.router, adapters.router, catalog.router, admin.router, health.router):
        app.include_router(router)

    # Innermost: a plain status poll is answered before FastAPI's routing, inside the metrics and the body limit.
    status_route = next(
        route
        for route in jobs.router.routes
        if getattr(route, "path", None) == "/v1/jobs/{job_id}" and "GET" in getattr(route, "methods", ())
    )
    app.add_middleware(jobs.StatusPolls, settings=settings, route=status_route)  # type: ignore[arg-type]

    # Added before count_requests, so it runs inside it: a body found too large while FastAPI reads it raises
    # _TooLarge straight into FastAPI (through count_requests' receive it would arrive in an ExceptionGroup, a 400).
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)  # type: ignore[arg-type]

    app.add_middleware(RequestMetrics, requests=requests, latency=latency)  # type: ignore[arg-type]

    app.mount("/static/swagger", StaticFiles(directory=SWAGGER_ASSETS), name="swagger")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Atelier API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon.png",
        )

    return app


def app_factory() -> FastAPI:
    """For `uvicorn --factory api.main:app_factory`."""
    return create_app()
