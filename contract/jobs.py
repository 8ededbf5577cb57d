"""The job as clients see it: `GET /v1/jobs/{id}`, the event stream and the webhook body all send `JobOut`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Row

from contract.adapters import AdapterType
from store.tables import Job


class Progress(BaseModel):
    step: int
    total: int


class JobError(BaseModel):
    code: str
    message: str | None


class JobOutput(BaseModel):
    file_id: str
    url: str


class JobAdapter(BaseModel):
    """An adapter the job runs with (installed on the base model, or read by a merge), at a strength."""

    id: str
    scale: float
    type: AdapterType


def request_params(job: Job | Row[Any]) -> dict[str, Any]:
    """The job's request body again: the method's params with the job options that were given."""
    params: dict[str, Any] = {**job.params, "seed": job.seed}
    if job.adapters:
        params["adapters"] = job.adapters
    if job.controls:
        params["controls"] = job.controls
    if job.grounding:
        params["grounding"] = job.grounding["boxes"]
        params["grounding_fraction"] = job.grounding["fraction"]
    return params


class JobOut(BaseModel):
    id: str
    kind: str
    model: str
    seed: int = Field(description="Seed of the job's random generator.")
    adapters: list[JobAdapter] = Field(description="The adapters the job runs with, in the request's order.")
    controls: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The ControlNets and T2I-Adapters the job runs with, as requested (conditions as file ids).",
    )
    grounding: dict[str, Any] | None = Field(
        default=None, description="GLIGEN grounding: `boxes` (phrase and box each) and `fraction`; null if none."
    )
    state: str = Field(description="queued -> running -> succeeded | failed | canceled")
    params: dict[str, Any] = Field(
        description="The request's parameters as the job runs them (inline images replaced by their file ids), "
        "with `seed` and, where given, `adapters`, `controls`, `grounding` and `grounding_fraction`."
    )
    progress: Progress
    attempts: int
    max_attempts: int
    cancel_requested: bool
    error: JobError | None
    outputs: list[JobOutput]
    metrics: dict[str, Any]
    result: dict[str, Any] | None = Field(
        description="The method's JSON answer where it has one (a classification's ranking); null otherwise."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queued_seconds: float | None = Field(description="From creation to the (last) start.")
    run_seconds: float | None = Field(description="From the (last) start to the terminal state.")

    @classmethod
    def of(cls, job: Job | Row[Any]) -> JobOut:
        """From the job's row: the ORM object, or a Core row with the job's columns (`store.jobs.job_for_key`)."""
        queued = (job.started_at - job.created_at).total_seconds() if job.started_at else None
        ran = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
        return cls(
            id=job.id,
            kind=job.kind,
            model=job.model,
            seed=job.seed,
            adapters=[JobAdapter.model_validate(adapter) for adapter in job.adapters],
            state=job.state,
            controls=job.controls,
            grounding=job.grounding,
            params=request_params(job),
            progress=Progress(step=job.progress_step, total=job.progress_total),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested,
            error=JobError(code=job.error_code, message=job.error_message) if job.error_code else None,
            outputs=[JobOutput(file_id=f, url=f"/v1/files/{f}") for f in job.output_file_ids],
            metrics=job.metrics,
            result=job.result,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            queued_seconds=queued,
            run_seconds=ran,
        )
