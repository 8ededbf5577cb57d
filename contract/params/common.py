"""Fields shared by every job request."""

from __future__ import annotations

from typing import Annotated

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from contract.spec import IMAGE_FIELD_MARK, IMAGE_LIST_FIELD_MARK

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


MAX_ADAPTERS = 8


class AdapterRef(BaseModel):
    """An adapter from `GET /v1/adapters` to apply during the job, at a strength."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=40, pattern=r"^adp_[0-9a-f]+$", description="An adapter id (`adp_…`).")
    scale: float = Field(
        default=1.0, ge=-2.0, le=2.0, description="Strength: 1 as trained, 0 off (LoRA, DreamBooth, Perfusion...)."
    )


class JobRequest(BaseModel):
    """Options every job accepts."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None,
        max_length=200,
        description="Base model name from `GET /v1/models`; default: the server's, or, where the method needs a "
        "capability the default lacks (instruct-pix2pix), the first model that has it.",
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the job's random generator.")
    callback_url: AnyHttpUrl | None = Field(
        default=None, description="Receives a signed POST (X-Atelier-Signature) when the job ends."
    )
    adapters: list[AdapterRef] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        description="Adapters (LoRA, textual inversion, ...) installed for this job; they must be trained for the "
        "job's base model. Combinations apply together.",
    )

    @field_validator("adapters")
    @classmethod
    def _distinct_adapters(cls, value: list[AdapterRef]) -> list[AdapterRef]:
        ids = [ref.id for ref in value]
        if len(set(ids)) != len(ids):
            raise ValueError("each adapter may be listed once")
        return value

    def method_params(self) -> dict[str, object]:
        """The fields the method itself receives (everything but the job options)."""
        return self.model_dump(mode="json", exclude=set(JobRequest.model_fields))


ConceptToken = Annotated[
    str,
    Field(
        min_length=1,
        max_length=40,
        pattern=r"^\S+$",
        description="The new word for the concept, used in prompts afterwards, e.g. `<s1>` (must not be a word the "
        "model knows).",
    ),
]
ClassWord = Annotated[
    str,
    Field(
        max_length=100,
        description="The concept's class in the model's words (`circle`, `square`), written after the token.",
    ),
]


ADAPTER_NAME_FIELD = "name"
"""The request field that names the adapter a job produces, in the registry: the worker reads it when it stores
the adapter; the method never sees it."""


class TrainingRequest(JobRequest):
    """Options every personalization training job accepts (POST /v1/trainings/{kind})."""

    images: ImageRefList = Field(min_length=3, max_length=10, description="3 to 10 images of the concept.")
    token: ConceptToken
    class_word: ClassWord = ""
    name: str = Field(default="", max_length=200, description="The adapter's name in the registry; default: token.")
    steps: int = Field(default=300, ge=1, le=20000, description="Optimisation steps.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0, description="AdamW learning rate.")
    batch_size: int = Field(default=4, ge=1, le=64, description="Images per step.")
    flip: bool = Field(default=False, description="Also train on mirrored images (not for asymmetric subjects).")
    checkpoint_every: int = Field(
        default=50, ge=1, le=20000, description="Steps between checkpoints; a restarted job resumes from the last."
    )

    @field_validator("adapters")
    @classmethod
    def _no_adapters(cls, value: list[AdapterRef]) -> list[AdapterRef]:
        if value:
            raise ValueError("training jobs start from the base model; adapters are not accepted")
        return value
