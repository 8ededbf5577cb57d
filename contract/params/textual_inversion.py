"""Request schema of `textual-inversion` (a personalization training job)."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictFloat, StrictInt

from contract.params.common import TrainingRequest, by_domain
from contract.spec import MethodSpec


class TextualInversionRequest(TrainingRequest):
    """Learn embedding vectors for a new token; nothing else of the model changes."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "images": ["file_…", "file_…", "file_…"],
                    "token": "<s1>",
                    "class_word": "diamond",
                    "num_vectors": 1,
                    "steps": 300,
                    "learning_rate": 0.005,
                    "seed": 1,
                }
            ]
        },
    )

    steps: StrictInt | None = by_domain("textual-inversion", "steps", "Optimisation steps.", ge=1, le=20000)
    learning_rate: StrictFloat | None = by_domain(
        "textual-inversion", "learning_rate", "AdamW learning rate.", gt=0.0, le=1.0
    )
    num_vectors: StrictInt = Field(default=1, ge=1, le=8, description="Embedding vectors the token stands for.")
    init_word: str = Field(
        default="", max_length=100, description="Word whose embedding starts the vectors; default: the class word."
    )


SPEC = MethodSpec(
    kind="textual-inversion",
    group="trainings",
    summary="Teach the model a concept from 3-10 images by learning a new token's embedding; makes an adapter.",
    request=TextualInversionRequest,
    runner="models.personalization.textual_inversion",
    queue="training",
    paper="Gal et al., An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual Inversion, "
    "ICLR 2023",
    adapters="none",
    resumable=True,
)
