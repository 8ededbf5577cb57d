"""Creating a job: validate, resolve the options and images, write the row, commit, then publish."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import ApiError, invalid, not_found
from api.images import CheckedImage, check_image, decode_base64
from api.job_options import JobOptions, resolve_options
from api.quotas import check_cost, check_quotas
from api.text_checks import check_new_token, check_prompt_lengths
from contract.domains import fill as fill_defaults
from contract.params.common import JobRequest
from contract.spec import MethodSpec
from store.artifacts import ArtifactStore
from store.files import get_file, store_input
from store.jobs import mark_unpublished
from store.recordings import route_for
from store.settings import Settings
from store.tables import Job, Tenant, new_id, utcnow
from worker.celery_app import publish_job

log = logging.getLogger("atelier.api")


@dataclass
class ImageRef:
    """One image of the request: its name as the client sees it (`image`, `images[2]`, `controls[0].condition`),
    its value (a file id or base64), and where a stored inline image's file id goes."""

    name: str
    value: Any
    place: Callable[[str], None]
    any_size: bool = False  # a condition a preprocessor resizes: its sides need not be multiples of 8


@dataclass
class InlineImage:
    """A base64 image of the request, checked, to be stored as an input file when the row is written."""

    ref: ImageRef
    checked: CheckedImage


@dataclass
class ImageInputs:
    """The request's images: the file ids it named (checked) and the inline images still to store."""

    file_ids: list[str] = field(default_factory=list)
    inline: list[InlineImage] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


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
    digest = request_hash(spec.kind, request.model_dump(mode="json"))
    if idempotency_key:
        existing = _existing(session, tenant, idempotency_key, digest)
        if existing is not None:
            return existing, False

    # 0. The tenant's quotas (429): its submission rate and its queued and running jobs.
    check_quotas(session, tenant, settings)
    # 1. The job's options: the base model (it must be able to run the method), the seed, the adapters.
    options = resolve_options(spec, request, tenant.id, session, settings)
    # 2. The images: existing file ids are checked; base64 is validated (stored in step 3).
    params: dict[str, Any] = request.method_params()
    _native_size_defaults(params, options.sample_size)
    params = fill_defaults(spec.kind, options.domain, params)
    images = resolve_images(_image_refs(spec, params) + _condition_refs(options), tenant.id, session, settings)
    _check_same_size(spec, images.sizes)
    _check_condition_sizes(spec, params, options, images.sizes)
    check_cost(spec, params, images.sizes, options.model, tenant, settings)
    model_folder = settings.models_dir / options.model
    check_prompt_lengths(model_folder, params)
    if isinstance(params.get("token"), str):  # a training job's new word
        check_new_token(model_folder, "token", params["token"])
    # 3. Inline images and the row in one transaction.
    try:
        job = _write_job(spec, options, params, images, tenant, idempotency_key, digest, session, artifacts, settings)
    except IntegrityError:
        if idempotency_key:  # a concurrent request with the same key won the race
            existing = _existing(session, tenant, idempotency_key, digest)
            if existing is not None:
                return existing, False
        raise
    # 4. Publish after commit; if the broker is down, the reconciler publishes it later.
    _publish(celery, session, job, settings.broker_url)
    return job, True


def _native_size_defaults(params: dict[str, Any], sample_size: int | None) -> None:
    """An image size left out (`width`, `height`: None) becomes the model's native one (its `sample_size` in the
    catalog), so that the job records the size it makes and the checks below see it."""
    for side in ("width", "height"):
        if sample_size and side in params and params[side] is None:
            params[side] = sample_size


def _image_refs(spec: MethodSpec, params: dict[str, Any]) -> list[ImageRef]:
    """Every image of the method's params; a stored inline image's file id replaces its base64 in `params`."""

    def setter(container: Any, key: Any) -> Callable[[str], None]:
        return lambda file_id: container.__setitem__(key, file_id)

    refs = [ImageRef(f, params[f], setter(params, f)) for f in spec.image_fields if params.get(f) is not None]
    refs += [
        ImageRef(f"{name}[{index}]", value, setter(params[name], index))
        for name in spec.image_list_fields
        for index, value in enumerate(params.get(name) or [])
    ]
    return refs


def _condition_refs(options: JobOptions) -> list[ImageRef]:
    """The condition image of each control; a preprocessor resizes its image, so any size may come in."""

    def setter(control: dict[str, Any]) -> Callable[[str], None]:
        return lambda file_id: control.__setitem__("condition", file_id)

    return [
        ImageRef(
            f"controls[{index}].condition", control["condition"], setter(control), control["preprocessor"] != "none"
        )
        for index, control in enumerate(options.controls)
    ]


def resolve_images(refs: list[ImageRef], tenant_id: str, session: Session, settings: Settings) -> ImageInputs:
    """Check every image: a file id must be the tenant's image; base64 must decode to an image within the limits;
    sides must be multiples of 8 (except where a preprocessor resizes the image)."""
    images = ImageInputs()
    for ref in refs:
        name, value = ref.name, ref.value
        if isinstance(value, str) and value.startswith("file_"):
            row = get_file(session, tenant_id, value)
            if row is None:
                raise not_found("file", value)
            if not row.content_type.startswith("image/"):
                raise invalid(name, f"file {value} is not an image")
            width, height = row.width or 0, row.height or 0
            images.file_ids.append(value)
        else:
            checked = check_image(
                decode_base64(str(value), name), settings.max_image_pixels, settings.max_image_side, name
            )
            width, height = checked.width, checked.height
            images.inline.append(InlineImage(ref, checked))
        if not ref.any_size and (width % 8 or height % 8):
            raise invalid(name, f"image sides must be multiples of 8, got {width}x{height}")
        images.sizes[name] = (width, height)
    return images


def _check_same_size(spec: MethodSpec, sizes: dict[str, tuple[int, int]]) -> None:
    for name, other in spec.same_size:
        if name in sizes and other in sizes and sizes[name] != sizes[other]:
            (w, h), (ow, oh) = sizes[name], sizes[other]
            raise invalid(name, f"{name} is {w}x{h}, the {other} is {ow}x{oh}: they must be the same size")


ASPECT_TOLERANCE = 0.01


def _check_condition_sizes(
    spec: MethodSpec, params: dict[str, Any], options: JobOptions, sizes: dict[str, tuple[int, int]]
) -> None:
    """A ready condition (preprocessor `none`) must have the size of the image the job makes; an image a
    preprocessor resizes to that size must have its aspect ratio (within 1%), so nothing is stretched."""
    if not options.controls or spec.control_size is None:
        return
    target = spec.made_size(params, sizes)
    for index, control in enumerate(options.controls):
        name = f"controls[{index}].condition"
        (w, h), (tw, th) = sizes[name], target
        if control["preprocessor"] == "none" and (w, h) != target:
            raise invalid(
                name,
                f"the condition is {w}x{h}, the image this job makes is {tw}x{th}: they must be the same size "
                "(or name a preprocessor, which resizes)",
            )
        if abs((w / h) / (tw / th) - 1) > ASPECT_TOLERANCE:
            raise invalid(
                name, f"the image is {w}x{h}, the job makes {tw}x{th}: the aspect ratios differ, it would be stretched"
            )


def _write_job(
    spec: MethodSpec,
    options: JobOptions,
    params: dict[str, Any],
    images: ImageInputs,
    tenant: Tenant,
    idempotency_key: str | None,
    digest: str,
    session: Session,
    artifacts: ArtifactStore,
    settings: Settings,
) -> Job:
    """Store the inline images (their file ids replace the base64 in `params`) and the row, in one commit; if
    anything fails the transaction is rolled back and the stored bytes are removed again."""
    written: list[str] = []  # artifact keys of the inline images stored so far
    try:
        inline_ids = _store_inline_images(images.inline, tenant.id, session, artifacts, written)
        job = Job(
            id=new_id("job"),
            tenant_id=tenant.id,
            kind=spec.kind,
            queue=spec.queue,
            model=options.model,
            seed=options.seed,
            adapters=options.adapters,
            controls=options.controls,
            grounding=options.grounding,
            params=params,
            input_file_ids=images.file_ids + inline_ids,
            max_attempts=settings.job_max_attempts,
            idempotency_key=idempotency_key,
            request_hash=digest,
            callback_url=options.callback_url,
            published_at=utcnow(),  # optimistic: undone below if the publish fails
            publish_count=1,
        )
        session.add(job)
        session.commit()
    except BaseException:
        session.rollback()
        for key in written:
            artifacts.delete(key)
        raise
    return job


def _store_inline_images(
    inline: list[InlineImage], tenant_id: str, session: Session, artifacts: ArtifactStore, written: list[str]
) -> list[str]:
    """Store each inline image as an input file and put its file id where the base64 was; returns the ids.

    Appends each artifact key to `written` as soon as its bytes are stored, so the caller can remove them."""
    ids = []
    for image in inline:
        checked = image.checked
        row = store_input(
            session, artifacts, tenant_id, checked.data, checked.content_type, (checked.width, checked.height), "inline"
        )
        written.append(row.key)
        image.ref.place(row.id)
        ids.append(row.id)
    return ids


def _publish(celery: Celery, session: Session, job: Job, broker_url: str) -> None:
    try:
        # A follow-up region edit goes to the free worker holding the image's recording, when there is one.
        node = route_for(session, broker_url, job)
        publish_job(celery, job.id, job.queue, node=node)
    except Exception:
        log.warning("could not publish job %s now; the reconciler will", job.id, exc_info=True)
        mark_unpublished(session, job.id)
