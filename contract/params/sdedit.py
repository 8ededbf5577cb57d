"""Request schema of `sdedit`."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictFloat

from contract.params.common import ControlledRequest, GuidanceScale, ImageRef, NegativePrompt, Prompt, Steps
from contract.spec import WITH_SDXL, MethodSpec


class SDEditRequest(ControlledRequest):
    """Edit an image by noising it to `strength` and denoising it towards the prompt.

    The same job serves SDEdit's guided-synthesis uses: the image may be a crude colour-stroke painting
    (it becomes a realistic image) or a cut-and-paste composite (the pasted patch is harmonised). The
    prompt describes the image wanted; higher strength trades faithfulness to the input for realism.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "file_0123456789abcdef01234567",
                    "prompt": "a large blue square at the center",
                    "strength": 0.6,
                    "steps": 20,
                },
                {
                    "image": "file_0123456789abcdef01234568",
                    "prompt": "a small red circle at the top left and a large green triangle at the bottom right",
                    "strength": 0.7,
                    "steps": 25,
                },
            ]
        },
    )

    image: ImageRef
    prompt: Prompt
    strength: StrictFloat = Field(default=0.6, gt=0.0, le=1.0, description="t0 / T: 0 keeps the input, 1 ignores it.")
    steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    negative_prompt: NegativePrompt = ""


SPEC = MethodSpec(
    kind="sdedit",
    group="edits",
    summary="SDEdit: perturb the image with noise to t0 = strength * T, then denoise towards the prompt. "
    "Also turns a colour-stroke painting into a realistic image and harmonises a pasted composite.",
    request=SDEditRequest,
    runner="models.editing.sdedit",
    control_size="image",
    families=WITH_SDXL,
    paper="Meng et al., SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations, ICLR 2022",
)
