"""SDEdit's guided-synthesis inputs (models/shapes/strokes.py) and the sdedit job on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.common.components import Components
from models.editing import sdedit
from models.shapes.strokes import composite, stroke_painting
from models.shapes.world import (
    BACKGROUND_RGB,
    COLORS,
    POSITIONS,
    Scene,
    ShapeObject,
    caption,
    cell_center,
    render,
    sample_scene,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


SCENE = Scene(
    (ShapeObject("square", "red", "large", "top left"), ShapeObject("circle", "blue", "small", "bottom right")),
    "dark",
)


def test_a_painting_is_a_pure_function_of_the_scene_and_the_seed() -> None:
    first = stroke_painting(SCENE, np.random.default_rng(3))
    again = stroke_painting(SCENE, np.random.default_rng(3))
    other = stroke_painting(SCENE, np.random.default_rng(4))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_a_painting_puts_each_colour_in_its_cell_on_a_flat_background() -> None:
    """What the painting carries to SDEdit: colour and place, nothing outside the objects' cells."""
    for seed in range(20):
        painting = stroke_painting(SCENE, np.random.default_rng(seed)).astype(int)
        background = np.abs(painting - np.array(BACKGROUND_RGB["dark"])).max(axis=-1) <= 8
        for obj in SCENE.objects:
            cx, cy = cell_center(obj.position)
            cell = painting[int(cy) - 10 : int(cy) + 11, int(cx) - 10 : int(cx) + 11]
            near = np.abs(cell - np.array(COLORS[obj.color])).max(axis=-1) <= 27  # jitter 15 + 12
            assert near.sum() >= 20, (seed, obj)
        painted = np.argwhere(~background)
        cells = {POSITIONS[min(2, int(y * 3 // 64)) * 3 + min(2, int(x * 3 // 64))] for y, x in painted}
        assert cells <= {obj.position for obj in SCENE.objects}


def test_a_painting_has_no_exact_shape() -> None:
    """The painted pixels of the first object (top-left cell) differ from its true mask: strokes, not a square."""
    painting = stroke_painting(SCENE, np.random.default_rng(0)).astype(int)
    square = render(SCENE).masks[0]
    painted = np.abs(painting - np.array(BACKGROUND_RGB["dark"])).max(axis=-1) > 40
    painted[21:, :] = painted[:, 21:] = False  # the top-left cell only
    assert (painted ^ square).sum() > 0.2 * square.sum()


def test_paintings_refuse_held_out_fills() -> None:
    checkered = Scene((ShapeObject("circle", "red", "large", "center", "checkered"),))
    with pytest.raises(ValueError, match="solid"):
        stroke_painting(checkered, np.random.default_rng(0))


def test_a_composite_pastes_the_object_with_its_background_into_a_free_cell() -> None:
    target = Scene((ShapeObject("triangle", "green", "large", "center"),), "light")
    source = Scene((ShapeObject("diamond", "yellow", "small", "top left"),), "dark")
    made = composite(target, source, np.random.default_rng(1))
    moved = made.scene.objects[1]
    assert made.scene.objects[0] == target.objects[0] and made.scene.background == "light"
    assert (moved.shape, moved.color, moved.size) == ("diamond", "yellow", "small") and moved.position != "center"
    harmonised = render(made.scene)
    # The pasted object is where the expected scene has it; its patch carries the source's dark background.
    assert np.array_equal(made.image[harmonised.masks[1]], harmonised.image[harmonised.masks[1]])
    assert made.source_background.sum() > 0
    assert (made.image[made.source_background] == BACKGROUND_RGB["dark"]).all()
    # Everything outside the patch is the target, untouched, its object included.
    assert np.array_equal(made.image[~made.patch], render(target).image[~made.patch])
    assert not (made.patch & render(target).masks[0]).any()


def test_a_composite_needs_a_free_cell() -> None:
    full = Scene(tuple(ShapeObject("circle", "red", "small", p) for p in POSITIONS))
    with pytest.raises(ValueError, match="free cell"):
        composite(full, SCENE, np.random.default_rng(0))


def test_the_sdedit_job_serves_paintings_and_composites(components: Components) -> None:
    """Both uses are the plain sdedit job: deterministic, the input's size, and a real change of the input."""
    scene = sample_scene(np.random.default_rng(7), split="test", n_objects=1)
    other = Scene(sample_scene(np.random.default_rng(8), split="test", n_objects=1).objects, "striped")
    made = composite(scene, other, np.random.default_rng(0))
    cases = [
        (Image.fromarray(stroke_painting(scene, np.random.default_rng(0))), caption(scene), 0.7),
        (Image.fromarray(made.image), caption(made.scene), 0.5),
    ]
    for image, prompt, strength in cases:
        params = sdedit.Params(prompt=prompt, strength=strength, steps=10)
        outputs = [
            np.asarray(sdedit.run(components, params, {"image": image}, generator=gen(1)).images[0]) for _ in range(2)
        ]
        assert outputs[0].shape == (64, 64, 3) and np.array_equal(outputs[0], outputs[1])
        assert np.abs(outputs[0].astype(int) - np.asarray(image, dtype=int)).mean() > 1
