"""Condition preprocessors (models/control/preprocess.py) on ShapesWorld scenes, whose outlines are known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.control.preprocess import PREPROCESSORS, PreprocessParams, preprocess
from models.shapes.world import COLORS, SHAPES, Scene, ShapeObject, render


def _near(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel (8-neighbourhood) of `mask`."""
    return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0


def _agreement(edges: np.ndarray, outline: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of detected edges against the true outline, within one pixel."""
    precision = float((edges & _near(outline)).sum() / max(int(edges.sum()), 1))
    recall = float((outline & _near(edges)).sum() / outline.sum())
    return precision, recall


@pytest.mark.parametrize("shape", SHAPES)
def test_canny_finds_every_outline_on_a_dark_background(shape: str) -> None:
    for color in COLORS:
        rendered = render(Scene((ShapeObject(shape, color, "large", "center", "solid"),), "dark"), 128)
        condition = preprocess("canny", rendered.image)
        assert condition.shape == (128, 128, 3) and condition.dtype == np.uint8
        assert set(np.unique(condition)) <= {0, 255}
        precision, recall = _agreement(condition[..., 0] > 0, rendered.edges > 0)
        assert precision == 1.0 and recall == 1.0, (shape, color, precision, recall)


def test_canny_thresholds_decide_faint_edges() -> None:
    # Yellow on the light background is a small step in grey; along a triangle's slanted sides the ControlNet
    # tools' defaults (100, 200) miss part of it, lower thresholds find all of it.
    rendered = render(Scene((ShapeObject("triangle", "yellow", "large", "center", "solid"),), "light"), 128)
    outline = rendered.edges > 0
    _, recall_default = _agreement(preprocess("canny", rendered.image)[..., 0] > 0, outline)
    low = PreprocessParams(low_threshold=30, high_threshold=60)
    _, recall_low = _agreement(preprocess("canny", rendered.image, params=low)[..., 0] > 0, outline)
    assert recall_default < 0.9 and recall_low == 1.0


def test_scribble_gives_white_strokes_on_black_from_either_polarity() -> None:
    paper = np.full((96, 96, 3), 235, dtype=np.uint8)
    cv2.line(paper, (10, 10), (80, 70), (20, 20, 20), 3)
    strokes = np.zeros((96, 96), dtype=bool)
    strokes[paper[..., 0] < 100] = True
    from_pen = preprocess("scribble", paper)
    from_inverted = preprocess("scribble", 255 - paper)
    assert set(np.unique(from_pen)) == {0, 255}
    np.testing.assert_array_equal(from_pen[..., 0] > 0, strokes)
    np.testing.assert_array_equal(from_pen, from_inverted)


def test_none_passes_the_condition_through_and_size_resizes_first() -> None:
    image = render(Scene((ShapeObject("circle", "red", "small", "top left", "solid"),), "dark"), 64).image
    np.testing.assert_array_equal(preprocess("none", image), image)
    resized = preprocess(
        "canny",
        render(Scene((ShapeObject("circle", "red", "large", "center", "solid"),), "dark"), 256).image,
        size=(96, 64),
    )
    assert resized.shape == (64, 96, 3)


@pytest.mark.parametrize(
    ("name", "image", "params", "message"),
    [
        (
            "sobel",
            np.zeros((8, 8, 3), np.uint8),
            None,
            "one of ['canny', 'none', 'scribble'], got 'sobel'",
        ),
        ("canny", np.zeros((8, 8), np.uint8), None, "image must be (H, W, 3) uint8 RGB"),
        ("canny", np.zeros((8, 8, 3), np.float32), None, "image must be (H, W, 3) uint8 RGB"),
        ("canny", np.zeros((8, 8, 3), np.uint8), PreprocessParams(200, 100), "low_threshold <= high_threshold"),
        ("scribble", np.zeros((8, 8, 3), np.uint8), PreprocessParams(threshold=300), "threshold must be in [0, 255]"),
    ],
)
def test_bad_preprocessor_input_names_the_value(
    name: str, image: np.ndarray, params: PreprocessParams | None, message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        preprocess(name, image, params=params)
    assert message in str(raised.value)


def test_the_documented_names_are_the_registered_ones() -> None:
    assert sorted(PREPROCESSORS) == ["canny", "none", "scribble"]
