"""Request schema of `lora` (a personalization training job)."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictFloat, StrictInt

from contract.params.common import TrainingRequest, by_domain
from contract.spec import MethodSpec


class LoraRequest(TrainingRequest):
    """Train LoRA weights on the UNet's attention projections (optionally the text encoder) for a new concept."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "images": ["file_…", "file_…", "file_…"],
                    "token": "<s1>",
                    "class_word": "diamond",
                    "rank": 4,
                    "steps": 300,
                    "seed": 1,
                }
            ]
        },
    )

    steps: StrictInt | None = by_domain("lora", "steps", "Optimisation steps.", ge=1, le=20000)
    learning_rate: StrictFloat | None = by_domain("lora", "learning_rate", "AdamW learning rate.", gt=0.0, le=1.0)
    rank: StrictInt = Field(default=4, ge=1, le=128, description="LoRA rank r.")
    alpha: StrictFloat = Field(default=4.0, gt=0, le=1024, description="LoRA alpha; the update is scaled by alpha / r.")
    train_text_encoder: bool = Field(default=False, description="Also adapt the text encoder's attention.")


SPEC = MethodSpec(
    kind="lora",
    group="trainings",
    summary="Teach the model a concept from 3-10 images with LoRA on the attention projections; makes an adapter.",
    request=LoraRequest,
    runner="models.personalization.lora",
    queue="training",
    requires=("cross-attention",),
    paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022",
    adapters="none",
    resumable=True,
)
