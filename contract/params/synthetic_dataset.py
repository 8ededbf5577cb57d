"""Request schema of `synthetic` (a generated dataset)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from contract.params.common import GuidanceScale, JobRequest, NegativePrompt, Prompt, Steps, image_side
from contract.params.diffusion_classifier import MAX_CLASSES, MAX_SAMPLES, MAX_STAGES, check_keep, check_samples
from contract.spec import MethodSpec

MAX_IMAGES_PER_CLASS = 500
MAX_DATASET_IMAGES = 2000


class DatasetClass(BaseModel):
    """One class of the dataset: its label, the prompt its images are drawn from, how many."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=200, description="The class label written to labels.jsonl.")
    prompt: Prompt
    count: StrictInt = Field(ge=1, le=MAX_IMAGES_PER_CLASS, description="Images to generate for this class.")


class SyntheticDatasetRequest(JobRequest):
    """A dataset archive of generated images with labels, optionally pseudo-labelled by the Diffusion Classifier."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "classes": [
                        {"label": "red", "prompt": "a large red circle at the center", "count": 8},
                        {"label": "blue", "prompt": "a large blue circle at the center", "count": 8},
                    ],
                    "steps": 25,
                    "guidance_scale": 7.5,
                    "pseudo_label": True,
                    "seed": 1,
                }
            ]
        },
    )

    classes: list[DatasetClass] = Field(
        min_length=1,
        max_length=MAX_CLASSES,
        description=f"Up to {MAX_CLASSES} classes with distinct labels; at most {MAX_DATASET_IMAGES} images in all.",
    )
    steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    negative_prompt: NegativePrompt = ""
    width: StrictInt | None = image_side("Image width.", 1024)
    height: StrictInt | None = image_side("Image height.", 1024)
    batch_size: StrictInt = Field(default=8, ge=1, le=64, description="Images denoised together.")
    pseudo_label: bool = Field(
        default=False,
        description="Label every image with the Diffusion Classifier over the class prompts (needs >= 2 classes "
        "with distinct prompts) and report the agreement rate between prompt and pseudo-label.",
    )
    pseudo_label_samples_per_stage: list[Annotated[StrictInt, Field(ge=1, le=MAX_SAMPLES)]] = Field(
        default=[4, 12],
        min_length=1,
        max_length=MAX_STAGES,
        description="The pseudo-labeller's (t, eps) samples per stage (see diffusion-classifier).",
    )
    pseudo_label_keep_per_stage: list[Annotated[StrictInt, Field(ge=1, le=MAX_CLASSES)]] = Field(
        default=[2],
        max_length=MAX_STAGES - 1,
        description="Classes the pseudo-labeller keeps after each stage but the last (non-increasing).",
        validate_default=True,
    )

    @field_validator("classes")
    @classmethod
    def _classes(cls, classes: list[DatasetClass]) -> list[DatasetClass]:
        labels = [item.label for item in classes]
        if len(set(labels)) != len(labels):
            raise ValueError("class labels must be distinct")
        total = sum(item.count for item in classes)
        if total > MAX_DATASET_IMAGES:
            raise ValueError(f"{total} images in all, at most {MAX_DATASET_IMAGES}")
        return classes

    @field_validator("pseudo_label")
    @classmethod
    def _labellable(cls, pseudo_label: bool, info: ValidationInfo) -> bool:
        classes = info.data.get("classes")
        if pseudo_label and classes is not None:
            prompts = [item.prompt for item in classes]
            if len(prompts) < 2 or len(set(prompts)) != len(prompts):
                raise ValueError("pseudo-labelling needs at least 2 classes with distinct prompts")
        return pseudo_label

    @field_validator("pseudo_label_samples_per_stage")
    @classmethod
    def _samples(cls, samples: list[int]) -> list[int]:
        return check_samples(samples)

    @field_validator("pseudo_label_keep_per_stage")
    @classmethod
    def _schedule(cls, keep: list[int], info: ValidationInfo) -> list[int]:
        samples = info.data.get("pseudo_label_samples_per_stage")
        if samples is None:
            return keep
        return check_keep(keep, samples)


SPEC = MethodSpec(
    kind="synthetic",
    group="datasets",
    summary="Generated training data: images per class prompt in a zip (PNGs + labels.jsonl), optionally "
    "pseudo-labelled by the Diffusion Classifier with the prompt/pseudo-label agreement rate in the result.",
    request=SyntheticDatasetRequest,
    runner="models.classification.synthetic_data",
    paper="Gowal et al., Improving Robustness using Generated Data, NeurIPS 2021; Wang et al., Better Diffusion "
    "Models Further Improve Adversarial Training, ICML 2023",
)
