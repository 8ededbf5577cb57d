"""Input checks every image method shares: the image's size against the VAE, step counts, guidance.

Each raises ValueError with a message naming the field, which the worker turns into a job's `invalid_input`.
"""

from __future__ import annotations

from PIL import Image

from models.common.components import Components


def check_image(components: Components, image: Image.Image, name: str = "image") -> None:
    """Raise ValueError unless both sides of `image` are multiples of the VAE's downsampling factor."""
    factor = components.vae_scale
    width, height = image.size
    if width % factor or height % factor:
        raise ValueError(f"{name} size must be a multiple of {factor}, got {width}x{height}")


def check_steps(components: Components, steps: int) -> None:
    """Raise ValueError unless 1 <= steps <= the scheduler's training timesteps."""
    limit = int(components.scheduler_config.get("num_train_timesteps", 1000))
    if not 1 <= steps <= limit:
        raise ValueError(f"steps must be in [1, {limit}], got {steps}")


def check_guidance(guidance_scale: float) -> None:
    """Raise ValueError unless guidance_scale >= 1 (1 is the conditional model alone, no guidance)."""
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale must be >= 1, got {guidance_scale}")
