"""Between images and VAE latents, and the noise every method starts from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image


def images_to_tensor(images: list[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images (resized to `size` = (width, height) if given) -> (B, 3, H, W) in [-1, 1]."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def tensor_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def encode(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f).

    Uses the posterior mean when `generator` is None (deterministic), a sample otherwise.
    """
    dtype = vae.dtype
    with vae_precision(vae) as compute:
        posterior = vae.encode(pixels.to(device=vae.device, dtype=compute)).latent_dist
        if generator is None:
            latents = posterior.mean
        else:
            noise = randn(posterior.mean.shape, generator, vae.device, compute)
            latents = posterior.mean + posterior.std * noise
    return (latents * vae.config.scaling_factor).to(dtype)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> pixels (B, 3, h*f, w*f) in [-1, 1]."""
    with vae_precision(vae) as compute:
        return vae.decode((latents / vae.config.scaling_factor).to(compute)).sample


@contextmanager
def vae_precision(vae: AutoencoderKL) -> Iterator[torch.dtype]:
    """The dtype the VAE computes in for one call: float32 when it is held in float16 and its config says
    `force_upcast` (SDXL's VAE overflows in float16 and decodes to NaN, black images; diffusers' SDXL pipelines
    upcast it the same way), else its own. An upcast VAE goes back to float16 after the call, also on error."""
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if not upcast:
        yield vae.dtype
        return
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(torch.float16)


def randn(
    shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (CPU), so a seed gives the same noise on any device."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32).to(
        device=device, dtype=dtype
    )
