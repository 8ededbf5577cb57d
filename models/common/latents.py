"""Between images and VAE latents, and the noise every method starts from."""

from __future__ import annotations

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
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    posterior = vae.encode(pixels).latent_dist
    if generator is None:
        latents = posterior.mean
    else:
        noise = randn(posterior.mean.shape, generator, vae.device, vae.dtype)
        latents = posterior.mean + posterior.std * noise
    return latents * vae.config.scaling_factor


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> pixels (B, 3, h*f, w*f) in [-1, 1]."""
    return vae.decode(latents / vae.config.scaling_factor).sample


def randn(
    shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (CPU), so a seed gives the same noise on any device."""
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32).to(
        device=device, dtype=dtype
    )
