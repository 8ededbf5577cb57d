"""Request schema of `text-to-image`."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictInt

from contract.params.common import ControlledRequest, GuidanceScale, NegativePrompt, Prompt, Steps, image_side
from contract.spec import WITH_SDXL, MethodSpec


class TextToImageRequest(ControlledRequest):
    """Generate images from a prompt."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a large red circle at the center", "steps": 20, "seed": 1},
                {
                    "prompt": "a large red circle",
                    "controls": [
                        {
                            "model": "shapes-controlnet-canny",
                            "condition": "file_0123456789abcdef01234567",
                            "preprocessor": "canny",
                            "scale": 1.0,
                        }
                    ],
                },
                {
                    "prompt": "a red circle and a blue square",
                    "model": "shapes-sd-gligen",
                    "grounding": [
                        {"phrase": "a red circle", "box": [0.0, 0.0, 0.5, 0.5]},
                        {"phrase": "a blue square", "box": [0.5, 0.5, 1.0, 1.0]},
                    ],
                    "grounding_fraction": 0.5,
                },
            ]
        },
    )

    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    width: StrictInt | None = image_side("Image width in pixels.")
    height: StrictInt | None = image_side("Image height in pixels.")
    num_images: StrictInt = Field(default=1, ge=1, le=8, description="Images to generate for the prompt.")


SPEC = MethodSpec(
    kind="text-to-image",
    group="generations",
    summary="Generate images from a text prompt (latent diffusion, DDIM, classifier-free guidance).",
    request=TextToImageRequest,
    runner="models.generation.text_to_image",
    control_size=("width", "height"),
    requires=("text-to-image",),
    families=WITH_SDXL,
    paper="Rombach et al., High-Resolution Image Synthesis with Latent Diffusion Models, CVPR 2022",
)
