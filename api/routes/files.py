"""Files: upload an image, read its metadata, download its bytes."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi.responses import Response

from api.deps import ArtifactsDep, SessionDep, SettingsDep, TenantDep
from api.errors import error_responses, not_found, storage_unavailable
from api.images import check_image
from api.schemas import FileOut
from store.artifacts import ArtifactNotFound
from store.files import get_file, store_input

router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses(401, 422))
log = logging.getLogger("atelier.api")


@router.post("", status_code=201, response_model=FileOut, responses=error_responses(400, 413, 503))
def upload_file(
    file: Annotated[UploadFile, File(description="A PNG, JPEG or WebP image (checked by content).")],
    tenant: TenantDep,
    session: SessionDep,
    artifacts: ArtifactsDep,
    settings: SettingsDep,
) -> FileOut:
    """Upload an image; returns its file id for use in jobs."""
    data = file.file.read()
    checked = check_image(data, settings.max_image_pixels, settings.max_image_side)
    row = store_input(
        session, artifacts, tenant.id, checked.data, checked.content_type, (checked.width, checked.height), "upload"
    )
    try:
        session.commit()
    except BaseException:
        session.rollback()
        artifacts.delete(row.key)
        raise
    return FileOut.of(row)


@router.get("/{file_id}/metadata", response_model=FileOut, responses=error_responses(404))
def file_metadata(file_id: str, tenant: TenantDep, session: SessionDep) -> FileOut:
    """A file's type, size and checksum."""
    row = get_file(session, tenant.id, file_id)
    if row is None:
        raise not_found("file", file_id)
    return FileOut.of(row)


@router.get(
    "/{file_id}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        **error_responses(404, 503),
    },
)
def download_file(file_id: str, tenant: TenantDep, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    """The file's bytes."""
    row = get_file(session, tenant.id, file_id)
    if row is None:
        raise not_found("file", file_id)
    try:
        data = artifacts.get(row.key)
    except ArtifactNotFound as exc:  # the row is there, its bytes are not: the store's fault, not the client's
        log.error("file %s: artifact %s is missing", file_id, row.key)
        raise storage_unavailable() from exc
    headers = {"ETag": f'"{row.sha256}"', "Cache-Control": "private", "X-Content-Type-Options": "nosniff"}
    return Response(content=data, media_type=row.content_type, headers=headers)
