"""The adapter registry: rows in `adapters`, bytes in the artifact store.

A trained adapter's id is derived from the job that made it, so a worker that re-runs a job (lease lost,
duplicate message) overwrites the same row and files instead of adding a second adapter.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from store.artifacts import ArtifactStore
from store.tables import Adapter, new_id

ADAPTER_FILE = "adapter.safetensors"
CONTENT_TYPE = "application/octet-stream"


def adapter_key(tenant_id: str, adapter_id: str, name: str = ADAPTER_FILE) -> str:
    return f"{tenant_id}/adapters/{adapter_id}/{name}"


def checkpoint_key(tenant_id: str, job_id: str) -> str:
    """Where a training job keeps its last checkpoint (one per job, replaced at each save)."""
    return f"{tenant_id}/jobs/{job_id}/checkpoint.safetensors"


def adapter_id_for_job(job_id: str) -> str:
    """The deterministic id of the adapter a training job produces."""
    return "adp_" + hashlib.sha256(f"adapter/{job_id}".encode()).hexdigest()[:24]


def get_adapter(session: Session, tenant_id: str, adapter_id: str) -> Adapter | None:
    """The tenant's adapter, or None (another tenant's id is the same as a missing one)."""
    return session.execute(
        select(Adapter).where(Adapter.id == adapter_id, Adapter.tenant_id == tenant_id)
    ).scalar_one_or_none()


def list_adapters(
    session: Session, tenant_id: str, *, type: str | None = None, base_model: str | None = None, limit: int = 100
) -> list[Adapter]:
    """The tenant's adapters, newest first, optionally of one type and/or one base model."""
    query = select(Adapter).where(Adapter.tenant_id == tenant_id)
    if type:
        query = query.where(Adapter.type == type)
    if base_model:
        query = query.where(Adapter.base_model == base_model)
    query = query.order_by(Adapter.created_at.desc(), Adapter.id.desc()).limit(limit)
    return list(session.execute(query).scalars())


def file_entry(key: str, name: str, data: bytes) -> dict[str, Any]:
    return {"name": name, "key": key, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}


def save_adapter(
    session: Session,
    artifacts: ArtifactStore,
    *,
    tenant_id: str,
    name: str,
    type: str,
    tokens: list[str],
    base_model: str,
    data: bytes,
    training: dict[str, Any],
    metrics: dict[str, Any],
    job_id: str | None = None,
) -> Adapter:
    """Write the file, then upsert the row and commit; an adapter from a job keeps the job's deterministic id.

    If the commit fails the bytes are removed again (for a new, imported adapter)."""
    adapter_id = adapter_id_for_job(job_id) if job_id else new_id("adp")
    key = adapter_key(tenant_id, adapter_id)
    artifacts.put(key, data, CONTENT_TYPE)
    values: dict[str, Any] = dict(
        id=adapter_id,
        tenant_id=tenant_id,
        name=name,
        type=type,
        tokens=list(tokens),
        base_model=base_model,
        files=[file_entry(key, ADAPTER_FILE, data)],
        training=training,
        metrics=metrics,
        job_id=job_id,
    )
    try:
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        statement = insert(Adapter).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=[Adapter.id], set_={k: statement.excluded[k] for k in ("files", "metrics", "training")}
        )
        session.execute(statement)
        session.commit()
    except BaseException:
        session.rollback()
        if job_id is None:
            artifacts.delete(key)
        raise
    row = get_adapter(session, tenant_id, adapter_id)
    assert row is not None
    return row


def read_adapter_file(artifacts: ArtifactStore, row: Adapter, name: str = ADAPTER_FILE) -> bytes:
    """The bytes of one of the adapter's files."""
    for entry in row.files:
        if entry["name"] == name:
            return artifacts.get(str(entry["key"]))
    raise KeyError(name)


def delete_adapter(session: Session, artifacts: ArtifactStore, row: Adapter) -> None:
    """Remove the row (committed first), then its files."""
    keys = [str(entry["key"]) for entry in row.files]
    session.delete(row)
    session.commit()
    for key in keys:
        artifacts.delete(key)
