"""DDIM inversion (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021): invert an image, rebuild it.

DDIM with eta = 0 is a discretised ODE (sec. 4.3, eq. 13), so its update can be run backwards: the image's
VAE latent z_0 goes to a noise z_T with the same model and prompt, and the forward sampler takes z_T back to
z_0. The inversion is approximate: each inverse step predicts the noise at level t_k from the latent at
t_{k-1}, an error that shrinks with the step size. With `guidance_scale` 1 (the default, one conditional UNet
pass per step) both directions follow the conditional model's ODE and the round trip is as exact as the
step count allows; classifier-free guidance > 1 amplifies the per-step mismatch, so the reconstruction
degrades (null-text inversion, Mokady et al. 2023, repairs that; not implemented here).

The output is the reconstruction; its metrics are the PSNR against the input and against the VAE round
trip (the ceiling: inversion cannot beat the autoencoder), the latent error and the std of the inverted
noise (about 1 when the inversion lands on the model's prior).
This module also holds the shared core of DDIB (`invert_then_sample`), which is this round trip with a
different prompt for the way back.
Not implemented: null-text inversion; returning the inverted noise itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from models.common.checks import check_guidance, check_image, check_steps
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.inversion import ddim_invert
from models.common.latents import decode, encode, images_to_tensor, tensor_to_images
from models.common.metrics import psnr
from models.common.progress import offset_progress
from models.common.sampling import ddim_sample
from models.common.text import check_prompt, encode_prompts


@dataclass(frozen=True)
class Params:
    prompt: str = ""
    steps: int = 50
    guidance_scale: float = 1.0


def invert_then_sample(
    components: Components,
    clean: torch.Tensor,
    source_cond: torch.Tensor,
    target_cond: torch.Tensor,
    uncond: torch.Tensor,
    steps: int,
    guidance_scale: float,
    callback: ProgressCallback = no_progress,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM-invert `clean` latents (B, C, h, w) to noise with `source_cond`, then sample back with `target_cond`.

    source_cond, target_cond, uncond: (B, L, D). Both directions use the same `guidance_scale` and `steps`,
    so with target == source this is the DDIM round trip. Reports 2 * steps progress steps.
    Returns (latents (B, C, h, w) after sampling, the inverted noise z_T (B, C, h, w)).
    """
    # 1. Inversion z_0 -> z_T (DDIM eq. 13 backwards, timesteps ascending)
    inverse = components.ddim_inverse()
    inverse.set_timesteps(steps, device=components.device)
    trajectory = ddim_invert(
        components.unet,
        inverse,
        clean,
        source_cond,
        uncond,
        guidance_scale,
        callback=offset_progress(callback, 0, 2 * steps),
    )
    noise = trajectory[-1]
    # 2. Sampling z_T -> z_0 through the same timesteps, descending
    scheduler = components.ddim()
    scheduler.set_timesteps(steps, device=components.device)
    latents = ddim_sample(
        components.unet,
        scheduler,
        noise,
        scheduler.timesteps,
        target_cond,
        uncond,
        guidance_scale,
        offset_progress(callback, steps, 2 * steps),
    )
    return latents, noise


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, Image.Image],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Invert `inputs["image"]` to noise with `params.prompt` and reconstruct it (same size as the input).

    Deterministic: the generator is not used (the VAE encodes with its posterior mean).
    """
    # 1. Check inputs
    image = inputs["image"]
    check_image(components, image)
    check_steps(components, params.steps)
    check_guidance(params.guidance_scale)
    check_prompt(components.tokenizer, params.prompt)

    # 2. Encode prompt and image: z_0 = E(x) (B=1)
    cond = encode_prompts(components.text_encoder, components.tokenizer, [params.prompt])
    uncond = encode_prompts(components.text_encoder, components.tokenizer, [""])
    clean = encode(components.vae, images_to_tensor([image]))

    # 3. Invert to z_T and sample back with the same prompt
    latents, noise = invert_then_sample(
        components, clean, cond, cond, uncond, params.steps, params.guidance_scale, callback
    )

    # 4. Decode; measure against the input and against the VAE round trip D(E(x)), the ceiling
    reconstruction = tensor_to_images(decode(components.vae, latents))[0]
    round_trip = tensor_to_images(decode(components.vae, clean))[0]
    metrics: dict[str, float | int | str] = {
        "psnr": round(psnr(image, reconstruction), 3),
        "vae_round_trip_psnr": round(psnr(image, round_trip), 3),
        "psnr_vs_round_trip": round(psnr(round_trip, reconstruction), 3),
        "latent_rmse": round(float((latents - clean).float().pow(2).mean().sqrt()), 5),
        "noise_std": round(float(noise.float().std()), 4),
        "steps": params.steps,
    }
    return MethodOutput(images=[reconstruction], metrics=metrics)
