"""Request schema of `dreambooth`, and the default overrides the issue-5 trainings of this file's siblings share."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, StrictFloat, StrictInt

from contract.params.common import TrainingRequest, by_domain
from contract.spec import MethodSpec

TrainingSteps = Annotated[StrictInt, Field(ge=1, le=20000, description="Optimisation steps.")]
LearningRate = Annotated[StrictFloat, Field(gt=0.0, le=1.0, description="AdamW learning rate.")]
BatchSize = Annotated[StrictInt, Field(ge=1, le=64, description="Images per step (per concept).")]
RequiredClassWord = Annotated[
    str,
    Field(
        min_length=1,
        max_length=100,
        pattern=r"\S",
        description="The concept's class in the model's words (`circle`), written after the token; required here.",
    ),
]


class DreamBoothRequest(TrainingRequest):
    """Fine-tune the whole UNet on the images, with the prior-preservation loss; the adapter is a weight delta."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "images": [
                        "file_0123456789abcdef01234567",
                        "file_0123456789abcdef01234568",
                        "file_0123456789abcdef01234569",
                    ],
                    "token": "<s1>",
                    "class_word": "circle",
                    "steps": 200,
                    "prior_preservation": True,
                }
            ]
        },
    )

    class_word: RequiredClassWord
    steps: StrictInt | None = by_domain("dreambooth", "steps", "Optimisation steps.", ge=1, le=20000)
    learning_rate: StrictFloat | None = by_domain("dreambooth", "learning_rate", "AdamW learning rate.", gt=0.0, le=1.0)
    batch_size: BatchSize = 2
    prior_preservation: bool = Field(default=True, description="Add the class-prior loss on base-model images.")
    prior_loss_weight: StrictFloat = Field(default=1.0, ge=0.0, le=10.0, description="lambda of the prior loss.")
    num_class_images: StrictInt = Field(default=8, ge=1, le=200, description="Class images the base model generates.")
    class_prompt: str = Field(
        default="", max_length=200, description="Prompt of the class images; default `a <class_word>`."
    )
    class_steps: StrictInt = Field(default=25, ge=1, le=200, description="DDIM steps of each class image.")
    class_guidance_scale: StrictFloat = Field(default=7.5, ge=1.0, le=30.0, description="Guidance of the class images.")
    train_text_encoder: bool = Field(default=False, description="Also fine-tune the text encoder (and the token).")


SPEC = MethodSpec(
    kind="dreambooth",
    group="trainings",
    summary="DreamBooth: whole-UNet fine-tune of a copy of the base model on 3-10 images of a subject, with the "
    "class-specific prior-preservation loss; produces a weight-delta adapter.",
    request=DreamBoothRequest,
    runner="models.personalization.dreambooth",
    queue="training",
    paper="Ruiz et al., DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation, "
    "CVPR 2023",
    adapters="none",
    resumable=True,
    class_images=True,
)
