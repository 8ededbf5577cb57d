"""Tenants and their API keys; keys are stored as SHA-256 hashes only."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.tables import ApiKey, Tenant, new_id, utcnow

KEY_PREFIX = "atl_"


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def create_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(id=new_id("ten"), name=name)
    session.add(tenant)
    session.flush()
    return tenant


def create_key(session: Session, tenant_id: str, name: str = "", raw_key: str | None = None) -> tuple[ApiKey, str]:
    """A new key for the tenant; returns the row and the raw key (shown once, never stored)."""
    raw = raw_key or KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=new_id("key"), tenant_id=tenant_id, name=name, prefix=raw[:8], key_hash=hash_key(raw))
    session.add(key)
    session.flush()
    return key, raw


def tenant_for_key(session: Session, raw_key: str) -> Tenant | None:
    """The tenant of a live (not revoked) key, or None."""
    row = session.execute(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(raw_key), ApiKey.revoked_at.is_(None))
    ).scalar_one_or_none()
    return row


def revoke_key(session: Session, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None:
        return False
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return True


def ensure_tenant_with_key(session: Session, tenant_name: str, raw_key: str) -> Tenant:
    """Idempotent set-up for development: the named tenant exists and `raw_key` belongs to it."""
    tenant = session.execute(select(Tenant).where(Tenant.name == tenant_name)).scalar_one_or_none()
    if tenant is None:
        tenant = create_tenant(session, tenant_name)
    existing = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(raw_key))).scalar_one_or_none()
    if existing is None:
        create_key(session, tenant.id, name="dev", raw_key=raw_key)
    elif existing.tenant_id != tenant.id:
        raise ValueError("that key already belongs to another tenant")
    return tenant
