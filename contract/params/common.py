"""Fields shared by every job request.

Numbers are `StrictInt` / `StrictFloat`: JSON `true` is not 1 and `"25"` is not 25 (a float still takes an int).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from contract.domains import left_out
from contract.spec import IMAGE_FIELD_MARK, IMAGE_LIST_FIELD_MARK

MAX_PROMPT_CHARS = 1000

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the image should show.")]
NegativePrompt = Annotated[
    str, Field(max_length=MAX_PROMPT_CHARS, description="What to steer away from (the unconditional prompt).")
]
Steps = Annotated[StrictInt, Field(ge=1, le=200, description="DDIM denoising steps.")]
GuidanceScale = Annotated[
    StrictFloat, Field(ge=1.0, le=30.0, description="Classifier-free guidance scale w; 1 turns guidance off.")
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
    scale: StrictFloat = Field(
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
    seed: StrictInt = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the job's random generator.")
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
        return self.model_dump(mode="json", exclude=set(JobRequest.model_fields) | set(ControlledRequest.model_fields))


MAX_CONTROLS = 4
MAX_GROUNDING_BOXES = 30  # GLIGEN's position-net takes at most 30 objects

Preprocessor = Literal["none", "canny", "scribble"]
"""Condition preprocessors (the worker runs them): `canny` edges of a photo, `scribble` a drawing binarized, `none`
a ready condition image."""


class ControlRef(BaseModel):
    """A ControlNet or T2I-Adapter from `GET /v1/models` with its condition image."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="A control model's name from `GET /v1/models`.")
    condition: ImageRef
    preprocessor: Preprocessor = Field(
        default="none",
        description="`none`: the condition is a ready control image of the job's size. `canny`: Canny edges of the "
        "image (a photo), `scribble`: a drawing binarized to white strokes; both resize the image to the job's size "
        "first, so its aspect ratio must match.",
    )
    low_threshold: StrictInt = Field(default=100, ge=0, le=255, description="canny: gradients below are never edges.")
    high_threshold: StrictInt = Field(default=200, ge=0, le=255, description="canny: gradients above always are.")
    threshold: StrictInt = Field(
        default=127, ge=0, le=255, description="scribble: grey level between stroke and paper."
    )
    scale: StrictFloat = Field(
        default=1.0, ge=0.0, le=2.0, description="Conditioning strength; 0 turns the control off."
    )
    start: StrictFloat = Field(
        default=0.0, ge=0.0, lt=1.0, description="ControlNet: first fraction of steps it acts on."
    )
    end: StrictFloat = Field(
        default=1.0, gt=0.0, le=1.0, description="ControlNet: fraction of steps after which it stops."
    )

    @model_validator(mode="after")
    def _check(self) -> ControlRef:
        if self.low_threshold > self.high_threshold:
            raise ValueError("low_threshold must not exceed high_threshold")
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        return self


class GroundingBox(BaseModel):
    """GLIGEN: one phrase and the box its object goes in, (x0, y0, x1, y1) as fractions of the image side."""

    model_config = ConfigDict(extra="forbid")

    phrase: str = Field(min_length=1, max_length=200, description="What goes in the box, e.g. `a red circle`.")
    box: tuple[StrictFloat, StrictFloat, StrictFloat, StrictFloat] = Field(
        description="[x0, y0, x1, y1] in [0, 1], top left to bottom right; x0 < x1 and y0 < y1."
    )

    @field_validator("box")
    @classmethod
    def _check_box(cls, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ValueError(f"box coordinates must lie in [0, 1], got {list(box)}")
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"box must have x0 < x1 and y0 < y1 (a non-zero area), got {list(box)}")
        return box


class ControlledRequest(JobRequest):
    """Options of the jobs that take spatial controls (text-to-image, SDEdit)."""

    controls: list[ControlRef] = Field(
        default_factory=list,
        max_length=MAX_CONTROLS,
        description="ControlNets and T2I-Adapters for this job, each with its condition image; they must belong to "
        "the job's base model family. Several compose (their effects add).",
    )
    grounding: list[GroundingBox] = Field(
        default_factory=list,
        max_length=MAX_GROUNDING_BOXES,
        description="GLIGEN grounding: phrases and their boxes. Needs a base model with the `gligen` capability.",
    )
    grounding_fraction: StrictFloat = Field(
        default=0.3,
        gt=0.0,
        le=1.0,
        description="GLIGEN's scheduled sampling: the fraction of steps (the first ones) that use the grounding.",
    )


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


NATIVE_SIZE = " Default: the model's native resolution (`sample_size` in `GET /v1/models`)."
"""The end of an image size field's description: left out, the API fills in the model's own size."""


def by_domain(kind: str, name: str, description: str, **limits: Any) -> Any:
    """A field whose default depends on what the model was trained on (`contract/domains.py`): left out (None),
    the API fills it in from the job's model, and the job records the value."""
    return Field(default=None, description=description + left_out(kind, name), **limits)


def image_side(description: str, limit: int = 2048) -> Any:
    """An image side's field (`width`, `height`): a multiple of 8 up to `limit` pixels, or left out (None) for the
    model's native size."""
    return Field(default=None, ge=8, le=limit, multiple_of=8, description=description + NATIVE_SIZE)
ADAPTER_NAME_FIELD = "name"
"""The request field that names the adapter a job produces, in the registry: the worker reads it when it stores
the adapter; the method never sees it."""


class TrainingRequest(JobRequest):
    """Options every personalization training job accepts (POST /v1/trainings/{kind})."""

    images: ImageRefList = Field(min_length=3, max_length=10, description="3 to 10 images of the concept.")
    token: ConceptToken
    class_word: ClassWord = ""
    name: str = Field(default="", max_length=200, description="The adapter's name in the registry; default: token.")
    # Each training sets the defaults of these two (most by the model's domain: `by_domain`).
    steps: StrictInt | None = Field(default=None, ge=1, le=20000, description="Optimisation steps.")
    learning_rate: StrictFloat | None = Field(default=None, gt=0, le=1.0, description="AdamW learning rate.")
    batch_size: StrictInt = Field(default=4, ge=1, le=64, description="Images per step.")
    flip: bool = Field(default=False, description="Also train on mirrored images (not for asymmetric subjects).")
    checkpoint_every: StrictInt = Field(
        default=50, ge=1, le=20000, description="Steps between checkpoints; a restarted job resumes from the last."
    )

    @field_validator("adapters")
    @classmethod
    def _no_adapters(cls, value: list[AdapterRef]) -> list[AdapterRef]:
        if value:
            raise ValueError("training jobs start from the base model; adapters are not accepted")
        return value
