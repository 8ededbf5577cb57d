"""Typed dependencies: settings, a database session, the artifact store, the caller's tenant."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import unauthorized
from store.artifacts import ArtifactStore
from store.db import session_factory
from store.retry import close_quietly
from store.settings import Settings
from store.tables import Tenant
from store.tenants import create_tenant, tenant_for_key

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer atl_…`")


async def get_settings_dep(request: Request) -> Settings:  # async: no thread hop for a dictionary read
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        close_quietly(session)  # a dead connection must not turn an answered request into a dropped one


SessionDep = Annotated[Session, Depends(get_session)]


async def get_artifacts(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.artifacts
    return store


ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def get_tenant(settings: SettingsDep, session: SessionDep, credentials: Credentials) -> Tenant:
    """The tenant whose live key is presented; 401 otherwise (or the default tenant when auth is off)."""
    if settings.auth_disabled:
        tenant = session.execute(select(Tenant).where(Tenant.name == "default")).scalar_one_or_none()
        if tenant is None:
            tenant = create_tenant(session, "default")
            session.commit()
        return tenant
    if credentials is None or not credentials.credentials:
        raise unauthorized("missing API key (Authorization: Bearer …)")
    tenant = tenant_for_key(session, credentials.credentials)
    if tenant is None:
        raise unauthorized("invalid or revoked API key")
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def require_admin(settings: SettingsDep, credentials: Credentials) -> None:
    """The admin key from settings; admin routes are closed when none is configured."""
    presented = credentials.credentials if credentials else ""
    if not settings.admin_key or not hmac.compare_digest(presented.encode(), settings.admin_key.encode()):
        raise unauthorized("admin key required")


AdminDep = Annotated[None, Depends(require_admin)]
