"""One error shape for every failure: {"error": {"code", "message", "details"?}}; never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from store.artifacts import StorageUnavailable
from store.retry import DatabaseUnavailable, is_transient

log = logging.getLogger("atelier.api")


class ErrorDetail(BaseModel):
    field: str = Field(description="The field at fault (e.g. `prompt`), or `body`.")
    message: str


class ErrorInfo(BaseModel):
    code: str = Field(
        description="Stable and machine-readable: `invalid_request`, `invalid_image`, `not_found`, `unauthorized`, "
        "`too_large`, `image_too_large`, `storage_unavailable`, `database_unavailable`, …"
    )
    message: str = Field(description="For people; names the field when one is at fault.")
    details: list[ErrorDetail] | None = Field(default=None, description="One entry per field at fault.")


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorInfo


ERRORS = {
    400: "The body could not be parsed.",
    401: "Missing, invalid or revoked key (`unauthorized`, with `WWW-Authenticate: Bearer`).",
    404: "No such id for this tenant (`not_found`).",
    409: "It exists already (`conflict`).",
    413: "The body is over `ATELIER_MAX_REQUEST_BYTES` (`too_large`) or an image over the pixel limit "
    "(`image_too_large`).",
    422: "A field is invalid; `details` names it.",
    429: "The tenant is over a quota (`rate_limited`: jobs created per minute; `too_many_jobs`: jobs queued or "
    "running); retry after `Retry-After` seconds.",
    503: "Artifact storage (`storage_unavailable`) or the database (`database_unavailable`) failed; try again "
    "after `Retry-After` seconds.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route answers, each an ErrorBody."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorBody, "description": ERRORS[status]}
        if status == 401:
            responses[status]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "example": "Bearer"}}
        if status in (429, 503):
            responses[status]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "example": 10}}
    return responses


class ApiError(Exception):
    """An error the client caused or should know about."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} {ident!r} not found")


def unauthorized(message: str) -> ApiError:
    """401 with the challenge RFC 6750 asks for: the API takes bearer keys."""
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field}: {message}", [{"field": field, "message": message}])


def storage_unavailable() -> ApiError:
    """503 for a failed artifact read or write; what failed, and where, goes to the log only."""
    return ApiError(503, "storage_unavailable", "artifact storage is unavailable; try again later")


def _body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the one error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_body(exc.code, exc.message, exc.details), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            location = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path")]
            details.append({"field": ".".join(location) or "body", "message": err.get("msg", "invalid")})
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return JSONResponse(_body("invalid_request", message, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "error"
        )
        return JSONResponse(_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StorageUnavailable)
    async def _storage(request: Request, exc: StorageUnavailable) -> JSONResponse:
        log.error("artifact storage failed on %s %s", request.method, request.url.path, exc_info=exc)
        error = storage_unavailable()
        return JSONResponse(_body(error.code, error.message), status_code=error.status)

    @app.exception_handler(DatabaseUnavailable)
    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, DBAPIError) and not is_transient(exc):
            return await _internal(request, exc)
        log.error("the database failed on %s %s", request.method, request.url.path, exc_info=exc)
        body = _body("database_unavailable", "the database is unavailable; try again later")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(_body("internal_error", "internal server error"), status_code=500)
