"""DiffEdit: diffusion-based semantic image editing with mask guidance (Couairon et al., ICLR 2023).

Given an image, a reference caption R describing it (may be empty) and a query Q describing the edit, the
model finds the region to edit by itself (sec. 3.2, fig. 2):
  Step 1, mask: noise the input to t = 0.5 T with n seeds, predict the noise with R and with Q; the mask is
          the mean over seeds (and latent channels) of |eps_Q - eps_R|, with extreme values removed,
          rescaled to [0, 1] and binarised at `mask_threshold`; optionally dilated.
  Step 2, encoding: DDIM-invert the input to the encoding ratio r (t_r = r T), keeping every intermediate
          latent x_t of the original.
  Step 3, decoding with mask guidance: sample from x_r with Q (classifier-free guidance); after each step,
          outside the mask replace the latent by the inverted latent of the original at that step:
          y_{t-1} = M * y_{t-1} + (1 - M) * x_{t-1}, with x_0 the input's own latent at the end.
So outside the mask the final latent is the input's latent exactly, and the output there differs from the
VAE round trip D(E(x)) only where the decoder's receptive field reaches across the mask's border.

Choices: the mask's noise predictions are conditional only (no guidance: with both predictions guided,
eps_Q - eps_R is only scaled by w, which the rescaling removes); "extreme values removed" is a clip of
the averaged map at its 99th percentile; the encoding uses R at guidance 1 (one conditional UNet pass per
step): R describes the input, so the inversion follows the conditional ODE of the image's own caption, and
without guidance the DDIM round trip is as exact as the step count allows (see ddim_inversion.py). The paper
encodes with the unconditional model, which is R = "", the default. The mask lives on the latent grid; the
returned mask image is that grid at the image's resolution.
Not implemented: the paper's ablation variants (SDEdit-style noising instead of DDIM encoding, no mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from models.common.checks import check_guidance, check_image, check_steps
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.inversion import ddim_invert
from models.common.latents import decode, encode, images_to_tensor, randn, tensor_to_images
from models.common.masks import binarize, dilate, rescale, to_image
from models.common.prediction import to_epsilon
from models.common.progress import offset_progress
from models.common.sampling import guided_noise
from models.common.text import check_prompt, encode_prompts

MASK_NOISE_LEVEL = 0.5  # step 1 noises the input to t = 0.5 T (sec. 3.2)
MASK_CLIP_QUANTILE = 0.99  # "we remove extreme values": clip the difference map at this quantile


@dataclass(frozen=True)
class Params:
    query_prompt: str
    reference_prompt: str = ""
    encoding_ratio: float = 0.5
    mask_threshold: float = 0.5
    n_mask_samples: int = 10
    mask_dilation: int = 0
    steps: int = 50
    guidance_scale: float = 7.5


def encoding_steps(steps: int, encoding_ratio: float) -> int:
    """DDIM steps from x_0 to x_r for ratio r: round(r * steps), at least 1."""
    return max(1, min(steps, round(steps * encoding_ratio)))


def difference_map(
    components: Components,
    clean: torch.Tensor,
    reference: torch.Tensor,
    query: torch.Tensor,
    n_samples: int,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> torch.Tensor:
    """Step 1 before binarising: mean over `n_samples` noises and the channels of |eps(x_t, Q) - eps(x_t, R)|.

    clean: (1, C, h, w) latents; reference, query: (1, L, D) embeddings. Noise level t = MASK_NOISE_LEVEL * T.
    Returns (1, 1, h, w), not yet rescaled.
    """
    scheduler = components.ddim()
    timestep = torch.tensor([int(MASK_NOISE_LEVEL * scheduler.config.num_train_timesteps)], device=clean.device)
    noises = randn((n_samples, *clean.shape[1:]), generator, components.device, components.dtype)
    total = torch.zeros((1, 1, *clean.shape[2:]), device=clean.device, dtype=torch.float32)
    for index in range(n_samples):
        noisy = scheduler.add_noise(clean, noises[index : index + 1], timestep)
        # One UNet pass for both captions: batch [x_t, x_t] with [R, Q]
        both = components.unet(
            torch.cat([noisy, noisy]), timestep, encoder_hidden_states=torch.cat([reference, query])
        ).sample
        # The map is of the noise (sec. 3.2): a v-model's output converts (at one t and x_t the two captions'
        # difference is only scaled by sqrt(abar_t), which the rescaling removes, but the map stays in eps)
        eps_reference, eps_query = to_epsilon(scheduler, both, torch.cat([noisy, noisy]), timestep).chunk(2)
        total += (eps_query - eps_reference).abs().float().mean(dim=1, keepdim=True)
        callback(index + 1, n_samples)
    return total / n_samples


def edit_mask(difference: torch.Tensor, threshold: float, dilation: int) -> torch.Tensor:
    """Step 1 after averaging: clip extremes, rescale to [0, 1], binarise at `threshold`, dilate by `dilation`
    latent cells. difference: (1, 1, h, w) -> binary mask (1, 1, h, w) float."""
    scaled = rescale(difference, clip_quantile=MASK_CLIP_QUANTILE)
    return dilate(binarize(scaled, threshold), dilation)


def masked_decode(
    components: Components,
    trajectory: list[torch.Tensor],
    clean: torch.Tensor,
    mask: torch.Tensor,
    query: torch.Tensor,
    uncond: torch.Tensor,
    steps: int,
    guidance_scale: float,
    callback: ProgressCallback = no_progress,
) -> torch.Tensor:
    """Step 3: DDIM decoding with Q from trajectory[-1] with mask guidance.

    trajectory: the n inverted latents [x_{t_1}, ..., x_{t_n}] (each (1, C, h, w)) of `clean` (1, C, h, w) from
    `ddim_invert` with a scheduler at `steps` steps; mask: (1, 1, h, w) binary, 1 = edit. Returns (1, C, h, w).
    """
    n_steps = len(trajectory)
    mask = mask.to(dtype=clean.dtype)  # the map is float32; keep fp16 latents fp16
    scheduler = components.ddim()
    scheduler.set_timesteps(steps, device=components.device)
    timesteps = scheduler.timesteps[steps - n_steps :]  # t_n > ... > t_1: the tail that starts at x_r
    latents = trajectory[-1]
    for index, timestep in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, timestep)
        noise = guided_noise(components.unet, model_input, timestep, query, uncond, guidance_scale)
        latents = scheduler.step(noise, timestep, latents).prev_sample
        # y_{t-1} = M y_{t-1} + (1 - M) x_{t-1}: the step lands on the level of trajectory[n - 2 - index],
        # and the last step on x_0 itself
        original = trajectory[n_steps - 2 - index] if index < n_steps - 1 else clean
        latents = mask * latents + (1 - mask) * original
        callback(index + 1, n_steps)
    return latents


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, Image.Image],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Edit `inputs["image"]` towards `params.query_prompt` inside an automatically found mask.

    Returns the edited image (the input's size) and `extra_images["mask"]`: the binary mask used, 255 = edited,
    at the image's resolution. The generator draws the mask's noises.
    """
    # 1. Check inputs
    if not 0.0 < params.encoding_ratio <= 1.0:
        raise ValueError(f"encoding_ratio must be in (0, 1], got {params.encoding_ratio}")
    if not 0.0 < params.mask_threshold <= 1.0:
        raise ValueError(f"mask_threshold must be in (0, 1], got {params.mask_threshold}")
    if params.n_mask_samples < 1:
        raise ValueError(f"n_mask_samples must be at least 1, got {params.n_mask_samples}")
    if params.mask_dilation < 0:
        raise ValueError(f"mask_dilation must be >= 0, got {params.mask_dilation}")
    image = inputs["image"]
    check_image(components, image)
    check_steps(components, params.steps)
    check_guidance(params.guidance_scale)
    check_prompt(components.tokenizer, params.reference_prompt, "reference_prompt")
    check_prompt(components.tokenizer, params.query_prompt, "query_prompt")
    n_encoding = encoding_steps(params.steps, params.encoding_ratio)
    total = params.n_mask_samples + 2 * n_encoding

    # 2. Encode prompts and image (B=1)
    reference, query, uncond = (
        encode_prompts(components.text_encoder, components.tokenizer, [prompt])
        for prompt in (params.reference_prompt, params.query_prompt, "")
    )
    clean = encode(components.vae, images_to_tensor([image]))

    # 3. Step 1: the mask from the noise predictions' disagreement between R and Q
    difference = difference_map(
        components, clean, reference, query, params.n_mask_samples, generator, offset_progress(callback, 0, total)
    )
    mask = edit_mask(difference, params.mask_threshold, params.mask_dilation)

    # 4. Step 2: DDIM encoding x_0 -> x_r with R, keeping the trajectory
    inverse = components.ddim_inverse()
    inverse.set_timesteps(params.steps, device=components.device)
    trajectory = ddim_invert(
        components.unet,
        inverse,
        clean,
        reference,
        n_steps=n_encoding,
        callback=offset_progress(callback, params.n_mask_samples, total),
    )

    # 5. Step 3: decoding with Q and mask guidance
    latents = masked_decode(
        components,
        trajectory,
        clean,
        mask,
        query,
        uncond,
        params.steps,
        params.guidance_scale,
        offset_progress(callback, params.n_mask_samples + n_encoding, total),
    )

    # 6. Decode
    output = tensor_to_images(decode(components.vae, latents))[0]
    metrics: dict[str, float | int | str] = {
        "mask_fraction": round(float(mask.mean()), 4),
        "encoding_steps": n_encoding,
        "steps": params.steps,
    }
    return MethodOutput(images=[output], extra_images={"mask": to_image(mask, image.size)}, metrics=metrics)
