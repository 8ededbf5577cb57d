"""Request schema of `diffusion-classifier`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from contract.params.common import MAX_PROMPT_CHARS, JobRequest
from contract.spec import IMAGE_FIELD_MARK, IMAGE_LIST_FIELD_MARK, MethodSpec

MAX_CLASSES = 100  # candidate classes per job
MAX_IMAGES = 16  # images per job
MAX_STAGES = 4
MAX_SAMPLES = 1000  # (t, eps) samples a class can get: the sum over the stages
MAX_EVALUATIONS = 20_000  # UNet evaluations per image the schedule may plan

ClassPrompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
ClassName = Annotated[str, Field(min_length=1, max_length=200)]
OptionalImageRef = Annotated[
    str | None,
    Field(
        min_length=1,
        description="The image to classify: a file id from `POST /v1/files` (`file_…`) or base64 (a `data:` URL "
        "is accepted). Give this or `images`.",
        json_schema_extra={"format": IMAGE_FIELD_MARK},
    ),
]
OptionalImageRefList = Annotated[
    list[str] | None,
    Field(
        min_length=1,
        max_length=MAX_IMAGES,
        description=f"Up to {MAX_IMAGES} images of the same size, each a file id or base64; one result per image, "
        "in order. Give this or `image`.",
        json_schema_extra={"format": IMAGE_LIST_FIELD_MARK},
    ),
]


def check_samples(samples: list[int]) -> list[int]:
    """A schedule's samples per stage: at most MAX_SAMPLES per class in all (a field validator's body)."""
    if sum(samples) > MAX_SAMPLES:
        raise ValueError(f"sums to {sum(samples)}: a class gets at most {MAX_SAMPLES} samples")
    return samples


def check_keep(keep: list[int], samples: list[int]) -> list[int]:
    """A schedule's survivors per stage: one entry per stage but the last, non-increasing."""
    if len(keep) != len(samples) - 1:
        raise ValueError(f"one entry per stage but the last: {len(samples) - 1} for {len(samples)} stages")
    if any(b > a for a, b in zip(keep, keep[1:], strict=False)):
        raise ValueError(f"must be non-increasing, got {keep}")
    return keep


class DiffusionClassifierRequest(JobRequest):
    """Zero-shot classification by the model's denoising error under each class prompt."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "file_0123456789abcdef01234567",
                    "class_names": ["circle", "square", "triangle", "diamond", "hexagon"],
                    "template": "a large red {} at the center",
                    "samples_per_stage": [4, 28],
                    "keep_per_stage": [2],
                }
            ]
        },
    )

    image: OptionalImageRef = None
    images: OptionalImageRefList = Field(default=None, validate_default=True)
    prompts: list[ClassPrompt] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_CLASSES,
        description=f"One full prompt per class (2 to {MAX_CLASSES}). Give this or `class_names`.",
    )
    class_names: list[ClassName] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_CLASSES,
        description=f"Class names (2 to {MAX_CLASSES}), each put into `template`. Give this or `prompts`.",
    )
    template: str = Field(
        default="{}",
        min_length=2,
        max_length=MAX_PROMPT_CHARS,
        description='The prompt of a class name: "{}" is replaced by the name, e.g. "a {} on a light background".',
        validate_default=True,
    )
    samples_per_stage: list[Annotated[StrictInt, Field(ge=1, le=MAX_SAMPLES)]] = Field(
        default=[4, 28],
        min_length=1,
        max_length=MAX_STAGES,
        description="(t, eps) samples added in each stage for the classes still in. One stage is the naive "
        f"protocol (the same budget for every class). The sum is at most {MAX_SAMPLES}.",
    )
    keep_per_stage: list[Annotated[StrictInt, Field(ge=1, le=MAX_CLASSES)]] = Field(
        default=[5],
        max_length=MAX_STAGES - 1,
        description="Classes kept after each stage but the last (non-increasing; capped at the classes left).",
        validate_default=True,
    )
    t_min: StrictInt = Field(default=0, ge=0, le=999, description="Smallest timestep sampled (inclusive).")
    t_max: StrictInt = Field(
        default=1000,
        ge=1,
        le=1000,
        description="Timesteps are spread uniformly over [t_min, t_max); at most the model's training timesteps.",
        validate_default=True,
    )
    error_weighting: Literal["uniform", "vlb"] = Field(
        default="uniform",
        description="Weight of each timestep's error: uniform (the paper's choice) or the DDPM variational bound's.",
    )
    batch_size: StrictInt = Field(default=64, ge=1, le=256, description="(sample, class) items per UNet forward.")

    @field_validator("images")
    @classmethod
    def _one_image_field(cls, images: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if (info.data.get("image") is None) == (images is None):
            raise ValueError("give either image or images, not both and not neither")
        return images

    @field_validator("template")
    @classmethod
    def _classes_given_once(cls, template: str, info: ValidationInfo) -> str:
        prompts, names = info.data.get("prompts"), info.data.get("class_names")
        if "prompts" not in info.data or "class_names" not in info.data:
            return template  # one of them failed its own check, which names it
        if (prompts is None) == (names is None):
            raise ValueError("give the classes as either prompts or class_names (with template), not both")
        if names is not None and template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one {{}}, got {template!r}")
        classes = names if names is not None else prompts or []
        if len(set(classes)) != len(classes):
            raise ValueError("the classes must be distinct")
        return template

    @field_validator("samples_per_stage")
    @classmethod
    def _samples(cls, samples: list[int]) -> list[int]:
        return check_samples(samples)

    @field_validator("keep_per_stage")
    @classmethod
    def _schedule(cls, keep: list[int], info: ValidationInfo) -> list[int]:
        samples = info.data.get("samples_per_stage")
        if samples is None:
            return keep
        check_keep(keep, samples)
        n_classes = len(info.data.get("prompts") or info.data.get("class_names") or [])
        alive, evaluations = n_classes, 0
        for stage, n in enumerate(samples):
            evaluations += alive * n
            alive = min(alive, keep[stage]) if stage < len(keep) else alive
        if evaluations > MAX_EVALUATIONS:
            raise ValueError(f"the schedule plans {evaluations} UNet evaluations per image, at most {MAX_EVALUATIONS}")
        return keep

    @field_validator("t_max")
    @classmethod
    def _range(cls, t_max: int, info: ValidationInfo) -> int:
        t_min = info.data.get("t_min")
        if t_min is not None and t_min >= t_max:
            raise ValueError(f"must be greater than t_min, got t_min={t_min}, t_max={t_max}")
        return t_max


SPEC = MethodSpec(
    kind="diffusion-classifier",
    group="classifications",
    summary="Diffusion Classifier: rank candidate classes by the model's denoising error under each class "
    "prompt, with shared (t, eps) samples and the adaptive schedule; the ranking and scores are the job's result. "
    f"At most {MAX_CLASSES} classes and {MAX_IMAGES} images per job.",
    request=DiffusionClassifierRequest,
    runner="models.classification.diffusion_classifier",
    paper="Li et al., Your Diffusion Model is Secretly a Zero-Shot Classifier, ICCV 2023",
)
