"""Request schema of `diffedit`."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictFloat, StrictInt

from contract.params.common import MAX_PROMPT_CHARS, GuidanceScale, ImageRef, JobRequest, Prompt
from contract.params.ddim_inversion import InversionSteps
from contract.spec import MethodSpec


class DiffEditRequest(JobRequest):
    """Edit an image towards a query caption inside a mask the model finds by itself."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "file_0123456789abcdef01234567",
                    "reference_prompt": "a large red circle at the center",
                    "query_prompt": "a large red square at the center",
                    "encoding_ratio": 0.5,
                    "steps": 50,
                }
            ]
        },
    )

    image: ImageRef
    query_prompt: Prompt = Field(description="Q: describes the edited image.")
    reference_prompt: str = Field(
        default="",
        max_length=MAX_PROMPT_CHARS,
        description="R: describes the input image; empty compares Q with the unconditional model.",
    )
    encoding_ratio: StrictFloat = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="r = t_r / T, how far the input is DDIM-encoded: higher allows larger edits, lower keeps more.",
    )
    mask_threshold: StrictFloat = Field(
        default=0.5, gt=0.0, le=1.0, description="Binarisation threshold of the rescaled noise-difference map."
    )
    n_mask_samples: StrictInt = Field(default=10, ge=1, le=64, description="Noise seeds averaged for the mask.")
    mask_dilation: StrictInt = Field(default=0, ge=0, le=8, description="Grow the mask by this many latent cells.")
    steps: InversionSteps = 50
    guidance_scale: GuidanceScale = 7.5


SPEC = MethodSpec(
    kind="diffedit",
    group="edits",
    summary="DiffEdit: a mask from the noise predictions' disagreement between reference and query captions, "
    "DDIM encoding, then decoding with the query that keeps the input outside the mask; returns the mask too.",
    request=DiffEditRequest,
    runner="models.editing.diffedit",
    paper="Couairon et al., DiffEdit: Diffusion-based Semantic Image Editing with Mask Guidance, ICLR 2023",
)
