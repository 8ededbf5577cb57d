"""ShapesWorld: a seeded generator of 64x64 scenes of coloured shapes, with captions and labels.

A scene is one or two objects on a background. Each object has a shape, a colour, a size, a cell of a
3x3 grid and a fill. Objects are centred in their cell, never leave it, and so never overlap.
`render` is a pure function of the scene: the same scene always gives the same pixels, masks, boxes
and edge map. Pixels are sampled at their centres (no antialiasing), so every pixel of an object has
exactly its colour.

Geometry at 64 px (everything scales with `size / 64`): cell centres at 11, 32 and 53 px; a small
object spans 12 px and a large one 18 px along its longer side, so neighbouring objects are at
least 3 px apart and 2 px from the image border. Backgrounds: near-white ("light"), near-black
("dark"), and horizontal stripes of two mid greys with a period of 8 px ("striped").

Held out of base training (kept for personalization and compositional tests):
- shapes star, heart and cross (`HELD_OUT_SHAPES`);
- the checkered fill: the object colour alternating in 4 px checks with a neutral that contrasts
  with the background (black on light, white otherwise);
- the two-tone subject: a circle whose left half is red and right half blue. Its colour is written
  "red+blue" (`SUBJECT_COLOR`) and its fill "two-tone"; captions call it "a two-tone circle";
- the attribute combinations in `HELD_OUT_COMBOS` (purple triangle, hexagon at the bottom left,
  large orange).

Captions are lower-case words separated by single spaces. `caption(scene)` is canonical and fully
specified, and `parse_caption` reads it back; `caption(scene, rng)` draws a template variant that may
leave attributes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon")
HELD_OUT_SHAPES: tuple[str, ...] = ("star", "heart", "cross")
ALL_SHAPES: tuple[str, ...] = SHAPES + HELD_OUT_SHAPES
# Hues are spread in the opponent-colour plane (see oracle): neighbouring colours are >= 34 deg apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 25, 65),
    "orange": (250, 130, 10),
    "yellow": (210, 225, 25),
    "green": (35, 170, 75),
    "blue": (40, 90, 235),
    "purple": (165, 40, 210),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)  # row-major 3x3 grid
BACKGROUNDS: tuple[str, ...] = ("light", "dark", "striped")
FILLS: tuple[str, ...] = ("solid", "checkered", "two-tone")
HELD_OUT_FILLS: tuple[str, ...] = ("checkered", "two-tone")
SUBJECT_COLOR = "red+blue"  # the two-tone subject: left half red, right half blue
# A combination is a tuple of (attribute, value) pairs that an object matches when all hold.
HELD_OUT_COMBOS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("color", "purple"), ("shape", "triangle")),
    (("shape", "hexagon"), ("position", "bottom left")),
    (("size", "large"), ("color", "orange")),
)
SPLITS: tuple[str, ...] = ("train", "test", "held_out_combo", "held_out_shape", "held_out_fill")

BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {"light": (240, 240, 240), "dark": (24, 24, 24)}
STRIPE_RGB: tuple[tuple[int, int, int], tuple[int, int, int]] = ((150, 150, 150), (108, 108, 108))
STRIPE_PERIOD = 8  # px at 64; half of it each grey
CHECK_PX = 4  # checker square side at 64
CELL_CENTERS = (11.0, 32.0, 53.0)  # px at 64, for grid column/row 0, 1, 2
EXTENT: dict[str, float] = {"small": 12.0, "large": 18.0}  # longer side in px at 64


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. `color` is a key of COLORS, or SUBJECT_COLOR when fill is "two-tone"."""

    shape: str
    color: str
    size: str
    position: str
    fill: str = "solid"


@dataclass(frozen=True)
class Scene:
    """A background and one or more objects in distinct grid cells."""

    objects: tuple[ShapeObject, ...]
    background: str = "light"


@dataclass(frozen=True)
class Rendered:
    """A rendered scene. image: (S, S, 3) uint8; masks: (N, S, S) bool; boxes: (N, 4) int as
    x0, y0, x1, y1 with x1, y1 exclusive; edges: (S, S) uint8, 255 on object outlines, else 0."""

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    edges: np.ndarray


# ----------------------------------------------------------------------------------------------
# Geometry


def _normalize(vertices: np.ndarray) -> np.ndarray:
    """Scale and shift polygon vertices (V, 2) so their bounding box is centred on 0, longer side 1."""
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - (low + high) / 2) / (high - low).max()


@cache
def unit_polygon(shape: str) -> np.ndarray:
    """Polygon (V, 2) of x, y (y down) whose bounding box is centred on 0 with longer side 1."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)  # within 0.02 px of a circle at 18 px
        vertices = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "square":
        vertices = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    elif shape == "triangle":
        vertices = np.array([[0, -1], [1, 1], [-1, 1]], dtype=float)
    elif shape == "diamond":
        vertices = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=float)
    elif shape == "hexagon":
        t = np.arange(6) * np.pi / 3
        vertices = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        vertices = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        vertices = np.stack([x, y], axis=1)
    elif shape == "cross":
        a = 0.36  # arm half-width relative to the half-extent 1
        vertices = np.array(
            [
                [-a, -1],
                [a, -1],
                [a, -a],
                [1, -a],
                [1, a],
                [a, a],
                [a, 1],
                [-a, 1],
                [-a, a],
                [-1, a],
                [-1, -a],
                [-a, -a],
            ]
        )
    else:
        raise ValueError(f"shape must be one of {ALL_SHAPES}, got {shape!r}")
    vertices = _normalize(vertices)
    vertices.setflags(write=False)  # cached: shared by every caller
    return vertices


def polygon_mask(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """Even-odd fill of a polygon (V, 2) in pixel units, sampled at pixel centres -> (H, W) bool."""
    # A tiny offset keeps pixel centres off edges that fall exactly on half-integers.
    ys = np.arange(height)[None, :, None] + 0.5 + 1e-4
    xs = np.arange(width)[None, None, :] + 0.5 + 1e-4
    start = vertices
    end = np.roll(vertices, -1, axis=0)
    edges = start[:, 1] != end[:, 1]  # horizontal edges never cross a scanline
    ax, ay = start[edges, 0, None, None], start[edges, 1, None, None]
    bx, by = end[edges, 0, None, None], end[edges, 1, None, None]
    crosses = (ay > ys) != (by > ys)  # (E, H, 1)
    x_cross = ax + (ys - ay) * (bx - ax) / (by - ay)  # (E, H, 1)
    return (np.count_nonzero(crosses & (xs < x_cross), axis=0) % 2).astype(bool)


def shape_mask(shape: str, cx: float, cy: float, extent: float, height: int, width: int) -> np.ndarray:
    """Mask (H, W) bool of `shape` with bounding box centred at (cx, cy), longer side `extent` px."""
    return polygon_mask(unit_polygon(shape) * extent + np.array([cx, cy]), height, width)


def cell_center(position: str, size: int = 64) -> tuple[float, float]:
    """Centre (x, y) in px of a grid cell named in POSITIONS, for an image of `size` px."""
    row, col = divmod(POSITIONS.index(position), 3)
    scale = size / 64
    return CELL_CENTERS[col] * scale, CELL_CENTERS[row] * scale


# ----------------------------------------------------------------------------------------------
# Scenes


def _matches(obj: ShapeObject, combo: tuple[tuple[str, str], ...]) -> bool:
    return all(getattr(obj, attribute) == value for attribute, value in combo)


def is_held_out_object(obj: ShapeObject) -> bool:
    """True if the object uses a held-out shape, a held-out fill or a held-out combination."""
    return obj.shape in HELD_OUT_SHAPES or obj.fill != "solid" or any(_matches(obj, combo) for combo in HELD_OUT_COMBOS)


def is_held_out(scene: Scene) -> bool:
    """True if any object of the scene is held out of base training."""
    return any(is_held_out_object(obj) for obj in scene.objects)


def validate_scene(scene: Scene) -> None:
    """Raise ValueError naming the first bad value of a scene."""
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {scene.background!r}")
    if not scene.objects:
        raise ValueError("a scene needs at least one object")
    cells = [obj.position for obj in scene.objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"objects must be in distinct cells, got {cells}")
    for obj in scene.objects:
        if obj.shape not in ALL_SHAPES:
            raise ValueError(f"shape must be one of {ALL_SHAPES}, got {obj.shape!r}")
        if obj.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {obj.size!r}")
        if obj.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {obj.position!r}")
        if obj.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {obj.fill!r}")
        colors = obj.color.split("+") if obj.fill == "two-tone" else [obj.color]
        if len(colors) != (2 if obj.fill == "two-tone" else 1) or any(c not in COLORS for c in colors):
            raise ValueError(f"color {obj.color!r} is not valid for fill {obj.fill!r}")


def _random_object(
    rng: np.random.Generator, position: str, shapes: tuple[str, ...] = SHAPES, fixed: dict[str, str] | None = None
) -> ShapeObject:
    """A random solid object in `position`; `fixed` overrides attributes by name."""
    values = {
        "shape": str(rng.choice(shapes)),
        "color": str(rng.choice(list(COLORS))),
        "size": str(rng.choice(SIZES)),
        "position": position,
    }
    values.update(fixed or {})
    return ShapeObject(**values)


def _train_object(rng: np.random.Generator, position: str) -> ShapeObject:
    while True:
        obj = _random_object(rng, position)
        if not is_held_out_object(obj):
            return obj


def sample_scene(rng: np.random.Generator, *, split: str = "train", n_objects: int | None = None) -> Scene:
    """Draw a scene. Splits: "train" and "test" (the same distribution, never held out; fresh seeds
    make the test scenes), "held_out_combo" (the first object matches a HELD_OUT_COMBOS entry),
    "held_out_shape" (the first object is a star, heart or cross) and "held_out_fill" (the first
    object is checkered). `n_objects` None draws 1 or 2 with equal odds."""
    # 1. Check inputs
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_objects is None:
        n_objects = int(rng.integers(1, 3))
    if not 1 <= n_objects <= len(POSITIONS):
        raise ValueError(f"n_objects must be in [1, {len(POSITIONS)}], got {n_objects}")
    # 2. Cells and background
    cells = [POSITIONS[i] for i in rng.choice(len(POSITIONS), size=n_objects, replace=False)]
    background = str(rng.choice(BACKGROUNDS))
    # 3. The first object carries what the split is about; the others are train objects
    if split == "held_out_combo":
        combo = dict(HELD_OUT_COMBOS[int(rng.integers(len(HELD_OUT_COMBOS)))])
        if "position" in combo:
            cells = [combo["position"]] + [c for c in cells if c != combo["position"]][: n_objects - 1]
        first = _random_object(rng, cells[0], fixed={k: v for k, v in combo.items() if k != "position"})
    elif split == "held_out_shape":
        first = _random_object(rng, cells[0], shapes=HELD_OUT_SHAPES)
    elif split == "held_out_fill":
        first = _random_object(rng, cells[0], fixed={"fill": "checkered"})
    else:
        first = _train_object(rng, cells[0])
    objects = [first] + [_train_object(rng, cell) for cell in cells[1:]]
    return Scene(objects=tuple(objects), background=background)


def two_tone_subject(
    rng: np.random.Generator, *, background: str | None = None, with_distractor: bool = False
) -> Scene:
    """The personalization subject: a two-tone circle (left red, right blue) of random size and cell
    on a random (or given) background, optionally beside one train object."""
    n_objects = 2 if with_distractor else 1
    cells = [POSITIONS[i] for i in rng.choice(len(POSITIONS), size=n_objects, replace=False)]
    subject = ShapeObject("circle", SUBJECT_COLOR, str(rng.choice(SIZES)), cells[0], "two-tone")
    objects = [subject] + [_train_object(rng, cell) for cell in cells[1:]]
    return Scene(tuple(objects), background if background is not None else str(rng.choice(BACKGROUNDS)))


# ----------------------------------------------------------------------------------------------
# Rendering


def _background(name: str, size: int) -> np.ndarray:
    if name == "striped":
        period = max(2, round(STRIPE_PERIOD * size / 64))
        rows = (np.arange(size) % period) < period // 2
        column = np.where(rows[:, None], STRIPE_RGB[0], STRIPE_RGB[1]).astype(np.uint8)
        return np.broadcast_to(column[:, None, :], (size, size, 3)).copy()
    return np.full((size, size, 3), BACKGROUND_RGB[name], dtype=np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a mask (H, W) with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def render(scene: Scene, size: int = 64) -> Rendered:
    """Render a scene to an image (size, size, 3) uint8 with per-object masks, boxes and an edge map
    (1-px object outlines). Deterministic: a pure function of the scene."""
    validate_scene(scene)
    image = _background(scene.background, size)
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    boxes = np.zeros((len(scene.objects), 4), dtype=np.int64)
    edges = np.zeros((size, size), dtype=np.uint8)
    check = max(1, round(CHECK_PX * size / 64))
    neutral = (20, 20, 20) if scene.background == "light" else (245, 245, 245)
    for index, obj in enumerate(scene.objects):
        cx, cy = cell_center(obj.position, size)
        mask = shape_mask(obj.shape, cx, cy, EXTENT[obj.size] * size / 64, size, size)
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if obj.fill == "two-tone":
            left, right = (COLORS[c] for c in obj.color.split("+"))
            is_left = np.arange(size)[None, :] + 0.5 < cx
            image[mask & is_left] = left
            image[mask & ~is_left] = right
        elif obj.fill == "checkered":
            yy, xx = np.mgrid[0:size, 0:size]
            odd = (((yy - y0) // check + (xx - x0) // check) % 2).astype(bool)
            image[mask & ~odd] = COLORS[obj.color]
            image[mask & odd] = neutral
        else:
            image[mask] = COLORS[obj.color]
        masks[index] = mask
        boxes[index] = (x0, y0, x1, y1)
        edges[_outline(mask)] = 255
    return Rendered(image=image, masks=masks, boxes=boxes, edges=edges)


# ----------------------------------------------------------------------------------------------
# Captions

_ARTICLES = ("a", "an")
_FILL_WORDS = {"checkered": "checkered", "two-tone": "two-tone"}
_BACKGROUND_TEMPLATES = ("on a {} background", "against a {} background", "on {}")
_POSITION_TEMPLATES = ("at the {}", "in the {} corner")  # the second only for corners


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(obj: ShapeObject, *, with_size: bool = True, with_color: bool = True) -> str:
    words = [obj.size] if with_size else []
    if obj.fill == "two-tone":
        words.append("two-tone")
    else:
        if obj.fill == "checkered":
            words.append("checkered")
        if with_color:
            words.append(obj.color)
    words.append(obj.shape)
    return " ".join([_article(words[0]), *words])


def object_phrase(obj: ShapeObject) -> str:
    """The object's noun phrase without its position, e.g. "a small red circle" (a GLIGEN grounding phrase)."""
    return _noun_phrase(obj)


def positionless_caption(scene: Scene) -> str:
    """The scene's objects named without where they are: "a small red circle and a large blue square" (and the
    background unless light). A control (edges, sketch, boxes) then has to say where things go."""
    text = " and ".join(object_phrase(obj) for obj in scene.objects)
    return text if scene.background == "light" else f"{text} on a {scene.background} background"


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Describe a scene. Without rng: the canonical caption, e.g. "a small red circle at the top left
    and a large blue square at the center on a dark background" (background named unless light).
    With rng: a template variant that may drop size, colour or position, reorder the objects, or
    phrase the background differently."""
    validate_scene(scene)
    objects = list(scene.objects)
    if rng is None:
        phrases = [f"{_noun_phrase(obj)} at the {obj.position}" for obj in objects]
        text = " and ".join(phrases)
        return text if scene.background == "light" else f"{text} on a {scene.background} background"
    if len(objects) > 1 and rng.random() < 0.5:
        objects = objects[::-1]
    phrases = []
    for obj in objects:
        phrase = _noun_phrase(obj, with_size=rng.random() < 0.7, with_color=rng.random() < 0.9)
        if rng.random() < 0.7:
            corner = " " in obj.position
            template = str(rng.choice(_POSITION_TEMPLATES)) if corner else _POSITION_TEMPLATES[0]
            phrase += " " + template.format(obj.position)
        phrases.append(phrase)
    text = " and ".join(phrases)
    if scene.background != "light" or rng.random() < 0.3:
        if rng.random() < 0.8:
            text += " " + str(rng.choice(_BACKGROUND_TEMPLATES)).format(scene.background)
    return text


def vocabulary() -> list[str]:
    """Every word a caption template can emit, sorted."""
    words = set(_ARTICLES) | {"and", "at", "in", "corner", "the", "on", "against", "background"}
    words |= set(ALL_SHAPES) | set(COLORS) | set(SIZES) | set(BACKGROUNDS) | set(_FILL_WORDS.values())
    for position in POSITIONS:
        words |= set(position.split())
    return sorted(words)


def parse_caption(text: str) -> Scene:
    """Read a canonical caption (see `caption`) back into its scene; ValueError if it is not one."""
    words = text.split()
    if " ".join(words) != text or not words:
        raise ValueError(f"a caption is lower-case words separated by single spaces, got {text!r}")
    background = "light"
    if len(words) >= 4 and words[-1] == "background" and words[-4:-2] == ["on", "a"]:
        background = words[-2]
        words = words[:-4]
    objects = []
    for chunk in " ".join(words).split(" and "):
        tokens = chunk.split()
        try:
            at = tokens.index("at")
        except ValueError:
            raise ValueError(f"no 'at the <position>' in {chunk!r}") from None
        head, position = tokens[:at], " ".join(tokens[at + 2 :])
        if len(head) < 3 or head[0] not in _ARTICLES or tokens[at + 1 : at + 2] != ["the"]:
            raise ValueError(f"not a canonical object phrase: {chunk!r}")
        size, middle, shape = head[1], head[2:-1], head[-1]
        if middle == ["two-tone"]:
            fill, color = "two-tone", SUBJECT_COLOR
        elif len(middle) == 2 and middle[0] == "checkered":
            fill, color = "checkered", middle[1]
        elif len(middle) == 1:
            fill, color = "solid", middle[0]
        else:
            raise ValueError(f"not a canonical object phrase: {chunk!r}")
        objects.append(ShapeObject(shape, color, size, position, fill))
    scene = Scene(tuple(objects), background)
    validate_scene(scene)
    return scene
