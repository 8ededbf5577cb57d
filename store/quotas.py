"""Per-tenant quotas: how much of the service one tenant may hold at once, and how fast it may submit.

Four limits, each a setting with a per-tenant override (`tenants.limits`, set by the admin API):
- `max_running_jobs`: a tenant's jobs running at once. A worker does not claim a job beyond it; the job waits
  in the queue (`store.jobs.claim` answers `deferred`) and other tenants' jobs go first.
- `max_active_jobs`: queued and running jobs together; a submission beyond it is a 429.
- `submissions_per_minute`: jobs created in the last 60 s; a submission beyond it is a 429 whose Retry-After
  says when the oldest of them leaves the window.
- `max_job_cost`: one job's denoising work, `job_cost`; over it the job is refused at submission (422: waiting
  would not help).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.settings import Settings
from store.tables import Job, JobState, Tenant, utcnow

WINDOW = timedelta(seconds=60)


@dataclass(frozen=True)
class Limits:
    max_running_jobs: int
    max_active_jobs: int
    submissions_per_minute: int
    max_job_cost: float


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def limits_for(tenant: Tenant | None, settings: Settings) -> Limits:
    """The settings' limits with the tenant's overrides applied."""
    limits = Limits(
        max_running_jobs=settings.tenant_max_running_jobs,
        max_active_jobs=settings.tenant_max_active_jobs,
        submissions_per_minute=settings.tenant_submissions_per_minute,
        max_job_cost=settings.max_job_cost,
    )
    overrides: dict[str, Any] = (tenant.limits if tenant else None) or {}
    return replace(limits, **{k: v for k, v in overrides.items() if k in LIMIT_NAMES and v is not None})


def active_jobs(session: Session, tenant_id: str) -> int:
    """The tenant's queued and running jobs."""
    query = select(func.count()).where(Job.tenant_id == tenant_id, Job.state.in_([JobState.queued, JobState.running]))
    return int(session.scalar(query) or 0)


def recent_submissions(session: Session, tenant_id: str, now: datetime | None = None) -> tuple[int, datetime | None]:
    """How many jobs the tenant created within the last `WINDOW`, and when the oldest of them was created."""
    since = (now or utcnow()) - WINDOW
    query = select(func.count(), func.min(Job.created_at)).where(Job.tenant_id == tenant_id, Job.created_at > since)
    count, oldest = session.execute(query).one()
    return int(count or 0), oldest


def job_cost(pixels: int, native_pixels: int, steps: int, images: int) -> float:
    """A job's denoising work in units of one step of one image at the model's native size: a job at 1024 x 1024
    on a 512-pixel model costs 4 per step and image. The same units hold for every base model."""
    return pixels / max(native_pixels, 1) * steps * images
