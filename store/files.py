"""File rows and their bytes: uploads, inline inputs and job outputs."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from store.artifacts import ArtifactStore
from store.tables import StoredFile, new_id


def file_key(tenant_id: str, file_id: str) -> str:
    return f"{tenant_id}/files/{file_id}"


def output_key(tenant_id: str, job_id: str, name: str) -> str:
    return f"{tenant_id}/jobs/{job_id}/{name}"


def output_file_id(job_id: str, name: str) -> str:
    """Deterministic id of a job output, so a re-run overwrites instead of duplicating."""
    return "file_" + hashlib.sha256(f"{job_id}/{name}".encode()).hexdigest()[:24]


def get_file(session: Session, tenant_id: str, file_id: str) -> StoredFile | None:
    """The tenant's file, or None (another tenant's id is the same as a missing one)."""
    return session.execute(
        select(StoredFile).where(StoredFile.id == file_id, StoredFile.tenant_id == tenant_id)
    ).scalar_one_or_none()


def store_input(
    session: Session,
    artifacts: ArtifactStore,
    tenant_id: str,
    data: bytes,
    content_type: str,
    size: tuple[int, int] | None,
    source: str,
) -> StoredFile:
    """Write the bytes, then add the row to the session (the caller commits, or deletes the bytes on failure)."""
    file_id = new_id("file")
    key = file_key(tenant_id, file_id)
    artifacts.put(key, data, content_type)
    row = StoredFile(
        id=file_id,
        tenant_id=tenant_id,
        key=key,
        content_type=content_type,
        size_bytes=len(data),
        width=size[0] if size else None,
        height=size[1] if size else None,
        sha256=hashlib.sha256(data).hexdigest(),
        source=source,
    )
    session.add(row)
    return row


def store_output(
    session: Session,
    artifacts: ArtifactStore,
    tenant_id: str,
    job_id: str,
    name: str,
    data: bytes,
    content_type: str,
    size: tuple[int, int] | None,
) -> str:
    """Write a job output under its deterministic key and upsert its row (the caller commits); returns the file
    id."""
    file_id = output_file_id(job_id, name)
    key = output_key(tenant_id, job_id, name)
    artifacts.put(key, data, content_type)
    values = dict(
        id=file_id,
        tenant_id=tenant_id,
        key=key,
        content_type=content_type,
        size_bytes=len(data),
        width=size[0] if size else None,
        height=size[1] if size else None,
        sha256=hashlib.sha256(data).hexdigest(),
        source="output",
        job_id=job_id,
    )
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(StoredFile).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=[StoredFile.id],
        set_={k: statement.excluded[k] for k in ("size_bytes", "sha256", "width", "height")},
    )
    session.execute(statement)
    return file_id
