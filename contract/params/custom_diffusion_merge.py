"""Request schema of `custom-diffusion-merge`: two Custom Diffusion adapters -> one (Kumari et al., sec. 3.2)."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictInt, field_validator

from contract.params.common import AdapterRef, JobRequest
from contract.spec import MethodSpec


class CustomDiffusionMergeRequest(JobRequest):
    """Combine two Custom Diffusion adapters into one by the paper's closed-form constrained optimisation."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"adapters": [{"id": "adp_0123456789abcdef01234567"}, {"id": "adp_89abcdef0123456701234567"}]}]
        },
    )

    adapters: list[AdapterRef] = Field(
        min_length=2,
        max_length=2,
        description="The two custom-diffusion adapters to merge (distinct modifier tokens); read, not installed, so "
        "`scale` is ignored.",
    )
    name: str = Field(default="", max_length=200, description="The merged adapter's name in the registry.")
    regularization_captions: StrictInt = Field(
        default=200, ge=8, le=2000, description="Captions whose text features the merged K/V keep (the objective)."
    )

    @field_validator("adapters")
    @classmethod
    def _two_distinct(cls, value: list[AdapterRef]) -> list[AdapterRef]:
        if len(value) == 2 and value[0].id == value[1].id:
            raise ValueError("adapters must be two different adapters")
        return value


SPEC = MethodSpec(
    kind="custom-diffusion-merge",
    group="trainings",
    summary="Merge two Custom Diffusion adapters by closed-form constrained least squares (paper eq. 4-5): each "
    "concept's K/V outputs kept on its captions, the rest as close to the base model as possible.",
    request=CustomDiffusionMergeRequest,
    runner="models.personalization.custom_diffusion_merge",
    queue="training",
    paper="Kumari et al., Multi-Concept Customization of Text-to-Image Diffusion, CVPR 2023, sec. 3.2",
    adapters="inputs",
)
