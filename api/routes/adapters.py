"""Adapters: the registry of trained and imported personalization adapters (list, get, download, delete, import)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api.adapter_files import check_lora, check_textual_inversion
from api.catalog import find_model
from api.deps import ArtifactsDep, SessionDep, SettingsDep, TenantDep
from api.errors import error_responses, invalid, not_found, storage_unavailable
from contract.adapters import ADAPTER_TYPES, AdapterType, ImportableAdapterType
from store.adapters import ADAPTER_FILE, delete_adapter, get_adapter, list_adapters, read_adapter_file, save_adapter
from store.artifacts import ArtifactNotFound
from store.tables import Adapter

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=error_responses(401, 422))
log = logging.getLogger("atelier.api")


class AdapterFileOut(BaseModel):
    name: str
    size_bytes: int
    sha256: str


class AdapterOut(BaseModel):
    id: str
    name: str
    type: AdapterType
    tokens: list[str] = Field(description="The words that call the concept up in a prompt.")
    base_model: str = Field(description="The base model it was trained for; jobs on another model refuse it.")
    files: list[AdapterFileOut]
    training: dict[str, Any] = Field(description="The training job's parameters ({} for an imported file).")
    metrics: dict[str, Any]
    job_id: str | None = Field(description="The training job that made it; null when imported.")
    created_at: datetime
    download_url: str

    @classmethod
    def of(cls, row: Adapter) -> AdapterOut:
        return cls(
            id=row.id,
            name=row.name,
            type=row.type,
            tokens=list(row.tokens),
            base_model=row.base_model,
            files=[AdapterFileOut(name=f["name"], size_bytes=f["size_bytes"], sha256=f["sha256"]) for f in row.files],
            training=row.training,
            metrics=row.metrics,
            job_id=row.job_id,
            created_at=row.created_at,
            download_url=f"/v1/adapters/{row.id}/download",
        )


class AdapterPage(BaseModel):
    data: list[AdapterOut]


def _load(session: Session, tenant_id: str, adapter_id: str) -> Adapter:
    row = get_adapter(session, tenant_id, adapter_id)
    if row is None:
        raise not_found("adapter", adapter_id)
    return row


@router.get("", response_model=AdapterPage)
def get_adapters(
    tenant: TenantDep,
    session: SessionDep,
    type: Annotated[str | None, Query(description="Only adapters of this type.")] = None,
    base_model: Annotated[str | None, Query(description="Only adapters for this base model.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AdapterPage:
    """The tenant's adapters, newest first."""
    if type is not None and type not in ADAPTER_TYPES:
        raise invalid("type", f"must be one of {', '.join(ADAPTER_TYPES)}, got {type!r}")
    rows = list_adapters(session, tenant.id, type=type, base_model=base_model, limit=limit)
    return AdapterPage(data=[AdapterOut.of(row) for row in rows])


@router.get("/{adapter_id}", response_model=AdapterOut, responses=error_responses(404))
def get_one_adapter(adapter_id: str, tenant: TenantDep, session: SessionDep) -> AdapterOut:
    """One adapter: type, tokens, base model, files with checksums, training parameters, metrics."""
    return AdapterOut.of(_load(session, tenant.id, adapter_id))


@router.get(
    "/{adapter_id}/download",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **error_responses(404, 503)},
)
def download_adapter(adapter_id: str, tenant: TenantDep, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    """The adapter's safetensors file (loads with diffusers' load_lora_weights / load_textual_inversion)."""
    row = _load(session, tenant.id, adapter_id)
    try:
        data = read_adapter_file(artifacts, row)
    except (ArtifactNotFound, KeyError) as exc:  # the row is there, its file is not: the store's fault
        log.error("adapter %s: its file is missing (%r)", adapter_id, exc)
        raise storage_unavailable() from exc
    sha256 = next(f["sha256"] for f in row.files if f["name"] == ADAPTER_FILE)
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{row.id}.safetensors"',
            "ETag": f'"{sha256}"',
            "Cache-Control": "private",
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.delete("/{adapter_id}", status_code=204, response_class=Response, responses=error_responses(404, 503))
def remove_adapter(adapter_id: str, tenant: TenantDep, session: SessionDep, artifacts: ArtifactsDep) -> Response:
    """Delete the adapter and its files (jobs already queued with it fail with invalid_input)."""
    delete_adapter(session, artifacts, _load(session, tenant.id, adapter_id))
    return Response(status_code=204)


@router.post("", status_code=201, response_model=AdapterOut, responses=error_responses(400, 413, 503))
def import_adapter(
    file: Annotated[UploadFile, File(description="A .safetensors file (checked by content; pickles are refused).")],
    type: Annotated[ImportableAdapterType, Form(description="lora or textual-inversion")],
    tenant: TenantDep,
    session: SessionDep,
    artifacts: ArtifactsDep,
    settings: SettingsDep,
    name: Annotated[str, Form(max_length=200, description="Name in the registry; default: the file name.")] = "",
    base_model: Annotated[str, Form(max_length=200, description="Base model it is for; default: the server's.")] = "",
    token: Annotated[
        str,
        Form(
            max_length=40,
            description="A LoRA's trigger word its prompts use; an SDXL textual-inversion file's (clip_l, clip_g) "
            "token.",
        ),
    ] = "",
    class_word: Annotated[str, Form(max_length=100, description="The concept's class word, if any.")] = "",
) -> AdapterOut:
    """Import an external LoRA (diffusers layout) or textual-inversion embedding, validated against the base model."""
    model_name = base_model or settings.default_model
    if find_model(settings.models_dir, model_name, settings.default_model) is None:
        raise invalid("base_model", f"base model {model_name!r} not found")
    if not (settings.models_dir / model_name).is_dir():  # a single-file checkpoint: no diffusers-named weights
        raise invalid(
            "base_model",
            f"{model_name} is a single-file checkpoint: adapter files are checked against a diffusers folder's "
            "layers, so import them for a diffusers folder of the same model",
        )
    if token and any(c.isspace() for c in token):
        raise invalid("token", f"must be one word, got {token!r}")
    data = file.file.read()
    folder = settings.models_dir / model_name
    if type == "lora":
        checked = check_lora(data, folder, token)
    else:
        checked = check_textual_inversion(data, folder, token=token)
    row = save_adapter(
        session,
        artifacts,
        tenant_id=tenant.id,
        name=name or (file.filename or "imported")[:200],
        type=type,
        tokens=checked.tokens,
        base_model=model_name,
        data=data,
        training={"imported": True, "class_word": class_word, "file_name": file.filename or ""},
        metrics={},
    )
    return AdapterOut.of(row)
