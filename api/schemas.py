"""Response schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from store.tables import Job, StoredFile


class FileOut(BaseModel):
    id: str
    content_type: str
    size_bytes: int
    width: int | None
    height: int | None
    sha256: str
    source: str = Field(description="upload, inline (base64 job input) or output")
    job_id: str | None
    created_at: datetime
    url: str

    @classmethod
    def of(cls, row: StoredFile) -> FileOut:
        return cls(
            id=row.id,
            content_type=row.content_type,
            size_bytes=row.size_bytes,
            width=row.width,
            height=row.height,
            sha256=row.sha256,
            source=row.source,
            job_id=row.job_id,
            created_at=row.created_at,
            url=f"/v1/files/{row.id}",
        )


class Progress(BaseModel):
    step: int
    total: int


class JobError(BaseModel):
    code: str
    message: str | None


class JobOutput(BaseModel):
    file_id: str
    url: str


class JobOut(BaseModel):
    id: str
    kind: str
    model: str
    state: str = Field(description="queued -> running -> succeeded | failed | canceled")
    params: dict[str, Any]
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
    def of(cls, job: Job) -> JobOut:
        queued = (job.started_at - job.created_at).total_seconds() if job.started_at else None
        ran = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
        return cls(
            id=job.id,
            kind=job.kind,
            model=job.model,
            state=job.state,
            params=job.params,
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


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class MethodOut(BaseModel):
    kind: str
    route: str
    summary: str
    queue: str
    backbones: list[str]
    requires: list[str]
    paper: str
    image_fields: list[str]
    image_list_fields: list[str] = Field(description="Fields that take a list of images.")
    parameters: dict[str, Any] = Field(description="JSON schema of the request body.")


class ModelOut(BaseModel):
    name: str
    default: bool
    pipeline: str | None
    capabilities: list[str]
    unet_in_channels: int | None
    sample_size: int | None = Field(description="Native image size in pixels.")
