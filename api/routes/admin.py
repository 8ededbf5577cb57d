"""Administration with the admin key: tenants and their API keys."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import AdminDep, SessionDep
from api.errors import ApiError, error_responses, not_found
from store.tables import Tenant
from store.tenants import create_key, create_tenant, revoke_key

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=error_responses(401, 422))


class TenantLimits(BaseModel):
    """Overrides of the settings' quotas for one tenant; a field left out (or null) keeps the setting."""

    model_config = ConfigDict(extra="forbid")

    max_running_jobs: StrictInt | None = Field(default=None, ge=1, description="Jobs running at once.")
    max_active_jobs: StrictInt | None = Field(default=None, ge=1, description="Jobs queued and running together.")
    submissions_per_minute: StrictInt | None = Field(default=None, ge=1, description="Jobs created in any 60 s.")
    max_job_cost: StrictFloat | StrictInt | None = Field(
        default=None, gt=0, description="One job's steps x images x (pixels / the model's native pixels)."
    )


class TenantIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    limits: TenantLimits | None = None


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: TenantLimits = Field(description="Replaces the tenant's overrides.")


class TenantOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    limits: TenantLimits = Field(description="The tenant's overrides of the settings' quotas.")


def _tenant_out(tenant: Tenant) -> TenantOut:
    return TenantOut(
        id=tenant.id, name=tenant.name, created_at=tenant.created_at, limits=TenantLimits(**(tenant.limits or {}))
    )


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
        if body.limits is not None:
            tenant.limits = body.limits.model_dump(exclude_none=True)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise ApiError(409, "conflict", f"tenant {body.name!r} exists") from exc
    return _tenant_out(tenant)


@router.patch("/tenants/{tenant_id}", response_model=TenantOut, responses=error_responses(400, 404, 413))
def update_tenant(tenant_id: str, body: TenantPatch, _: AdminDep, session: SessionDep) -> TenantOut:
    """Set a tenant's quota overrides (`limits` replaces the previous ones; `{}` returns to the settings)."""
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise not_found("tenant", tenant_id)
    tenant.limits = body.limits.model_dump(exclude_none=True) or None
    session.commit()
    return _tenant_out(tenant)


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
