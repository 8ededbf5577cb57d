"""Request schema of `imagic`."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, StrictFloat, StrictInt, field_validator

from contract.params.common import GuidanceScale, ImageRef, JobRequest, Prompt, by_domain
from contract.spec import MethodSpec

MAX_ETAS = 8

Eta = Annotated[StrictFloat, Field(ge=0.0, le=2.0)]
EtaList = Annotated[list[Eta], Field(min_length=1, max_length=MAX_ETAS)]


class ImagicRequest(JobRequest):
    """Edit one real image towards a target text by optimising its embedding and fine-tuning a copy of the model."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "file_0123456789abcdef01234567",
                    "target_prompt": "a large blue circle at the center on a dark background",
                    "etas": [0.6, 0.8, 1.0],
                    "embedding_steps": 100,
                    "finetune_steps": 150,
                }
            ]
        },
    )

    image: ImageRef
    target_prompt: Prompt = Field(description="The edit: a caption of the image as it should become.")
    etas: EtaList = Field(
        default_factory=lambda: [0.7],
        description=f"Interpolation weight eta of e = eta * e_tgt + (1 - eta) * e_opt, a list of up to {MAX_ETAS} "
        "(one output image each, same noise) or one number: 0 reproduces the input, 1 follows the target text.",
    )
    embedding_steps: StrictInt | None = by_domain(
        "imagic", "embedding_steps", "Stage A: Adam steps on the text embedding, model frozen.", ge=0, le=2000
    )
    embedding_lr: StrictFloat | None = by_domain("imagic", "embedding_lr", "Stage A learning rate.", gt=0.0, le=0.1)
    finetune_steps: StrictInt | None = by_domain(
        "imagic",
        "finetune_steps",
        "Stage B: Adam steps on a copy of the UNet with the embedding frozen.",
        ge=0,
        le=5000,
    )
    finetune_lr: StrictFloat | None = by_domain("imagic", "finetune_lr", "Stage B learning rate.", gt=0.0, le=1e-2)
    steps: StrictInt = Field(default=50, ge=1, le=200, description="Stage C: DDIM sampling steps per eta.")
    guidance_scale: GuidanceScale = 7.5

    @field_validator("etas", mode="before")
    @classmethod
    def one_eta_is_a_list(cls, value: object) -> object:
        """A single number is the list of that number."""
        return [value] if isinstance(value, int | float) and not isinstance(value, bool) else value


SPEC = MethodSpec(
    kind="imagic",
    group="edits",
    summary="Imagic: optimise the target text's embedding to reconstruct the image, fine-tune a copy of the model "
    "on it, then sample from eta * e_tgt + (1 - eta) * e_opt; one output per eta. Runs on the training queue.",
    request=ImagicRequest,
    runner="models.editing.imagic",
    queue="training",
    paper="Kawar et al., Imagic: Text-Based Real Image Editing with Diffusion Models, CVPR 2023",
)
