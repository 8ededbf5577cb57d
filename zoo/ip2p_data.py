"""InstructPix2Pix training triples from ShapesWorld: (input scene, instruction, edited scene).

Brooks et al. (2023) build their data with GPT-3 edits and Prompt-to-Prompt renders; ShapesWorld can
render the edited scene *exactly*, so every triple here is a pair of rendered scenes that differ in
one attribute, and an instruction naming that change. Four edit types:

    recolor     "make the circle blue"               the object's colour changes
    reshape     "turn the circle into a square"       the object's shape changes (same colour, size, cell)
    resize      "make the circle large"               small <-> large
    background  "make the background dark"            light / dark / striped

The edited object is named by its shape, which is unique in its scene (two-object scenes with two
objects of the same shape never carry an object edit). Inputs come from the world's "train" split and
an edit is redrawn whenever its result would be held out (held-out shapes, fills and attribute
combinations such as a purple triangle or a large orange object), so held-out concepts stay excluded.
Everything is a pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from models.shapes.world import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption,
    is_held_out,
    render,
    sample_scene,
)

EDIT_TYPES: tuple[str, ...] = ("recolor", "reshape", "resize", "background")

# Instruction templates per edit type; {shape} is the edited object's shape, {value} the new value.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolor": (
        "make the {shape} {value}",
        "turn the {shape} {value}",
        "color the {shape} {value}",
        "paint the {shape} {value}",
        "change the color of the {shape} to {value}",
        "make it {value}",
    ),
    "reshape": (
        "turn the {shape} into a {value}",
        "make the {shape} a {value}",
        "change the {shape} to a {value}",
        "replace the {shape} with a {value}",
        "make it a {value}",
    ),
    "resize": (
        "make the {shape} {value}",
        "make the {shape} {comparative}",
        "change the size of the {shape} to {value}",
        "make it {value}",
    ),
    "background": (
        "make the background {value}",
        "change the background to {value}",
        "put it on a {value} background",
        "use a {value} background",
    ),
}
COMPARATIVE = {"small": "smaller", "large": "bigger"}
# Templates that do not name the object ("make it blue") only make sense with one object.
_ANONYMOUS = ("make it {value}", "make it a {value}")


@dataclass(frozen=True)
class EditTriple:
    """One training example: ``source`` edited into ``target`` by ``instruction``.

    ``edit`` is one of EDIT_TYPES; ``index`` the edited object's index (-1 for background edits);
    ``value`` the requested new attribute value.
    """

    source: Scene
    target: Scene
    instruction: str
    edit: str
    index: int
    value: str


def apply_edit(scene: Scene, edit: str, index: int, value: str) -> Scene:
    """The scene with one attribute changed: object ``index``'s colour/shape/size, or the background."""
    if edit == "background":
        return replace(scene, background=value)
    attribute = {"recolor": "color", "reshape": "shape", "resize": "size"}[edit]
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **{attribute: value})
    return replace(scene, objects=tuple(objects))


def current_value(scene: Scene, edit: str, index: int) -> str:
    """The attribute value an edit would change."""
    if edit == "background":
        return scene.background
    obj: ShapeObject = scene.objects[index]
    return {"recolor": obj.color, "reshape": obj.shape, "resize": obj.size}[edit]


def edit_choices(edit: str) -> tuple[str, ...]:
    """All values an edit of this type can request."""
    return {"recolor": tuple(COLORS), "reshape": SHAPES, "resize": SIZES, "background": BACKGROUNDS}[edit]


def instruction_text(edit: str, shape: str, value: str, template: str) -> str:
    """Fill an instruction template."""
    return template.format(shape=shape, value=value, comparative=COMPARATIVE.get(value, value))


def sample_triple(
    rng: np.random.Generator, edit: str | None = None, canonical: bool = False, split: str = "train"
) -> EditTriple:
    """Draw one (input, instruction, edited) triple; the input from the world's ``split`` ("train" or its
    twin "test", never held out).

    ``edit`` fixes the edit type (random otherwise); ``canonical`` uses each type's first template.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    while True:
        chosen = edit if edit is not None else str(rng.choice(EDIT_TYPES))
        scene = sample_scene(rng, split=split)
        shapes = [obj.shape for obj in scene.objects]
        if chosen == "background":
            index = -1
        else:
            unique = [i for i, shape in enumerate(shapes) if shapes.count(shape) == 1]
            if not unique:
                continue
            index = int(rng.choice(unique))
        old = current_value(scene, chosen, index)
        value = str(rng.choice([v for v in edit_choices(chosen) if v != old]))
        target = apply_edit(scene, chosen, index, value)
        if is_held_out(target):
            continue
        templates = TEMPLATES[chosen]
        if len(scene.objects) > 1:
            templates = tuple(t for t in templates if t not in _ANONYMOUS)
        template = templates[0] if canonical else str(rng.choice(templates))
        shape = shapes[index] if index >= 0 else ""
        return EditTriple(scene, target, instruction_text(chosen, shape, value, template), chosen, index, value)


@dataclass
class TripleArrays:
    """Rendered triples: sources, targets (N, 64, 64, 3) uint8; instructions; edit types; captions."""

    sources: np.ndarray
    targets: np.ndarray
    instructions: list[str]
    edits: list[str]
    source_captions: list[str]


def render_triples(n: int, seed: int) -> TripleArrays:
    """Render ``n`` triples drawn from ``seed`` (edit types uniform, templates varied)."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    rng = np.random.default_rng([seed, 7])
    sources = np.empty((n, 64, 64, 3), dtype=np.uint8)
    targets = np.empty_like(sources)
    instructions, edits, captions = [], [], []
    for i in range(n):
        triple = sample_triple(rng)
        sources[i] = render(triple.source).image
        targets[i] = render(triple.target).image
        instructions.append(triple.instruction)
        edits.append(triple.edit)
        captions.append(caption(triple.source))
    return TripleArrays(sources, targets, instructions, edits, captions)
