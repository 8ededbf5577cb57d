"""Request schema of `instruct-pix2pix`."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictFloat

from contract.params.common import GuidanceScale, ImageRef, JobRequest, Prompt, Steps
from contract.spec import MethodSpec


class InstructPix2PixRequest(JobRequest):
    """Edit an image by a written instruction with an InstructPix2Pix model (name it in `model`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "shapes-ip2p-tiny",
                    "image": "file_0123456789abcdef01234567",
                    "instruction": "make the circle blue",
                    "steps": 50,
                    "guidance_scale": 7.5,
                    "image_guidance_scale": 1.5,
                }
            ]
        },
    )

    image: ImageRef
    instruction: Prompt = Field(description="What to change, e.g. 'make the circle blue'.")
    steps: Steps = 50
    guidance_scale: GuidanceScale = Field(
        default=7.5, description="s_T: how strongly to follow the instruction; 1 turns text guidance off."
    )
    image_guidance_scale: StrictFloat = Field(
        default=1.5,
        ge=1.0,
        le=30.0,
        description="s_I: how strongly to stay close to the input image; 1 turns image guidance off.",
    )


SPEC = MethodSpec(
    kind="instruct-pix2pix",
    group="edits",
    summary="InstructPix2Pix: edit an image by an instruction with a model whose UNet also reads the input image's "
    "latent, with separate image and text classifier-free guidance. Needs an InstructPix2Pix model (8-channel UNet).",
    request=InstructPix2PixRequest,
    runner="models.editing.instruct_pix2pix",
    requires=("instruct-pix2pix",),
    paper="Brooks et al., InstructPix2Pix: Learning to Follow Image Editing Instructions, CVPR 2023",
)
