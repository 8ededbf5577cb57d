"""Control conditions of a rendered ShapesWorld scene, as a user would give them: what the zoo's control models
are trained on and what the control bench feeds them.

    canny   the Canny edges of the scene's image (the `canny` preprocessor, as an uploaded photo gets them)
    mask    the union of the objects' masks, white on black (a segmentation)
    sketch  the objects' outlines only, white strokes on black (a line drawing, as `scribble` leaves a pen sketch)
"""

from __future__ import annotations

import numpy as np

from models.control.preprocess import preprocess
from models.shapes.world import Rendered

CONDITIONS = ("canny", "mask", "sketch")


def scene_condition(rendered: Rendered, kind: str) -> np.ndarray:
    """The condition `kind` of a rendered scene: (S, S, 3) uint8, values 0 and 255."""
    if kind == "canny":
        return preprocess("canny", rendered.image)
    if kind == "mask":
        union = np.asarray(rendered.masks).sum(axis=0) > 0
        return np.repeat(union[..., None] * np.uint8(255), 3, axis=2).astype(np.uint8)
    if kind == "sketch":
        return np.repeat(rendered.edges[..., None], 3, axis=2)
    raise ValueError(f"condition must be one of {CONDITIONS}, got {kind!r}")
