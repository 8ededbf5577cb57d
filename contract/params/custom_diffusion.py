"""Request schema of `custom-diffusion` (one concept, or two trained jointly)."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, StrictFloat, StrictInt, model_validator

from contract.params.common import ConceptToken, TrainingRequest, by_domain
from contract.params.dreambooth import BatchSize, RequiredClassWord
from contract.spec import IMAGE_LIST_FIELD_MARK, MethodSpec

OptionalTrainingImages = Annotated[
    list[str] | None,
    Field(
        min_length=3,
        max_length=10,
        description="3-10 images of the second concept (file ids), for joint two-concept training.",
        json_schema_extra={"format": IMAGE_LIST_FIELD_MARK},
    ),
]


class CustomDiffusionRequest(TrainingRequest):
    """Train only the cross-attention K/V and a modifier token; optionally a second concept jointly."""

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
                }
            ]
        },
    )

    class_word: RequiredClassWord
    steps: StrictInt | None = by_domain("custom-diffusion", "steps", "Optimisation steps.", ge=1, le=20000)
    learning_rate: StrictFloat | None = by_domain(
        "custom-diffusion", "learning_rate", "AdamW learning rate.", gt=0.0, le=1.0
    )
    batch_size: BatchSize = 2
    regularization: bool = Field(default=True, description="Add the loss on class images the base model generates.")
    prior_loss_weight: StrictFloat = Field(
        default=1.0, ge=0.0, le=10.0, description="Weight of the regularisation loss."
    )
    num_class_images: StrictInt = Field(default=8, ge=1, le=200, description="Regularisation images per concept.")
    class_steps: StrictInt = Field(default=25, ge=1, le=200, description="DDIM steps of each regularisation image.")
    class_guidance_scale: StrictFloat = Field(default=7.5, ge=1.0, le=30.0, description="Guidance of those images.")
    second_images: OptionalTrainingImages = Field(default=None, validate_default=True)
    second_token: ConceptToken | None = None
    second_class_word: RequiredClassWord | None = None

    @model_validator(mode="after")
    def _second_concept_complete(self) -> CustomDiffusionRequest:
        given = [self.second_images is not None, self.second_token is not None, self.second_class_word is not None]
        if any(given) and not all(given):
            raise ValueError("second_images, second_token and second_class_word go together (a second concept)")
        if self.second_token is not None and self.second_token == self.token:
            raise ValueError("second_token must differ from token")
        return self

    def method_params(self) -> dict[str, object]:
        values = super().method_params()
        values["second_token"] = self.second_token or ""
        values["second_class_word"] = self.second_class_word or ""
        return values


SPEC = MethodSpec(
    kind="custom-diffusion",
    group="trainings",
    summary="Custom Diffusion: fine-tune only cross-attention K/V and a modifier token (two concepts jointly "
    "with second_*), with regularisation images; the adapter also loads with diffusers' load_attn_procs.",
    request=CustomDiffusionRequest,
    runner="models.personalization.custom_diffusion",
    queue="training",
    paper="Kumari et al., Multi-Concept Customization of Text-to-Image Diffusion, CVPR 2023",
    adapters="none",
    resumable=True,
    class_images=True,
)
