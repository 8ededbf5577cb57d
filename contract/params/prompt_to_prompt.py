"""Request schema of `prompt-to-prompt`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StrictFloat, StrictInt, model_validator

from contract.params.common import GuidanceScale, JobRequest, Prompt, Steps, image_side
from contract.spec import IMAGE_FIELD_MARK, MethodSpec

Word = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^\S+$", description="One word of a prompt.")]
OptionalImageRef = Annotated[
    str | None,
    Field(
        min_length=1,
        description="Optional real image to edit (DDIM inversion with the source prompt, then null-text "
        "inversion): a file id from `POST /v1/files` (`file_…`) or base64 (a `data:` URL is accepted). "
        "Without it, the source image is generated from the seed.",
        json_schema_extra={"format": IMAGE_FIELD_MARK},
    ),
]


def _words(prompt: str) -> set[str]:
    return {word.strip(".,;:!?") for word in prompt.lower().split()}


class PromptToPromptRequest(JobRequest):
    """Edit by swapping, adding or re-weighting words while the source's attention maps keep the layout."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "source_prompt": "a large red circle at the center",
                    "target_prompt": "a large blue circle at the center",
                    "mode": "replace",
                    "cross_replace_fraction": 0.8,
                    "self_replace_fraction": 0.4,
                    "steps": 25,
                    "seed": 7,
                },
                {
                    "source_prompt": "a large red circle at the center",
                    "target_prompt": "a large red circle at the center",
                    "mode": "reweight",
                    "reweight_token": "red",
                    "reweight_factor": 3.0,
                },
            ]
        },
    )

    source_prompt: Prompt
    target_prompt: Prompt
    mode: Literal["replace", "refine", "reweight"] = Field(
        default="replace",
        description="`replace`: word swap, prompts of equal token counts, every map injected. `refine`: added or "
        "removed words, maps of the shared tokens injected. `reweight`: refine plus `reweight_token` scaled.",
    )
    cross_replace_fraction: StrictFloat = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description="tau: fraction of the steps (from the start) with cross-attention injected.",
    )
    self_replace_fraction: StrictFloat = Field(
        default=0.4, ge=0.0, le=1.0, description="Fraction of the steps with the source's self-attention maps injected."
    )
    reweight_token: Word | None = Field(
        default=None, description="A word of target_prompt whose attention is scaled (required in mode `reweight`)."
    )
    reweight_factor: StrictFloat = Field(
        default=1.0, ge=0.0, le=10.0, description="Scale of reweight_token's attention: < 1 weaker, > 1 stronger."
    )
    local_blend_words: list[Word] = Field(
        default_factory=list,
        max_length=8,
        description="Restrict the edit to where these words (of either prompt) attend; outside, the source is kept.",
    )
    local_blend_threshold: StrictFloat = Field(
        default=0.3, gt=0.0, lt=1.0, description="Local blend mask: attention above this fraction of its maximum."
    )
    image: OptionalImageRef = None
    null_text_steps: StrictInt = Field(
        default=10,
        ge=0,
        le=50,
        description="Null-text optimisation iterations per step for a real image (0: plain DDIM inversion, "
        "faster, not faithful under guidance).",
    )
    steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    width: StrictInt | None = image_side("Width of a generated pair (no image).")
    height: StrictInt | None = image_side("Height of a generated pair (no image).")

    @model_validator(mode="after")
    def _words_belong_to_prompts(self) -> PromptToPromptRequest:
        if self.mode == "reweight" and self.reweight_token is None:
            raise ValueError("reweight_token is required in mode 'reweight'")
        if self.reweight_token is not None and self.reweight_token.lower() not in _words(self.target_prompt):
            raise ValueError(f"reweight_token {self.reweight_token!r} is not a word of target_prompt")
        both = _words(self.source_prompt) | _words(self.target_prompt)
        for word in self.local_blend_words:
            if word.lower().strip(".,;:!?") not in both:
                raise ValueError(f"local_blend_words: {word!r} is a word of neither prompt")
        if self.mode == "replace" and len(self.source_prompt.split()) != len(self.target_prompt.split()):
            raise ValueError("mode 'replace' swaps words one for one: the prompts need as many words; use 'refine'")
        return self


SPEC = MethodSpec(
    kind="prompt-to-prompt",
    group="edits",
    summary="Prompt-to-Prompt: edit by changing the prompt while injecting the source's attention maps "
    "(word swap, refinement, re-weighting, local blend); outputs [source, edited].",
    request=PromptToPromptRequest,
    runner="models.editing.prompt_to_prompt",
    paper="Hertz et al., Prompt-to-Prompt Image Editing with Cross-Attention Control, ICLR 2023; "
    "Mokady et al., Null-text Inversion for Editing Real Images using Guided Diffusion Models, CVPR 2023",
)
