"""Administration with the admin key: tenants and their API keys."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import AdminDep, SessionDep
from api.errors import ApiError, error_responses, not_found
from store.tables import Tenant
from store.tenants import create_key, create_tenant, revoke_key

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=error_responses(401, 422))


class TenantIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class TenantOut(BaseModel):
    id: str
    name: str
    created_at: datetime


class KeyIn(BaseModel):
    name: str = Field(default="", max_length=200)


class KeyOut(BaseModel):
    id: str
    tenant_id: str
    name: str
    prefix: str
    key: str | None = Field(default=None, description="The raw key; shown only when the key is created.")


@router.post("/tenants", status_code=201, response_model=TenantOut, responses=error_responses(400, 409, 413))
def add_tenant(body: TenantIn, _: AdminDep, session: SessionDep) -> TenantOut:
    """Create a tenant."""
    try:
        tenant = create_tenant(session, body.name)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise ApiError(409, "conflict", f"tenant {body.name!r} exists") from exc
    return TenantOut(id=tenant.id, name=tenant.name, created_at=tenant.created_at)


@router.post(
    "/tenants/{tenant_id}/keys", status_code=201, response_model=KeyOut, responses=error_responses(400, 404, 413)
)
def add_key(tenant_id: str, body: KeyIn, _: AdminDep, session: SessionDep) -> KeyOut:
    """Create an API key for a tenant; the raw key is in the response and nowhere else."""
    if session.execute(select(Tenant).where(Tenant.id == tenant_id)).scalar_one_or_none() is None:
        raise not_found("tenant", tenant_id)
    key, raw = create_key(session, tenant_id, body.name)
    session.commit()
    return KeyOut(id=key.id, tenant_id=tenant_id, name=key.name, prefix=key.prefix, key=raw)


@router.delete("/keys/{key_id}", status_code=204, responses=error_responses(404))
def delete_key(key_id: str, _: AdminDep, session: SessionDep) -> None:
    """Revoke a key; requests with it get 401 from now on."""
    if not revoke_key(session, key_id):
        raise not_found("key", key_id)
    session.commit()
