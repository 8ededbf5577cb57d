"""Request schema of `ddib`."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictFloat

from contract.params.common import ImageRef, JobRequest, Prompt
from contract.params.ddim_inversion import InversionSteps
from contract.spec import MethodSpec


class DDIBRequest(JobRequest):
    """Translate an image by DDIM-inverting it with the source prompt and sampling back with the target prompt."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "file_0123456789abcdef01234567",
                    "source_prompt": "a large red circle at the center",
                    "target_prompt": "a large red square at the center",
                    "steps": 50,
                    "guidance_scale": 3.0,
                }
            ]
        },
    )

    image: ImageRef
    source_prompt: Prompt = Field(description="Describes the input image (the source domain).")
    target_prompt: Prompt = Field(description="Describes the wanted image (the target domain).")
    steps: InversionSteps = 50
    guidance_scale: StrictFloat = Field(
        default=3.0,
        ge=1.0,
        le=30.0,
        description="Classifier-free guidance w of both ODE solves. 1 is the conditional model alone (the most "
        "exact inversion); larger values translate more strongly.",
    )


SPEC = MethodSpec(
    kind="ddib",
    group="edits",
    summary="DDIB: image-to-image translation through the shared DDIM noise (invert with the source prompt, "
    "sample with the target prompt).",
    request=DDIBRequest,
    runner="models.editing.ddib",
    paper="Su et al., Dual Diffusion Implicit Bridges for Image-to-Image Translation, ICLR 2023",
)
