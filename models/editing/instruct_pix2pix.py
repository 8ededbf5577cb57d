"""InstructPix2Pix: learning to follow image editing instructions (Brooks et al., CVPR 2023).

The model is a latent diffusion model whose UNet takes 8 input channels: the noisy latent z_t and the VAE
latent of the input image c_I (the posterior mean, *unscaled*, as StableDiffusionInstructPix2PixPipeline
and the paper's training concatenate it), conditioned by cross-attention on the instruction c_T. Trained
with c_I and c_T each dropped (c_I to a zero latent, c_T to the empty prompt), it gives three scores that
sampling combines with two guidance scales (eq. 3):

    e~(z_t, c_I, c_T) = e(z_t, 0, 0)
                      + s_I * (e(z_t, c_I, 0)   - e(z_t, 0, 0))      image guidance: stay close to the input
                      + s_T * (e(z_t, c_I, c_T) - e(z_t, c_I, 0))    text guidance: follow the instruction

Sampling is plain DDIM (eta 0) from Gaussian noise with the three predictions in one batched UNet pass;
with s_I = s_T = 1 it reduces to the fully conditional prediction, one pass. The input image's size must
be a multiple of the VAE factor; the output has its size.

The base model must be an InstructPix2Pix model (zoo/shapes-ip2p-tiny, trained by zoo/train_ip2p.py, or
timbrooks/instruct-pix2pix in production); a 4-channel text-to-image UNet is refused.
Not implemented: eta > 0, negative instructions, the paper's Euler-ancestral sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from models.common.checks import check_image, check_steps
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.latents import decode, images_to_tensor, randn, tensor_to_images
from models.common.text import check_prompt, encode_prompts


@dataclass(frozen=True)
class Params:
    instruction: str
    steps: int = 50
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5


def check_model(components: Components) -> None:
    """Raise ValueError unless the UNet takes the noisy latent and the image latent (2 x latent channels)."""
    latent_channels = int(components.vae.config.latent_channels)
    in_channels = int(components.unet.config.in_channels)
    if in_channels != 2 * latent_channels:
        raise ValueError(
            f"model's UNet has {in_channels} input channels; instruct-pix2pix needs an InstructPix2Pix model "
            f"with {2 * latent_channels}"
        )


def image_latents(components: Components, image: Image.Image) -> torch.Tensor:
    """c_I: the VAE posterior mean of the image, unscaled (as the pipeline and training use it): (1, C, h, w)."""
    pixels = images_to_tensor([image]).to(device=components.device, dtype=components.vae.dtype)
    return components.vae.encode(pixels).latent_dist.mode().to(components.dtype)


def dual_guidance(
    eps_uncond: torch.Tensor,
    eps_image: torch.Tensor,
    eps_full: torch.Tensor,
    image_guidance_scale: float,
    guidance_scale: float,
) -> torch.Tensor:
    """Brooks et al. eq. 3 from e(z, 0, 0), e(z, c_I, 0) and e(z, c_I, c_T)."""
    return eps_uncond + image_guidance_scale * (eps_image - eps_uncond) + guidance_scale * (eps_full - eps_image)


def guided_edit_noise(
    components: Components,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    image: torch.Tensor,
    instruction: torch.Tensor,
    empty: torch.Tensor,
    params: Params,
) -> torch.Tensor:
    """The guided noise prediction at one step. latents, image: (1, C, h, w); instruction, empty: (1, L, D).

    In the model's own parameterization (eps, or v for a v-prediction model): eq. 3 is linear, and the DDIM
    scheduler of `Components.ddim()` converts the result inside `step` (models/common/prediction.py)."""
    if params.guidance_scale == 1.0 and params.image_guidance_scale == 1.0:
        return components.unet(torch.cat([latents, image], dim=1), timestep, encoder_hidden_states=instruction).sample
    # One pass over [(c_I, c_T), (c_I, 0), (0, 0)], the pipeline's order
    model_input = torch.cat([latents] * 3)
    images = torch.cat([image, image, torch.zeros_like(image)])
    texts = torch.cat([instruction, empty, empty])
    eps = components.unet(torch.cat([model_input, images], dim=1), timestep, encoder_hidden_states=texts).sample
    eps_full, eps_image, eps_uncond = eps.chunk(3)
    return dual_guidance(eps_uncond, eps_image, eps_full, params.image_guidance_scale, params.guidance_scale)


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, Image.Image],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Edit `inputs["image"]` as `params.instruction` says. The generator draws the starting noise."""
    # 1. Check inputs
    check_model(components)
    image = inputs["image"]
    check_image(components, image)
    check_steps(components, params.steps)
    if params.guidance_scale < 1.0:
        raise ValueError(f"guidance_scale must be >= 1, got {params.guidance_scale}")
    if params.image_guidance_scale < 1.0:
        raise ValueError(f"image_guidance_scale must be >= 1, got {params.image_guidance_scale}")
    check_prompt(components.tokenizer, params.instruction, "instruction")

    # 2. Condition: instruction and empty-prompt embeddings, the image latent
    instruction, empty = (
        encode_prompts(components.text_encoder, components.tokenizer, [text]) for text in (params.instruction, "")
    )
    image_latent = image_latents(components, image)

    # 3. DDIM from noise with the image concatenated to every UNet input
    scheduler = components.ddim()
    scheduler.set_timesteps(params.steps, device=components.device)
    latents = randn(image_latent.shape, generator, components.device, components.dtype) * scheduler.init_noise_sigma
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, timestep)
        noise = guided_edit_noise(components, model_input, timestep, image_latent, instruction, empty, params)
        latents = scheduler.step(noise, timestep, latents).prev_sample
        callback(index + 1, params.steps)

    # 4. Decode
    output = tensor_to_images(decode(components.vae, latents))[0]
    metrics: dict[str, float | int | str] = {
        "steps": params.steps,
        "guidance_scale": params.guidance_scale,
        "image_guidance_scale": params.image_guidance_scale,
    }
    return MethodOutput(images=[output], metrics=metrics)
