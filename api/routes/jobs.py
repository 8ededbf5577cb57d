"""Jobs: one creation route per registered method, plus get, list, cancel and the event stream."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy import Row
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import ArtifactsDep, Credentials, SessionDep, SettingsDep, TenantDep, get_tenant
from api.errors import ApiError, error_responses, not_found, unauthorized
from api.job_service import create_job
from api.schemas import JobPage
from contract.jobs import JobOut
from contract.registry import methods
from contract.spec import MethodSpec
from store.db import read_engine_for, session_factory, session_scope
from store.jobs import job_for_key, list_jobs, request_cancel
from store.retry import close_quietly, retrying
from store.settings import Settings
from store.tables import TERMINAL_STATES, Job, JobState
from store.tenants import hash_key
from worker.celery_app import publish_webhook

# No router-wide tag: a creation route is listed under its method's group only, the rest under "jobs".
router = APIRouter(responses=error_responses(401, 422))

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Same key and body returns the same job; same key with another body is a 422.",
    ),
]


def _creation_route(spec: MethodSpec) -> Callable[..., JobOut]:
    request_model: Any = spec.request

    def create(
        body: request_model,  # type: ignore[valid-type]
        request: Request,
        response: Response,
        tenant: TenantDep,
        session: SessionDep,
        artifacts: ArtifactsDep,
        settings: SettingsDep,
        idempotency_key: IdempotencyKey = None,
    ) -> JobOut:
        job, created = create_job(
            spec=spec,
            request=body,
            tenant=tenant,
            idempotency_key=idempotency_key,
            session=session,
            artifacts=artifacts,
            settings=settings,
            celery=request.app.state.celery,
        )
        response.status_code = 201 if created else 200
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return JobOut.of(job)

    create.__name__ = "create_" + spec.kind.replace("-", "_")
    create.__doc__ = spec.summary
    return create


def _load(session: SessionDep, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise not_found("job", job_id)
    return job


MAX_WAIT_SECONDS = 30.0
RECHECK_SECONDS = 1.0
"""A waiting request re-reads the job at least this often, whatever it hears (store/job_ends.py)."""


@router.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses=error_responses(404))
async def get_job(
    job_id: str,
    request: Request,
    credentials: Credentials,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_SECONDS,
            description="Seconds to hold the request while the job is not finished: the answer comes as soon as it "
            "succeeds, fails or is canceled, or when the wait is over (the job as it is then). 0: answer at once.",
        ),
    ] = 0.0,
) -> JobOut:
    """A job's state, progress, timings, error and outputs; with `wait`, when it ends (a long poll)."""
    settings: Settings = request.app.state.settings
    job = await run_in_threadpool(_poll, settings, credentials, job_id)
    if wait <= 0 or job.state in TERMINAL_STATES:
        return job
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    async with request.app.state.job_ends.watching(job_id) as ended:
        while job.state not in TERMINAL_STATES and (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(ended.wait(), min(left, RECHECK_SECONDS))
            except TimeoutError:
                pass
            ended.clear()
            job = await run_in_threadpool(_poll, settings, credentials, job_id)
    return job


class StatusPolls:
    """`GET /v1/jobs/{id}` without a query (a plain status poll, the most frequent request) as plain ASGI, ahead of
    FastAPI's routing and dependencies, which cost as much as the poll's own work. It answers a found job only, with
    the route's body (`_poll`, the same JSON); anything else (no key, a dead key, another tenant's job or none, a
    database fault, a `wait`) goes on to the route, which answers it as it always has. Installed innermost of the
    middlewares (`api.main`), so request metrics count its answers under the route's path."""

    PREFIX = "/v1/jobs/"
    answered = 0  # polls answered here (tests read it)

    def __init__(self, app: ASGIApp, settings: Settings, route: Any) -> None:
        self.app = app
        self.settings = settings
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        job_id = self._job_id(scope)
        credentials = _bearer(scope) if job_id else None
        if job_id and credentials is not None:
            try:
                job: JobOut | None = await run_in_threadpool(_poll, self.settings, credentials, job_id, ())
            except Exception:  # an error, or a failed read (not retried here), is the route's to answer
                job = None
            if job is not None:
                scope["route"] = self.route
                body = job.model_dump_json().encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                StatusPolls.answered += 1
                return
        await self.app(scope, receive, send)

    def _job_id(self, scope: Scope) -> str | None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("query_string"):
            return None
        path: str = scope["path"]
        rest = path[len(self.PREFIX) :] if path.startswith(self.PREFIX) else ""
        return rest if rest and "/" not in rest else None


def _bearer(scope: Scope) -> HTTPAuthorizationCredentials | None:
    """The `Authorization: Bearer <key>` credentials, parsed as `api.deps.bearer` (FastAPI's HTTPBearer) parses
    them; None without."""
    header = dict(scope.get("headers", ())).get(b"authorization")
    scheme, key = get_authorization_scheme_param(header.decode("latin-1") if header else None)
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=key) if scheme.lower() == "bearer" and key else None


def _poll(
    settings: Settings,
    credentials: HTTPAuthorizationCredentials | None,
    job_id: str,
    retry_delays: tuple[float, ...] = (0.0,),
) -> JobOut:
    """`get_job`'s work, in one worker thread: clients poll this route, so it authenticates and reads the job in
    one statement (`store.jobs.job_for_key`) instead of a session, the tenant and then the job through the ORM
    (one thread hop each). The answers are the other routes': 401 for a missing or dead key, 404 for a job of
    another tenant or none."""
    if settings.auth_disabled:
        session = session_factory(settings.database_url)()
        try:
            return JobOut.of(_load(session, get_tenant(settings, session, credentials).id, job_id))
        finally:
            close_quietly(session)
    if credentials is None or not credentials.credentials:
        raise unauthorized("missing API key (Authorization: Bearer …)")
    key_hash = hash_key(credentials.credentials)

    def read() -> tuple[bool, Row[Any] | None]:
        with read_engine_for(settings.database_url).connect() as connection:
            return job_for_key(connection, key_hash, job_id)

    live, row = retrying("reading the job", read, delays=retry_delays)  # by default once more through a drop
    if not live:
        raise unauthorized("invalid or revoked API key")
    if row is None:
        raise not_found("job", job_id)
    return JobOut.of(row)


@router.get("/v1/jobs", response_model=JobPage, tags=["jobs"])
def get_jobs(
    tenant: TenantDep,
    session: SessionDep,
    settings: SettingsDep,
    status: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    kind: Annotated[str | None, Query(description="Only jobs of this kind.")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobPage:
    """The tenant's jobs, newest first."""
    if kind is not None and kind not in methods():
        raise ApiError(
            422, "invalid_request", f"kind: unknown method {kind!r}", [{"field": "kind", "message": "unknown"}]
        )
    try:
        rows, next_cursor = list_jobs(
            session, tenant.id, state=status, kind=kind, cursor=cursor, limit=min(limit, settings.max_jobs_page)
        )
    except ValueError as exc:
        raise ApiError(
            422, "invalid_request", "cursor: invalid cursor", [{"field": "cursor", "message": "invalid"}]
        ) from exc
    return JobPage(data=[JobOut.of(r) for r in rows], next_cursor=next_cursor)


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"], responses=error_responses(404))
def cancel_job(job_id: str, request: Request, tenant: TenantDep, session: SessionDep) -> JobOut:
    """Cancel: a queued job never starts; a running job stops at its next denoising step."""
    job = _load(session, tenant.id, job_id)
    was_queued = job.state == JobState.queued
    job = request_cancel(session, job)
    if was_queued and job.state == JobState.canceled and job.callback_url:
        try:
            publish_webhook(request.app.state.celery, job.id)
        except Exception:  # the reconciler does not resend webhooks; log and move on
            pass
    return JobOut.of(job)


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, default=str)}\n\n"


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    tags=["jobs"],
    responses={200: {"content": {"text/event-stream": {}}}, **error_responses(404)},
)
async def job_events(job_id: str, tenant: TenantDep, session: SessionDep, settings: SettingsDep) -> StreamingResponse:
    """Server-Sent Events: `progress` events, then one terminal event (`succeeded`, `failed`, `canceled`)."""
    _load(session, tenant.id, job_id)
    session.close()
    url = settings.database_url

    def snapshot() -> dict[str, Any]:
        with session_scope(url) as scoped:
            job = scoped.get(Job, job_id)
            assert job is not None
            return JobOut.of(job).model_dump(mode="json")

    async def stream() -> AsyncIterator[str]:
        last: tuple[str, int] | None = None
        idle = 0.0
        while True:
            job = await run_in_threadpool(snapshot)
            marker = (job["state"], job["progress"]["step"])
            if job["state"] in TERMINAL_STATES:
                yield _event(job["state"], job)
                return
            if marker != last:
                yield _event("progress", job)
                last, idle = marker, 0.0
            elif idle >= 15.0:
                yield ": keep-alive\n\n"
                idle = 0.0
            await asyncio.sleep(0.2)
            idle += 0.2

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# After the job routes: routes match in order, and status polls are the most frequent requests.
for _spec in methods().values():
    router.add_api_route(
        _spec.path,
        _creation_route(_spec),
        methods=["POST"],
        status_code=201,
        response_model=JobOut,
        summary=_spec.summary.split(":")[0].split(".")[0],
        description=f"{_spec.summary}\n\nPaper: {_spec.paper}\n\nQueue: `{_spec.queue}`.",
        tags=[_spec.group],
        operation_id=f"create_{_spec.kind.replace('-', '_')}",
        responses=error_responses(400, 413, 429, 503),
    )
