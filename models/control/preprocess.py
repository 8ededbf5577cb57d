"""Condition preprocessors for ControlNet and T2I-Adapter: an uploaded image in, a condition image out.

What users of the ControlNet tools expect (Zhang et al. 2023 train their edge and scribble models on these):
- `canny`: the Canny edge detector (Canny 1986) on the grey image, white edges on black; two hysteresis
  thresholds in [0, 255] (the ControlNet tools default to 100 and 200).
- `scribble`: a drawing binarized to white strokes on black; dark strokes on light paper are inverted first,
  so a pen sketch and an already-inverted condition give the same result.
- `none`: the image is already a condition and passes through unchanged (only converted to RGB).

The image operations are OpenCV's (`cv2.Canny`, `cv2.threshold`, `cv2.resize`), not hand-written.
Every function takes and returns RGB uint8 arrays (H, W, 3), so the output feeds any control pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PreprocessParams:
    """Thresholds of the preprocessors; each reads only its own."""

    low_threshold: int = 100  # canny: gradient below this is never an edge
    high_threshold: int = 200  # canny: gradient above this always is
    threshold: int = 127  # scribble: grey level that separates strokes from paper


def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8."""
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def _rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8, the three channels equal."""
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)


def canny(image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """White Canny edges on black, (H, W, 3) uint8."""
    if not 0 <= params.low_threshold <= params.high_threshold <= 255:
        raise ValueError(
            "canny thresholds must satisfy 0 <= low_threshold <= high_threshold <= 255, "
            f"got {params.low_threshold} and {params.high_threshold}"
        )
    return _rgb(cv2.Canny(_grey(image), params.low_threshold, params.high_threshold))


def scribble(image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """White strokes on black, (H, W, 3) uint8 with values 0 and 255 only."""
    if not 0 <= params.threshold <= 255:
        raise ValueError(f"scribble threshold must be in [0, 255], got {params.threshold}")
    grey = _grey(image)
    # Paper is the majority of a drawing: if it is light, the strokes are the dark pixels.
    if np.median(grey) > params.threshold:
        grey = 255 - grey
    _, binary = cv2.threshold(grey, params.threshold, 255, cv2.THRESH_BINARY)
    return _rgb(binary)


def passthrough(image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """The image unchanged, (H, W, 3) uint8."""
    return np.ascontiguousarray(image)


PREPROCESSORS: dict[str, Callable[[np.ndarray, PreprocessParams], np.ndarray]] = {
    "canny": canny,
    "scribble": scribble,
    "none": passthrough,
}


def preprocess(
    name: str,
    image: np.ndarray,
    size: tuple[int, int] | None = None,
    params: PreprocessParams | None = None,
) -> np.ndarray:
    """Turn `image` (H, W, 3) uint8 RGB into a condition with preprocessor `name`, first resized to
    `size` = (width, height) when given (area averaging when shrinking, so thin lines survive)."""
    # 1. Check inputs
    if name not in PREPROCESSORS:
        raise ValueError(f"preprocessor must be one of {sorted(PREPROCESSORS)}, got {name!r}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    # 2. Resize to the generation's size, before detecting (edges are then one pixel wide at that size)
    if size is not None and (image.shape[1], image.shape[0]) != size:
        shrinking = size[0] < image.shape[1]
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    # 3. Run the preprocessor
    return PREPROCESSORS[name](image, params or PreprocessParams())
