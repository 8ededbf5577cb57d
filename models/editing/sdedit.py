"""SDEdit: guided image synthesis by perturbing then denoising (Meng et al., ICLR 2022).

The input is noised to t0 = strength * T and denoised with the pretrained model and the prompt.
Low strength keeps the input (faithfulness), high strength follows the model (realism).
Implemented: the edit with DDIM and classifier-free guidance. The paper's guided-synthesis uses are this
same function with another input (Sec. 5): a crude colour-stroke painting becomes a realistic image,
and a cut-and-paste composite is harmonised (inputs of both: `models/shapes/strokes.py`; measured by
the bench group `sdedit`). Editing inside a mask: `models/editing/region_edit.py`.
ControlNets, T2I-Adapters and GLIGEN grounding in `inputs` (as in `models/generation/text_to_image.py`) steer the
denoising from t0; a ControlNet's step range counts the steps actually run.
On SDXL the prompt is encoded with both text encoders and the UNet gets SDXL's added conditioning
(`models/common/conditioning.py`), as in diffusers' `StableDiffusionXLImg2ImgPipeline`.
Not implemented: the paper's K-fold repetition of perturb-and-denoise (Algorithm 1 with K > 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from PIL import Image

from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.conditioning import encode_guided
from models.common.latents import decode, encode, images_to_tensor, randn, tensor_to_images
from models.common.sampling import ddim_sample, start_timesteps
from models.common.text import check_prompt
from models.control.inputs import ControlInputs, control_inputs


@dataclass(frozen=True)
class Params:
    prompt: str
    strength: float = 0.6
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: Mapping[str, object],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Edit `inputs["image"]` towards `params.prompt`; the output has the input's size."""
    # 1. Check inputs
    if not 0.0 < params.strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {params.strength}")
    image = inputs["image"]
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be an image, got {type(image).__name__}")
    factor = components.vae_scale
    width, height = image.size
    if width % factor or height % factor:
        raise ValueError(f"image size must be a multiple of {factor}, got {width}x{height}")
    check_prompt(components.tokenizer, params.prompt)
    check_prompt(components.tokenizer, params.negative_prompt, "negative_prompt")
    with control_inputs(components, inputs, width, height) as control:
        return _edit(components, params, image, generator, callback, control)


def _edit(
    components: Components,
    params: Params,
    image: Image.Image,
    generator: torch.Generator,
    callback: ProgressCallback,
    control: ControlInputs,
) -> MethodOutput:
    """Steps 2-5 of `run`, inside its control context."""
    # 2. Encode prompt (and SDXL's added conditioning) and image
    cond, uncond, added = encode_guided(
        components, [params.prompt], [params.negative_prompt], image.height, image.width
    )
    clean = encode(components.vae, images_to_tensor([image]))

    # 3. Perturb to t0 (SDEdit, eq. 2: x(t0) = x + sigma(t0) * z)
    scheduler = components.ddim()
    scheduler.set_timesteps(params.steps, device=components.device)
    timesteps = start_timesteps(scheduler.timesteps, params.strength)
    noise = randn(clean.shape, generator, components.device, components.dtype)
    latents = scheduler.add_noise(clean, noise, timesteps[:1])

    # 4. Denoise from t0
    latents = ddim_sample(
        components.unet, scheduler, latents, timesteps, cond, uncond, params.guidance_scale, callback, control, added
    )

    # 5. Decode
    output = tensor_to_images(decode(components.vae, latents))
    return MethodOutput(images=output, metrics={"denoising_steps": len(timesteps), "strength": params.strength})
