"""Request schema of `ddim-inversion`."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, StrictFloat, StrictInt

from contract.params.common import MAX_PROMPT_CHARS, ImageRef, JobRequest
from contract.spec import MethodSpec

InversionSteps = Annotated[
    StrictInt,
    Field(ge=1, le=200, description="DDIM steps each way (inversion, then reconstruction); more is more exact."),
]


class DDIMInversionRequest(JobRequest):
    """Invert an image to noise with DDIM and reconstruct it from that noise."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "file_0123456789abcdef01234567",
                    "prompt": "a large red circle at the center",
                    "steps": 50,
                }
            ]
        },
    )

    image: ImageRef
    prompt: str = Field(
        default="",
        max_length=MAX_PROMPT_CHARS,
        description="The image's caption, used both ways; empty inverts with the unconditional model.",
    )
    steps: InversionSteps = 50
    guidance_scale: StrictFloat = Field(
        default=1.0,
        ge=1.0,
        le=30.0,
        description="Classifier-free guidance w, the same both ways. 1 (one conditional pass per step) "
        "reconstructs best; the inversion drifts as w grows (null-text inversion would be needed).",
    )


SPEC = MethodSpec(
    kind="ddim-inversion",
    group="edits",
    summary="DDIM inversion: run the deterministic DDIM sampler backwards to noise, then forward again; "
    "returns the reconstruction and its PSNR.",
    request=DDIMInversionRequest,
    runner="models.editing.ddim_inversion",
    paper="Song et al., Denoising Diffusion Implicit Models, ICLR 2021",
)
