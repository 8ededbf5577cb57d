"""The quotas checked when a job is submitted (`store.quotas`): 429s with Retry-After, and the cost bound."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.orm import Session

from api.catalog import find_model
from api.errors import ApiError
from contract.spec import MethodSpec
from store.quotas import WINDOW, active_jobs, job_cost, limits_for, recent_submissions
from store.settings import Settings
from store.tables import Tenant, utcnow

BUSY_RETRY_AFTER = 10
"""Seconds a tenant at its active-job limit is told to wait: about the time a short job takes."""


def check_quotas(session: Session, tenant: Tenant, settings: Settings) -> None:
    """429 when the tenant is over its submission rate or holds its limit of queued and running jobs."""
    limits = limits_for(tenant, settings)
    now = utcnow()
    count, oldest = recent_submissions(session, tenant.id, now)
    if count >= limits.submissions_per_minute:
        wait = (oldest + WINDOW - now).total_seconds() if oldest else WINDOW.total_seconds()
        raise ApiError(
            429,
            "rate_limited",
            f"this tenant created {count} jobs in the last minute; its limit is {limits.submissions_per_minute}",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    active = active_jobs(session, tenant.id)
    if active >= limits.max_active_jobs:
        raise ApiError(
            429,
            "too_many_jobs",
            f"this tenant has {active} jobs queued or running; its limit is {limits.max_active_jobs}",
            headers={"Retry-After": str(BUSY_RETRY_AFTER)},
        )


def check_cost(
    spec: MethodSpec,
    params: dict[str, Any],
    sizes: dict[str, tuple[int, int]],
    model: str,
    tenant: Tenant,
    settings: Settings,
) -> None:
    """422 when one inference job's denoising work is over the tenant's `max_job_cost` (training jobs are bounded
    by their own step limits). Pixels: the requested size, else the input image's, else the model's own."""
    if spec.queue != "inference" or not isinstance(params.get("steps"), int):
        return
    described = find_model(settings.models_dir, model, settings.default_model)
    native = described.sample_size if described and described.sample_size else None
    if native is None:
        return
    if isinstance(params.get("width"), int) and isinstance(params.get("height"), int):
        pixels = params["width"] * params["height"]
    elif sizes:
        width, height = next(iter(sizes.values()))
        pixels = width * height
    else:
        pixels = native * native
    images: int = params["num_images"] if isinstance(params.get("num_images"), int) else 1
    if isinstance(params.get("etas"), list) and params["etas"]:  # Imagic: one image per eta
        images *= len(params["etas"])
    cost = job_cost(pixels, native * native, params["steps"], images)
    limit = limits_for(tenant, settings).max_job_cost
    if cost > limit:
        message = (
            f"this job's cost is {cost:g} (steps x images x pixels / the model's {native} x {native}); "
            f"the limit is {limit:g}: use fewer steps or images, or a smaller size"
        )
        raise ApiError(422, "over_cost_limit", message, [{"field": "body", "message": message}])
