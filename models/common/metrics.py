"""Image-quality figures that methods report in their metrics."""

from __future__ import annotations

import numpy as np
from PIL import Image

MAX_PSNR = 100.0  # dB, reported for identical images (JSON has no infinity)


def psnr(reference: Image.Image, other: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB of `other` against `reference` (8-bit RGB, same size)."""
    a = np.asarray(reference.convert("RGB"), dtype=np.float64)
    b = np.asarray(other.convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same size, got {reference.size} and {other.size}")
    mse = float(np.mean((a - b) ** 2))
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10.0 * float(np.log10(255.0**2 / mse)))
