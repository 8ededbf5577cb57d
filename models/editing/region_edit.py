"""Region edit: SDEdit inside a mask, with spatially sparse inference (Meng et al., SDEdit, ICLR 2022;
Li et al., "Efficient Spatially Sparse Inference for Conditional GANs and Diffusion Models" -- SIGE,
NeurIPS 2022).

The input is noised to t0 = strength * T and denoised towards the prompt, as in SDEdit, but only
inside the mask: before every UNet step the latent outside the (dilated) mask is set to the original's
latent noised to that step's level, q(z_t | z_0) with the job's one noise draw (SIGE's inpainting loop;
also Blended Latent Diffusion), and at the end the output is composited in pixel space, so every pixel
outside the dilated mask is exactly the input's.

With `sparse` (the default), each step first runs the UNet densely on the original's noised latent and
records its activations, then runs it on the edited latent recomputing only the tiles the mask touches
(`models/common/sparse.py`). Outside the mask the two latents are equal by construction, which is the
premise of SIGE. `sparse=False` runs the same loop with the plain dense UNet: the reference the sparse
result approximates.

Implemented: the mask is white = edit (luminance > 127), a latent cell is edited when any of its pixels
is, dilated by `dilation` cells; DDIM, classifier-free guidance; with `sparse=False`, the controls of
`models/control/` (`inputs["controls"]`, `["t2i_adapters"]`, `["grounding"]`) steer the edit pass.
Not implemented: sparse VAE encoding and decoding (SIGE also does them), and reusing the original's
activations across jobs: the record pass runs in the job, so a sparse job does more UNet work than a
dense one; `metrics` report the edit passes and the record passes separately. Controls with `sparse`: the
recorded activations would have to include the control residuals of both latents; refused for now.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.latents import decode, encode, images_to_tensor, randn, tensor_to_images
from models.common.sampling import guided_noise, start_timesteps
from models.common.sparse import sparse_inference
from models.common.text import check_prompt, encode_prompts
from models.control.inputs import ControlInputs, control_inputs


@dataclass(frozen=True)
class Params:
    prompt: str
    strength: float = 0.75
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    sparse: bool = True
    dilation: int = 1  # latent cells added around the mask: the edited region
    tile: int = 4  # SIGE block side, in feature-map cells
    sparse_margin: int = 1  # cells added around the region at every UNet resolution before tiling (SIGE)


def latent_mask(mask: Image.Image, factor: int, dilation: int) -> torch.Tensor:
    """Mask image (W, H) -> (H/f, W/f) bool: a latent cell is edited when any of its f x f pixels is
    white (luminance > 127), then grown by `dilation` cells (a square structuring element)."""
    pixels = torch.from_numpy(np.asarray(mask.convert("L")) > 127)
    cells = F.max_pool2d(pixels[None, None].float(), factor)
    if dilation:
        cells = F.max_pool2d(cells, 2 * dilation + 1, stride=1, padding=dilation)
    return cells[0, 0] > 0


def check_inputs(components: Components, params: Params, inputs: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad value."""
    if not 0.0 < params.strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {params.strength}")
    if params.steps < 1:
        raise ValueError(f"steps must be at least 1, got {params.steps}")
    if params.dilation < 0:
        raise ValueError(f"dilation must be at least 0, got {params.dilation}")
    if params.tile < 1:
        raise ValueError(f"tile must be at least 1, got {params.tile}")
    if params.sparse_margin < 0:
        raise ValueError(f"sparse_margin must be at least 0, got {params.sparse_margin}")
    for name in ("image", "mask"):
        if name not in inputs:
            raise ValueError(f"{name} is required")
    image, mask = inputs["image"], inputs["mask"]
    factor = components.vae_scale
    width, height = image.size
    if width % factor or height % factor:
        raise ValueError(f"image size must be a multiple of {factor}, got {width}x{height}")
    if mask.size != image.size:
        raise ValueError(f"mask size must equal the image size {width}x{height}, got {mask.size[0]}x{mask.size[1]}")
    if not (np.asarray(mask.convert("L")) > 127).any():
        raise ValueError("mask has no white pixels: nothing to edit (white marks the region to edit)")
    if params.sparse and any(inputs.get(name) for name in ("controls", "t2i_adapters", "grounding")):
        raise ValueError("controls and grounding need sparse=false (the sparse pass cannot take them yet)")
    check_prompt(components.tokenizer, params.prompt)
    check_prompt(components.tokenizer, params.negative_prompt, "negative_prompt")


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, Any],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Edit `inputs["image"]` inside `inputs["mask"]` (white = edit) towards `params.prompt`.

    Returns the edited image (the input's size) and, as `region`, the dilated mask actually edited.
    """
    # 1. Check inputs
    check_inputs(components, params, inputs)
    with control_inputs(components, inputs, *inputs["image"].size) as control:
        return _edit(components, params, inputs, generator, callback, control)


def _edit(
    components: Components,
    params: Params,
    inputs: dict[str, Any],
    generator: torch.Generator,
    callback: ProgressCallback,
    control: ControlInputs,
) -> MethodOutput:
    """Steps 2-6 of `run`, inside its control context."""
    image = inputs["image"]
    factor = components.vae_scale

    # 2. Encode prompt and image
    cond = encode_prompts(components.text_encoder, components.tokenizer, [params.prompt])
    uncond = encode_prompts(components.text_encoder, components.tokenizer, [params.negative_prompt])
    clean = encode(components.vae, images_to_tensor([image]))  # (1, 4, H/f, W/f)

    # 3. The edited region: latent cells (h, w), and the same region in pixels (H, W)
    region = latent_mask(inputs["mask"], factor, params.dilation).to(components.device)
    inside = region[None, None]  # broadcasts over (1, 4, h, w)
    region_pixels = region.repeat_interleave(factor, 0).repeat_interleave(factor, 1)

    # 4. Perturb to t0 (SDEdit eq. 2); the same noise gives the original's latent at every level
    scheduler = components.ddim()
    scheduler.set_timesteps(params.steps, device=components.device)
    timesteps = start_timesteps(scheduler.timesteps, params.strength)
    noise = randn(clean.shape, generator, components.device, components.dtype)
    latents = scheduler.add_noise(clean, noise, timesteps[:1])

    # 5. Denoise inside the region; outside it the latent is the original's at each level
    edit_seconds = record_seconds = 0.0
    sparse = sparse_inference(components.unet, region, params.tile, params.sparse_margin)  # entered only if asked
    with sparse if params.sparse else nullcontext() as engine:
        for index, timestep in enumerate(timesteps):
            reference = scheduler.add_noise(clean, noise, timestep[None])  # q(z_t | z_0)
            latents = torch.where(inside, latents, reference)
            if engine is not None:  # SIGE: the original's activations, then the sparse pass
                started = time.perf_counter()
                engine.set_mode("record")
                reference_input = scheduler.scale_model_input(reference, timestep)
                guided_noise(components.unet, reference_input, timestep, cond, uncond, params.guidance_scale)
                engine.set_mode("sparse")
                record_seconds += time.perf_counter() - started
            started = time.perf_counter()
            model_input = scheduler.scale_model_input(latents, timestep)
            extras = None
            if control:
                control.step(index, len(timesteps))
                extras = partial(control.extras, index, len(timesteps))
            eps = guided_noise(components.unet, model_input, timestep, cond, uncond, params.guidance_scale, extras)
            edit_seconds += time.perf_counter() - started
            latents = scheduler.step(eps, timestep, latents).prev_sample
            callback(index + 1, len(timesteps))
        active_fraction = engine.region(*region.shape).fraction if engine is not None else 1.0
    latents = torch.where(inside, latents, clean)

    # 6. Decode, then composite in pixel space: outside the region the output is the input, bit for bit
    decoded = np.asarray(tensor_to_images(decode(components.vae, latents))[0])
    keep = ~region_pixels.cpu().numpy()
    output = Image.fromarray(np.where(keep[:, :, None], np.asarray(image.convert("RGB")), decoded))
    edited = Image.fromarray((~keep).astype(np.uint8) * 255)
    return MethodOutput(
        images=[output],
        extra_images={"region": edited},
        metrics={
            "denoising_steps": len(timesteps),
            "strength": params.strength,
            "sparse": int(params.sparse),
            "region_fraction": round(float(region.float().mean()), 4),
            "active_fraction": round(active_fraction, 4),
            "unet_seconds": round(edit_seconds, 4),
            "unet_record_seconds": round(record_seconds, 4),
        },
    )
