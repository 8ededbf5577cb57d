"""Creating a job: validate, resolve images, write the row, commit, then publish."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.catalog import find_model, model_for
from api.errors import ApiError, invalid, not_found
from api.images import CheckedImage, check_image, decode_base64
from api.params.common import JobRequest
from api.registry import MethodSpec
from api.routes.adapters import resolve_refs
from store.artifacts import ArtifactStore
from store.files import get_file, store_input
from store.jobs import mark_unpublished
from store.settings import Settings
from store.tables import Job, Tenant, new_id, utcnow
from worker.celery_app import publish_job

log = logging.getLogger("atelier.api")


def request_hash(kind: str, body: dict[str, Any]) -> str:
    canonical = json.dumps({"kind": kind, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _existing(session: Session, tenant: Tenant, key: str, digest: str) -> Job | None:
    job = session.execute(
        select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key)
    ).scalar_one_or_none()
    if job is not None and job.request_hash != digest:
        raise ApiError(422, "idempotency_key_reused", "Idempotency-Key was already used with a different request body")
    return job


def create_job(
    *,
    spec: MethodSpec,
    request: JobRequest,
    tenant: Tenant,
    idempotency_key: str | None,
    session: Session,
    artifacts: ArtifactStore,
    settings: Settings,
    celery: Celery,
) -> tuple[Job, bool]:
    """Returns (job, created). Nothing is stored unless every check passes."""
    body = request.model_dump(mode="json")
    digest = request_hash(spec.kind, body)
    if idempotency_key:
        existing = _existing(session, tenant, idempotency_key, digest)
        if existing is not None:
            return existing, False

    # 1. The base model must exist and be able to run this method (unnamed: the default, or one that can).
    model_name = request.model or model_for(settings.models_dir, settings.default_model, spec.requires)
    model = find_model(settings.models_dir, model_name, settings.default_model)
    if model is None:
        raise not_found("model", model_name)
    missing = [c for c in spec.requires if c not in model.capabilities]
    if missing:
        raise invalid("model", f"{model_name} lacks {', '.join(missing)} needed by {spec.kind}")
    adapters = resolve_refs(session, tenant.id, request.adapters, model_name)  # each the tenant's, for this model

    # 2. Resolve image fields: existing file ids are checked; base64 is validated (stored in step 3).
    params: dict[str, Any] = request.method_params()
    inline: list[tuple[str, CheckedImage]] = []  # (field name, image)
    input_ids: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    refs: list[tuple[str, tuple[str, int] | None, Any]] = [(f, None, params.get(f)) for f in spec.image_fields]
    refs += [
        (f"{field}[{index}]", (field, index), value)
        for field in spec.image_list_fields
        for index, value in enumerate(params.get(field) or [])
    ]
    for name, _, value in refs:
        if value is None:
            continue
        if isinstance(value, str) and value.startswith("file_"):
            row = get_file(session, tenant.id, value)
            if row is None:
                raise not_found("file", value)
            if not row.content_type.startswith("image/"):
                raise invalid(name, f"file {value} is not an image")
            width, height = row.width or 0, row.height or 0
            input_ids.append(value)
        else:
            checked = check_image(
                decode_base64(str(value), name), settings.max_image_pixels, settings.max_image_side, name
            )
            width, height = checked.width, checked.height
            inline.append((name, checked))
        if width % 8 or height % 8:
            raise invalid(name, f"image sides must be multiples of 8, got {width}x{height}")
        sizes[name] = (width, height)
    if "mask" in sizes and "image" in sizes and sizes["mask"] != sizes["image"]:
        (mw, mh), (iw, ih) = sizes["mask"], sizes["image"]
        raise invalid("mask", f"mask is {mw}x{mh}, the image is {iw}x{ih}: they must be the same size")
    positions = {name: where for name, where, _ in refs}  # where an inline image's file id goes

    # 3. Write inline images and the row in one transaction; undo the bytes if the commit fails.
    written: list[str] = []
    try:
        for name, checked in inline:
            row = store_input(
                session,
                artifacts,
                tenant.id,
                checked.data,
                checked.content_type,
                (checked.width, checked.height),
                "inline",
            )
            written.append(row.key)
            where = positions[name]
            if where is None:
                params[name] = row.id
            else:
                params[where[0]][where[1]] = row.id
            input_ids.append(row.id)
        job = Job(
            id=new_id("job"),
            tenant_id=tenant.id,
            kind=spec.kind,
            queue=spec.queue,
            model=model_name,
            params={**params, "seed": request.seed, **({"adapters": adapters} if adapters else {})},
            input_file_ids=input_ids,
            max_attempts=settings.job_max_attempts,
            idempotency_key=idempotency_key,
            request_hash=digest,
            callback_url=str(request.callback_url) if request.callback_url else None,
            published_at=utcnow(),  # optimistic: undone below if the publish fails
            publish_count=1,
        )
        session.add(job)
        session.commit()
    except IntegrityError:
        session.rollback()
        for key in written:
            artifacts.delete(key)
        if idempotency_key:  # a concurrent request with the same key won the race
            existing = _existing(session, tenant, idempotency_key, digest)
            if existing is not None:
                return existing, False
        raise
    except BaseException:
        session.rollback()
        for key in written:
            artifacts.delete(key)
        raise

    # 4. Publish after commit; if the broker is down, the reconciler publishes it later.
    try:
        publish_job(celery, job.id, job.queue)
    except Exception:
        log.warning("could not publish job %s now; the reconciler will", job.id, exc_info=True)
        mark_unpublished(session, job.id)
    return job, True
