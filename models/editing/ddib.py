"""DDIB: Dual Diffusion Implicit Bridges for image-to-image translation (Su et al., ICLR 2023).

Two conditions of one diffusion model act as two domains. Translation (sec. 3, Algorithm 1) is two DDIM
ODE solves through the shared latent noise: x_s -> z_T with the source condition ("source encoder"), then
z_T -> x_t with the target condition ("target decoder"). No training, no paired data. Because both solves
are deterministic, the translation is cycle consistent: with target == source it is the DDIM inversion
round trip of `models/editing/ddim_inversion.py`, and this module shares that code (`invert_then_sample`).

Conditions here are text prompts: `source_prompt` describes the input, `target_prompt` the wanted image.
Both solves use `guidance_scale` (classifier-free guidance, Ho & Salimans 2022; 1 = the conditional model
alone, the paper's setting; > 1 strengthens the translation at the cost of a less exact inversion).
Implemented: the translation with DDIM and classifier-free guidance.
Not implemented: the paper's class-conditional and cross-model (two separately trained models) variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from models.common.checks import check_guidance, check_image, check_steps
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.latents import decode, encode, images_to_tensor, tensor_to_images
from models.common.metrics import psnr
from models.common.text import check_prompt, encode_prompts
from models.editing.ddim_inversion import invert_then_sample


@dataclass(frozen=True)
class Params:
    source_prompt: str
    target_prompt: str
    steps: int = 50
    guidance_scale: float = 3.0


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, Image.Image],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Translate `inputs["image"]` from `params.source_prompt` to `params.target_prompt` (same size).

    Deterministic: the generator is not used (the VAE encodes with its posterior mean).
    """
    # 1. Check inputs
    image = inputs["image"]
    check_image(components, image)
    check_steps(components, params.steps)
    check_guidance(params.guidance_scale)
    check_prompt(components.tokenizer, params.source_prompt, "source_prompt")
    check_prompt(components.tokenizer, params.target_prompt, "target_prompt")

    # 2. Encode prompts and image (B=1)
    source, target, uncond = (
        encode_prompts(components.text_encoder, components.tokenizer, [prompt])
        for prompt in (params.source_prompt, params.target_prompt, "")
    )
    clean = encode(components.vae, images_to_tensor([image]))

    # 3. Source encoder x_s -> z_T, then target decoder z_T -> x_t (Algorithm 1)
    latents, noise = invert_then_sample(
        components, clean, source, target, uncond, params.steps, params.guidance_scale, callback
    )

    # 4. Decode
    output = tensor_to_images(decode(components.vae, latents))[0]
    metrics: dict[str, float | int | str] = {
        "psnr_to_input": round(psnr(image, output), 3),
        "noise_std": round(float(noise.float().std()), 4),
        "steps": params.steps,
    }
    return MethodOutput(images=[output], metrics=metrics)
