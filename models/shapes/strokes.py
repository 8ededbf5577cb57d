"""SDEdit's two guided-synthesis inputs made from ShapesWorld scenes (Meng et al., ICLR 2022, Sec. 5):
crude colour-stroke paintings (stroke-based image synthesis) and cut-and-paste composites (image
compositing). Both are pure functions of their scene(s) and a seeded generator.

- `stroke_painting`: the background as one flat colour (a striped background becomes its mean grey),
  each object as a few thick scribbles and a blob of its colour (jittered) around roughly its place and
  size. No outline of the shape survives: what the painting says is colour, place and rough size.
- `composite`: a rectangular patch cut from a source scene around its first object -- the object with
  a margin of the source's background -- pasted into a free cell of a target scene (never over the
  target's objects). A harmonised result shows both objects on the target's background.

Only solid objects are painted (the train and test splits); held-out fills raise ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from models.shapes.world import (
    BACKGROUND_RGB,
    COLORS,
    EXTENT,
    POSITIONS,
    STRIPE_RGB,
    Scene,
    cell_center,
    render,
    validate_scene,
)


def _segment_distance(xs: np.ndarray, ys: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of pixel centres (H, W) to the segment start-end (points as x, y)."""
    direction = end - start
    length2 = max(float(direction @ direction), 1e-9)
    t = np.clip(((xs - start[0]) * direction[0] + (ys - start[1]) * direction[1]) / length2, 0.0, 1.0)
    return np.hypot(xs - (start[0] + t * direction[0]), ys - (start[1] + t * direction[1]))


def _jitter(color: tuple[int, ...] | np.ndarray, rng: np.random.Generator, amount: int) -> np.ndarray:
    """An RGB colour (3,) moved by up to +-amount per channel, clipped to 0-255."""
    return np.clip(np.asarray(color) + rng.integers(-amount, amount + 1, size=3), 0, 255)


def stroke_painting(scene: Scene, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A crude colour-stroke painting (size, size, 3) uint8 of `scene`.

    Per object (lengths at 64 px, scaled by size / 64): centre moved up to 2 px from the true one;
    a blob (ellipse, radii 0.25-0.4 of the object's extent) and 3-5 strokes (segments of radius
    1.5-3 px between random points within 0.4 extent of the centre), each its own jitter (+-12 per
    channel) of the object's colour jittered by +-15. The background: its colour (mean grey for
    stripes) jittered by +-8.
    """
    # 1. Check inputs
    validate_scene(scene)
    for obj in scene.objects:
        if obj.fill != "solid":
            raise ValueError(f"stroke paintings are of solid objects, got fill {obj.fill!r}")
    scale = size / 64
    # 2. Background
    base = BACKGROUND_RGB.get(scene.background) or tuple(int(v) for v in np.mean(STRIPE_RGB, axis=0))
    painting = np.broadcast_to(_jitter(base, rng, 8), (size, size, 3)).astype(np.uint8).copy()
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    # 3. Objects: a blob and a few strokes each
    for obj in scene.objects:
        cx, cy = cell_center(obj.position, size)
        center = np.array([cx, cy]) + rng.uniform(-2, 2, size=2) * scale
        extent = EXTENT[obj.size] * scale
        color = _jitter(COLORS[obj.color], rng, 15)
        radii = extent * rng.uniform(0.25, 0.4, size=2)
        blob = ((xs - center[0]) / radii[0]) ** 2 + ((ys - center[1]) / radii[1]) ** 2 <= 1
        painting[blob] = _jitter(color, rng, 12)
        for _ in range(int(rng.integers(3, 6))):
            start, end = (center + rng.uniform(-0.4, 0.4, size=2) * extent for _ in range(2))
            stroke = _segment_distance(xs, ys, start, end) <= rng.uniform(1.5, 3.0) * scale
            painting[stroke] = _jitter(color, rng, 12)
    return painting


@dataclass(frozen=True)
class Composite:
    """A cut-and-paste composite. image: (S, S, 3) uint8; scene: what a harmonised image shows (the
    target's objects, the pasted object in its new cell, the target's background); patch: (S, S) bool,
    the pasted pixels; source_background: (S, S) bool, the pasted pixels that are the source's
    background (the patch minus the object)."""

    image: np.ndarray
    scene: Scene
    patch: np.ndarray
    source_background: np.ndarray


def composite(target: Scene, source: Scene, rng: np.random.Generator, size: int = 64, margin: int = 3) -> Composite:
    """Paste the source's first object, cut with `margin` px (at 64 px) of its background, into a free
    cell of `target` chosen by `rng`. Target object pixels are never overwritten."""
    # 1. Check inputs
    validate_scene(target)
    validate_scene(source)
    taken = {obj.position for obj in target.objects}
    free = [position for position in POSITIONS if position not in taken]
    if not free:
        raise ValueError("target has no free cell")
    # 2. Cut the patch around the source's first object
    moved = source.objects[0]
    rendered_source, rendered_target = render(source, size), render(target, size)
    pad = round(margin * size / 64)
    x0, y0, x1, y1 = (int(v) for v in rendered_source.boxes[0])
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(size, x1 + pad), min(size, y1 + pad)
    # 3. Paste it so the object's centre lands on the free cell's centre
    position = str(rng.choice(free))
    (sx, sy), (tx, ty) = cell_center(moved.position, size), cell_center(position, size)
    dx, dy = round(tx - sx), round(ty - sy)
    patch = np.zeros((size, size), dtype=bool)
    patch[max(0, y0 + dy) : min(size, y1 + dy), max(0, x0 + dx) : min(size, x1 + dx)] = True
    patch &= ~rendered_target.masks.any(axis=0)
    shifted = np.roll(rendered_source.image, (dy, dx), axis=(0, 1))
    shifted_object = np.roll(rendered_source.masks[0], (dy, dx), axis=(0, 1))
    image = rendered_target.image.copy()
    image[patch] = shifted[patch]
    scene = Scene(target.objects + (replace(moved, position=position),), target.background)
    return Composite(image, scene, patch, patch & ~shifted_object)
