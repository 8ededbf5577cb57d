"""Text-to-image with latent diffusion (Rombach et al., CVPR 2022) and DDIM sampling.

Implemented: classifier-free guidance, negative prompt, several images per prompt, SDXL's two text encoders and
added conditioning (`models/common/conditioning.py`), ControlNets
(`inputs["controls"]`, see `models/control/controlnet.py`) and T2I-Adapters (`inputs["t2i_adapters"]`,
`models/control/adapter.py`) and GLIGEN grounding (`inputs["grounding"]`, `models/control/gligen.py`).
Not implemented: other samplers, img2img (see `models/editing/sdedit.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.conditioning import encode_guided
from models.common.latents import decode, randn, tensor_to_images
from models.common.sampling import ddim_sample
from models.common.text import check_prompt
from models.control.inputs import ControlInputs, control_inputs


@dataclass(frozen=True)
class Params:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    width: int | None = None  # None: the model's native size (Components.side)
    height: int | None = None
    num_images: int = 1


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, object] | None = None,
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Generate `params.num_images` images for `params.prompt`."""
    # 1. Check inputs
    factor = components.vae_scale
    for name, value in (("width", components.side(params.width)), ("height", components.side(params.height))):
        if value % factor:
            raise ValueError(f"{name} must be a multiple of {factor}, got {value}")
    if params.steps < 1:
        raise ValueError(f"steps must be at least 1, got {params.steps}")
    check_prompt(components.tokenizer, params.prompt)
    check_prompt(components.tokenizer, params.negative_prompt, "negative_prompt")
    with control_inputs(
        components, inputs or {}, components.side(params.width), components.side(params.height)
    ) as control:
        return _generate(components, params, generator, callback, control)


def _generate(
    components: Components,
    params: Params,
    generator: torch.Generator,
    callback: ProgressCallback,
    control: ControlInputs,
) -> MethodOutput:
    """Steps 2-5 of `run`, inside its control context."""
    factor = components.vae_scale
    # 2. Encode prompts (and SDXL's added conditioning)
    batch = params.num_images
    height, width = components.side(params.height), components.side(params.width)
    cond, uncond, added = encode_guided(
        components, [params.prompt] * batch, [params.negative_prompt] * batch, height, width
    )

    # 3. Prepare timesteps and initial noise
    scheduler = components.ddim()
    scheduler.set_timesteps(params.steps, device=components.device)
    shape = (batch, components.unet.config.in_channels, height // factor, width // factor)
    latents = randn(shape, generator, components.device, components.dtype) * scheduler.init_noise_sigma

    # 4. Denoise
    latents = ddim_sample(
        components.unet,
        scheduler,
        latents,
        scheduler.timesteps,
        cond,
        uncond,
        params.guidance_scale,
        callback,
        control,
        added,
    )

    # 5. Decode
    images = tensor_to_images(decode(components.vae, latents))
    return MethodOutput(images=images, metrics={"steps": params.steps})
