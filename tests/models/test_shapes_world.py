"""ShapesWorld: deterministic renders whose labels agree with the pixels, clean splits, parseable captions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from models.shapes.world import (
    ALL_SHAPES,
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLORS,
    EXTENT,
    HELD_OUT_COMBOS,
    HELD_OUT_SHAPES,
    POSITIONS,
    SHAPES,
    SIZES,
    SUBJECT_COLOR,
    Scene,
    ShapeObject,
    caption,
    cell_center,
    is_held_out,
    parse_caption,
    render,
    sample_scene,
    two_tone_subject,
    vocabulary,
)


def _scenes(seed: int, count: int, split: str = "train") -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split=split) for _ in range(count)]


def _mixed_scenes(seed: int, count: int) -> list[Scene]:
    """Scenes from every split, the subject included."""
    rng = np.random.default_rng(seed)
    splits = ["train", "held_out_combo", "held_out_shape", "held_out_fill", "subject"]
    scenes = []
    for index in range(count):
        split = splits[index % len(splits)]
        scenes.append(two_tone_subject(rng) if split == "subject" else sample_scene(rng, split=split))
    return scenes


def test_sampling_and_rendering_are_deterministic() -> None:
    assert _scenes(7, 20) == _scenes(7, 20)
    assert _scenes(7, 20) != _scenes(8, 20)
    for scene in _mixed_scenes(3, 25):
        first, second = render(scene), render(scene)
        for name in ("image", "masks", "boxes", "edges"):
            np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_render_shapes_and_dtypes() -> None:
    scene = Scene((ShapeObject("star", "green", "large", "top left"), ShapeObject("circle", "red", "small", "center")))
    rendered = render(scene)
    assert rendered.image.shape == (64, 64, 3) and rendered.image.dtype == np.uint8
    assert rendered.masks.shape == (2, 64, 64) and rendered.masks.dtype == bool
    assert rendered.boxes.shape == (2, 4)
    assert rendered.edges.shape == (64, 64) and set(np.unique(rendered.edges)) == {0, 255}
    assert render(scene, size=128).masks.shape == (2, 128, 128)


def test_labels_agree_with_pixels() -> None:
    for scene in _mixed_scenes(11, 150):
        rendered = render(scene)
        union = rendered.masks.any(axis=0)
        # Masks are disjoint, non-empty, and their boxes are their exact bounding boxes.
        assert rendered.masks.sum(axis=0).max() == 1
        for obj, mask, box in zip(scene.objects, rendered.masks, rendered.boxes, strict=True):
            ys, xs = np.nonzero(mask)
            assert tuple(box) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # Pixel sampling trims thin points (a star's): the box side is the extent or up to 2 px less.
            assert EXTENT[obj.size] - 2 <= max(box[2] - box[0], box[3] - box[1]) <= EXTENT[obj.size]
            # The object stays inside its grid cell.
            row, col = divmod(POSITIONS.index(obj.position), 3)
            assert col * 64 / 3 <= box[0] and box[2] <= (col + 1) * 64 / 3
            assert row * 64 / 3 <= box[1] and box[3] <= (row + 1) * 64 / 3
            pixels = rendered.image[mask]
            if obj.fill == "solid":
                assert (pixels == COLORS[obj.color]).all()
            elif obj.fill == "two-tone":
                left, right = (COLORS[c] for c in obj.color.split("+"))
                cx, _ = cell_center(obj.position)
                assert (rendered.image[mask & (np.arange(64) + 0.5 < cx)[None, :]] == left).all()
                assert (rendered.image[mask & (np.arange(64) + 0.5 > cx)[None, :]] == right).all()
            else:  # checkered: the colour and one neutral, about half each
                is_color = (pixels == COLORS[obj.color]).all(axis=1)
                assert 0.3 < is_color.mean() < 0.7
                assert len(np.unique(pixels[~is_color], axis=0)) == 1
        # Outside the masks only the background; edges lie on the masks' outlines.
        background = rendered.image[~union]
        if scene.background in BACKGROUND_RGB:
            assert (background == BACKGROUND_RGB[scene.background]).all()
        else:
            assert (background[:, 0] == background[:, 1]).all() and len(np.unique(background, axis=0)) == 2
        assert not rendered.edges[~union].any()
        assert rendered.edges[union].any()


def test_train_and_test_splits_never_hold_out() -> None:
    scenes = _scenes(0, 2000, "train") + _scenes(1, 500, "test")
    assert not any(is_held_out(scene) for scene in scenes)
    objects = [obj for scene in scenes for obj in scene.objects]
    # Everything else does occur: every base shape, colour, size, position and background.
    assert {obj.shape for obj in objects} == set(SHAPES)
    assert {obj.color for obj in objects} == set(COLORS)
    assert {obj.size for obj in objects} == set(SIZES)
    assert {obj.position for obj in objects} == set(POSITIONS)
    assert {scene.background for scene in scenes} == set(BACKGROUNDS)
    counts = Counter(len(scene.objects) for scene in scenes)
    assert set(counts) == {1, 2} and abs(counts[1] / len(scenes) - 0.5) < 0.05
    for scene in scenes:
        assert len({obj.position for obj in scene.objects}) == len(scene.objects)


def test_held_out_splits_hold_out() -> None:
    def matches(obj: ShapeObject, combo: tuple[tuple[str, str], ...]) -> bool:
        return all(getattr(obj, attribute) == value for attribute, value in combo)

    combos_seen: Counter[tuple[tuple[str, str], ...]] = Counter()
    for scene in _scenes(2, 300, "held_out_combo"):
        hits = [combo for combo in HELD_OUT_COMBOS if any(matches(obj, combo) for obj in scene.objects)]
        assert hits and is_held_out(scene)
        combos_seen.update(hits)
    assert set(combos_seen) == set(HELD_OUT_COMBOS)
    assert all(scene.objects[0].shape in HELD_OUT_SHAPES for scene in _scenes(3, 100, "held_out_shape"))
    assert all(scene.objects[0].fill == "checkered" for scene in _scenes(4, 100, "held_out_fill"))
    rng = np.random.default_rng(5)
    subject = two_tone_subject(rng, with_distractor=True)
    assert subject.objects[0].shape == "circle" and subject.objects[0].color == SUBJECT_COLOR
    assert is_held_out(subject) and not is_held_out(Scene(subject.objects[1:], subject.background))


def test_canonical_caption_round_trips() -> None:
    scenes = _mixed_scenes(6, 400)
    for scene in scenes:
        text = caption(scene)
        assert parse_caption(text) == scene, text
    assert caption(Scene((ShapeObject("circle", "red", "small", "top left"),))) == (
        "a small red circle at the top left"
    )
    two = (ShapeObject("square", "blue", "large", "center"), ShapeObject("hexagon", "green", "small", "bottom"))
    assert caption(Scene(two, "dark")) == (
        "a large blue square at the center and a small green hexagon at the bottom on a dark background"
    )


def test_caption_variants_stay_in_the_vocabulary() -> None:
    words = set(vocabulary())
    assert {"star", "heart", "cross", "checkered", "two-tone", "background"} <= words
    assert all(word == word.lower() and " " not in word for word in words)
    rng = np.random.default_rng(9)
    variants = set()
    for scene in _mixed_scenes(8, 300):
        for text in (caption(scene), caption(scene, rng)):
            assert text.split(" ") == text.split() and set(text.split()) <= words, text
        variants.add(caption(scene, rng) != caption(scene))
    assert variants == {True, False}


@pytest.mark.parametrize(
    ("scene", "message"),
    [
        (Scene((ShapeObject("oval", "red", "small", "top"),)), "oval"),
        (Scene((ShapeObject("circle", "pink", "small", "top"),)), "pink"),
        (Scene((ShapeObject("circle", "red", "medium", "top"),)), "medium"),
        (Scene((ShapeObject("circle", "red", "small", "middle"),)), "middle"),
        (Scene((ShapeObject("circle", "red", "small", "top"),), "sky"), "sky"),
        (Scene((ShapeObject("circle", "red", "small", "top"), ShapeObject("star", "red", "large", "top"))), "distinct"),
        (Scene(()), "at least one"),
    ],
)
def test_bad_scenes_are_refused(scene: Scene, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(scene)


def test_bad_arguments_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="validation"):
        sample_scene(rng, split="validation")
    with pytest.raises(ValueError, match="10"):
        sample_scene(rng, n_objects=10)
    for text in ("a red circle", "a small red circle at the top left.", "a small red circle  at the top"):
        with pytest.raises(ValueError):
            parse_caption(text)


def test_all_shapes_render_distinct_masks() -> None:
    masks = {shape: render(Scene((ShapeObject(shape, "red", "large", "center"),))).masks[0] for shape in ALL_SHAPES}
    for first in ALL_SHAPES:
        for second in ALL_SHAPES:
            if first < second:
                assert (masks[first] != masks[second]).sum() >= 20, (first, second)
