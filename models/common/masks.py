"""Small pure helpers for binary masks: rescaling, binarising, dilating, moving between pixel and latent grids.

A mask tensor is (B, 1, h, w) float with values in [0, 1] (1 = edit, 0 = keep); a binary mask holds only 0
and 1. A mask image is a PIL "L" image, 255 = edit, 0 = keep.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def rescale(values: torch.Tensor, clip_quantile: float = 1.0) -> torch.Tensor:
    """Min-max rescale each map of `values` (B, 1, h, w) to [0, 1], after clipping it at its `clip_quantile`.

    Clipping below 1.0 removes a few extreme values, so one outlier cell cannot push the rest of the map
    towards 0. A constant map becomes all zeros.
    """
    if not 0.0 < clip_quantile <= 1.0:
        raise ValueError(f"clip_quantile must be in (0, 1], got {clip_quantile}")
    flat = values.flatten(1).float()  # (B, h*w)
    top = torch.quantile(flat, clip_quantile, dim=1, keepdim=True)
    flat = torch.minimum(flat, top)
    low = flat.min(dim=1, keepdim=True).values
    span = (flat.max(dim=1, keepdim=True).values - low).clamp_min(torch.finfo(flat.dtype).tiny)
    return ((flat - low) / span).reshape(values.shape)


def binarize(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where `values` (B, 1, h, w) >= threshold, else 0 (same shape, float)."""
    return (values >= threshold).to(values.dtype)


def dilate(mask: torch.Tensor, cells: int) -> torch.Tensor:
    """Grow a binary mask (B, 1, h, w) by `cells` in every direction (a (2 cells + 1) square max filter)."""
    if cells < 0:
        raise ValueError(f"cells must be >= 0, got {cells}")
    if cells == 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * cells + 1, stride=1, padding=cells)


def to_latent(mask: torch.Tensor, factor: int, coverage: float = 0.0) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) -> latent mask (B, 1, H/factor, W/factor): 1 where more than `coverage` of the
    cell's pixels are set (0.0: any pixel, the conservative choice for "may change")."""
    height, width = mask.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"mask size must be a multiple of {factor}, got {width}x{height}")
    covered = F.avg_pool2d(mask.float(), kernel_size=factor)
    return (covered > coverage).to(mask.dtype if mask.is_floating_point() else torch.float32)


def to_pixels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Latent mask (B, 1, h, w) -> pixel mask (B, 1, H, W) for `size` = (width, height), nearest neighbour."""
    width, height = size
    return F.interpolate(mask.float(), size=(height, width), mode="nearest")


def to_image(mask: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """The first mask of (B, 1, h, w), nearest-resized to `size` = (width, height) if given -> PIL "L" 0/255."""
    if size is not None:
        mask = to_pixels(mask, size)
    array = (mask[0, 0].detach().float().cpu().numpy() >= 0.5).astype(np.uint8) * 255
    return Image.fromarray(array)  # (H, W) uint8 -> mode "L"


def from_image(image: Image.Image) -> torch.Tensor:
    """A mask image (any mode; set where its grey level >= 128) -> binary mask (1, 1, H, W) float."""
    array = np.asarray(image.convert("L"), dtype=np.uint8) >= 128
    return torch.from_numpy(array.astype(np.float32))[None, None]
