"""Fields shared by every job request."""

from __future__ import annotations

from typing import Annotated

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from api.registry import IMAGE_FIELD_MARK, IMAGE_LIST_FIELD_MARK

MAX_PROMPT_CHARS = 1000

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the image should show.")]
NegativePrompt = Annotated[
    str, Field(max_length=MAX_PROMPT_CHARS, description="What to steer away from (the unconditional prompt).")
]
Steps = Annotated[int, Field(ge=1, le=200, description="DDIM denoising steps.")]
GuidanceScale = Annotated[
    float, Field(ge=1.0, le=30.0, description="Classifier-free guidance scale w; 1 turns guidance off.")
]
ImageRef = Annotated[
    str,
    Field(
        min_length=1,
        description="A file id from `POST /v1/files` (`file_…`), or the image itself as base64 "
        "(a `data:image/png;base64,…` URL is accepted). PNG, JPEG or WebP.",
        json_schema_extra={"format": IMAGE_FIELD_MARK},
    ),
]

ImageRefList = Annotated[
    list[ImageRef],
    Field(
        description="Images, each a file id from `POST /v1/files` (`file_…`) or base64 as for a single image.",
        json_schema_extra={"format": IMAGE_LIST_FIELD_MARK},
    ),
]
"""A list of images; each method sets the count with its own `Field(min_length=…, max_length=…)`."""


class JobRequest(BaseModel):
    """Options every job accepts."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, max_length=200, description="Base model name from `GET /v1/models`; default: the server's."
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the job's random generator.")
    callback_url: AnyHttpUrl | None = Field(
        default=None, description="Receives a signed POST (X-Atelier-Signature) when the job ends."
    )

    def method_params(self) -> dict[str, object]:
        """The fields the method itself receives (everything but the job options)."""
        return self.model_dump(mode="json", exclude=set(JobRequest.model_fields))
