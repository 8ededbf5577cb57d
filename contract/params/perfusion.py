"""Request schema of `perfusion`."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictFloat

from contract.params.common import TrainingRequest
from contract.params.dreambooth import BatchSize, LearningRate, RequiredClassWord, TrainingSteps
from contract.spec import MethodSpec


class PerfusionRequest(TrainingRequest):
    """Learn a concept as key-locked, gated rank-one edits of cross-attention K and V (about a kilobyte per layer)."""

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
    steps: TrainingSteps = 200
    learning_rate: LearningRate = 2e-3
    batch_size: BatchSize = 2
    gate_bias: StrictFloat = Field(
        default=0.75,
        ge=-10.0,
        le=10.0,
        description="beta: the energy along the concept at which the gate is half open.",
    )
    gate_temperature: StrictFloat = Field(
        default=0.1, gt=0.0, le=10.0, description="tau: how sharply the gate opens around beta."
    )


SPEC = MethodSpec(
    kind="perfusion",
    group="trainings",
    summary="Perfusion: key-locked rank-one editing; the concept's key locked to its class word, its value learned, "
    "a sigmoid gate so the strength is set at inference (the adapter scale) and concepts combine.",
    request=PerfusionRequest,
    runner="models.personalization.perfusion",
    queue="training",
    paper="Tewel et al., Key-Locked Rank One Editing for Text-to-Image Personalization, SIGGRAPH 2023",
    adapters="none",
    resumable=True,
)
