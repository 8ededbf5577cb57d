"""Request schema of `region-edit`."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictFloat, model_validator

from contract.params.common import ControlledRequest, GuidanceScale, ImageRef, NegativePrompt, Prompt, Steps
from contract.spec import WITH_SDXL, MethodSpec


class RegionEditRequest(ControlledRequest):
    """Edit the masked region of an image towards the prompt; outside the (slightly dilated) mask the
    output is the input, pixel for pixel.

    The mask must have the image's size; that is checked when the job runs (a failed job with
    `invalid_input`), because the API does not open the images. An all-black mask is refused the same way.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "file_0123456789abcdef01234567",
                    "mask": "file_0123456789abcdef01234568",
                    "prompt": "a large blue circle at the top left",
                    "strength": 0.8,
                    "steps": 25,
                }
            ]
        },
    )

    image: ImageRef
    mask: ImageRef = Field(
        description="White (luminance > 127) marks the region to edit; the image's size. A file id or base64, "
        "like `image`."
    )
    prompt: Prompt
    strength: StrictFloat = Field(default=0.75, gt=0.0, le=1.0, description="t0 / T inside the mask (SDEdit).")
    steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    negative_prompt: NegativePrompt = ""
    sparse: bool = Field(
        default=True,
        description="Spatially sparse inference (SIGE): recompute only the tiles the mask touches, reusing "
        "the original image's activations. false runs the dense UNet (the reference result). Controls and "
        "grounding need false.",
    )

    @model_validator(mode="after")
    def _controls_are_dense(self) -> RegionEditRequest:
        if self.sparse and (self.controls or self.grounding):
            raise ValueError("controls and grounding need sparse=false (the sparse pass cannot take them yet)")
        return self


SPEC = MethodSpec(
    kind="region-edit",
    group="edits",
    summary="Region edit: SDEdit inside a mask, with everything outside it kept exactly; spatially sparse "
    "inference recomputes only the tiles the mask touches.",
    request=RegionEditRequest,
    runner="models.editing.region_edit",
    paper="Li et al., Efficient Spatially Sparse Inference for Conditional GANs and Diffusion Models, NeurIPS 2022; "
    "Meng et al., SDEdit, ICLR 2022",
    same_size=(("mask", "image"),),
    control_size="image",
    families=WITH_SDXL,
)
