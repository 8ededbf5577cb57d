"""Response schemas of the API (the job view, which the worker's webhooks send too, is `contract.jobs`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from contract.domains import Domain
from contract.jobs import JobOut
from contract.spec import Family, ModelCapability, Queue
from store.tables import StoredFile


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


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class MethodOut(BaseModel):
    kind: str
    route: str
    summary: str
    queue: Queue
    backbones: list[str]
    requires: list[ModelCapability]
    families: list[Family] = Field(description="The base model families it runs on (`family` in GET /v1/models).")
    paper: str
    image_fields: list[str]
    image_list_fields: list[str] = Field(description="Fields that take a list of images.")
    parameters: dict[str, Any] = Field(description="JSON schema of the request body.")


ModelKind = Literal["base", "controlnet", "t2i-adapter"]


class ModelOut(BaseModel):
    name: str
    kind: ModelKind = Field(
        default="base",
        description="`base`: a diffusion model jobs run on; `controlnet`, `t2i-adapter`: a control "
        "model named in a job's `controls`.",
    )
    family: str = Field(
        default="custom",
        description="The base architecture: `sd1`, `sd2`, `sdxl`, or `custom` (the zoo's); a control model works "
        "only on a base of its own structure.",
    )
    condition: str | None = Field(
        default=None, description="A control model's condition type (`canny`, `mask`, `sketch`...); null for a base."
    )
    base_model: str | None = Field(default=None, description="A control model's base model, where it records one.")
    default: bool
    pipeline: str | None
    capabilities: list[ModelCapability]
    methods: list[str] = Field(
        default_factory=list,
        description="The job kinds that run on it (its family's, whose capabilities it has); empty for a control "
        "model. Any other job naming it is a 422.",
    )
    unet_in_channels: int | None
    sample_size: int | None = Field(description="Native image size in pixels.")
    domain: Domain | None = Field(
        default=None,
        description="What a base model was trained on: `shapesworld` (the zoo: an `atelier.json` in its folder says "
        "so) or `general`. Some defaults follow it (Imagic's and the trainings' steps and rates, the trainings' "
        "captions); null for a control model.",
    )
    prediction_type: str | None = Field(
        default=None,
        description="A base model's training target, from its scheduler config: `epsilon` (the default) or "
        "`v_prediction`; null for a control model.",
    )
