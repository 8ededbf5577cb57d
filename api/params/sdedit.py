"""Request schema of `sdedit`."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from api.params.common import GuidanceScale, ImageRef, JobRequest, NegativePrompt, Prompt, Steps
from api.registry import MethodSpec


class SDEditRequest(JobRequest):
    """Edit an image by noising it to `strength` and denoising it towards the prompt."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "file_0123456789abcdef01234567",
                    "prompt": "a large blue square at the center",
                    "strength": 0.6,
                    "steps": 20,
                }
            ]
        },
    )

    image: ImageRef
    prompt: Prompt
    strength: float = Field(default=0.6, gt=0.0, le=1.0, description="t0 / T: 0 keeps the input, 1 ignores it.")
    steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    negative_prompt: NegativePrompt = ""


SPEC = MethodSpec(
    kind="sdedit",
    group="edits",
    summary="SDEdit: perturb the image with noise to t0 = strength * T, then denoise towards the prompt.",
    request=SDEditRequest,
    runner="models.editing.sdedit",
    paper="Meng et al., SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations, ICLR 2022",
)
