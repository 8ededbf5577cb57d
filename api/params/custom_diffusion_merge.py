"""Request schema of `custom-diffusion-merge`: two Custom Diffusion adapters -> one (Kumari et al., sec. 3.2)."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, model_validator

from api.params.common import JobRequest
from api.registry import MethodSpec

AdapterId = Annotated[
    str, Field(min_length=1, max_length=40, pattern=r"^adp_[0-9a-f]+$", description="An adapter id (`adp_…`).")
]


class CustomDiffusionMergeRequest(JobRequest):
    """Combine two Custom Diffusion adapters into one by the paper's closed-form constrained optimisation."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"merge_adapters": ["adp_0123456789abcdef01234567", "adp_89abcdef0123456701234567"]}]
        },
    )

    merge_adapters: list[AdapterId] = Field(
        min_length=2, max_length=2, description="The ids of two custom-diffusion adapters with distinct tokens."
    )
    regularization_captions: int = Field(
        default=200, ge=8, le=2000, description="Captions whose text features the merged K/V keep (the objective)."
    )

    @model_validator(mode="after")
    def _distinct(self) -> CustomDiffusionMergeRequest:
        if self.merge_adapters[0] == self.merge_adapters[1]:
            raise ValueError("merge_adapters must be two different adapters")
        return self


SPEC = MethodSpec(
    kind="custom-diffusion-merge",
    group="trainings",
    summary="Merge two Custom Diffusion adapters by closed-form constrained least squares (paper eq. 4-5): each "
    "concept's K/V outputs kept on its captions, the rest as close to the base model as possible.",
    request=CustomDiffusionMergeRequest,
    runner="models.personalization.custom_diffusion_merge",
    queue="training",
    paper="Kumari et al., Multi-Concept Customization of Text-to-Image Diffusion, CVPR 2023, sec. 3.2",
)
