"""The pieces every bench-quality group uses: rows, results, grids, scenes, generation, oracle scoring."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.common.components import Components
from models.generation import text_to_image
from models.shapes.oracle import match_objects, read_scene, scene_correct
from models.shapes.world import Scene, sample_scene

ATTRIBUTES = ("shape", "color", "size", "position")


@dataclass
class Row:
    group: str
    name: str
    figure: float
    target: str
    met: bool | None
    cases: int
    seconds_per_case: float | None = None
    unit: str = "%"
    note: str = ""


@dataclass
class GroupResult:
    rows: list[Row] = field(default_factory=list)
    grids: dict[str, Image.Image] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchContext:
    components: Components
    n: int
    seed: int
    steps: int = 25


def grid(images: list[Image.Image], labels: list[str], columns: int = 8, scale: int = 2) -> Image.Image:
    """Images in rows of `columns`, each upscaled `scale` times with its label (wrapped) under it."""
    cell_w = images[0].width * scale
    label_h = 34
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * (cell_w + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_w + label_h)
        sheet.paste(image.resize((cell_w, cell_w), Image.Resampling.NEAREST), (x, y))
        words, lines, line = label.split(), [], ""
        for word in words:
            if len(line) + len(word) + 1 > cell_w // 6:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for j, text in enumerate(lines[:3]):
            draw.text((x + 2, y + cell_w + 1 + 11 * j), text, fill="black")
    return sheet


def percent(flags: list[bool]) -> float:
    """The share of true flags in percent (0 for none): a success rate as the results tables print it."""
    return 100.0 * float(np.mean(flags)) if flags else 0.0


def scenes(split: str, n: int, seed: int, n_objects: int | None) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split=split, n_objects=n_objects) for _ in range(n)]


def generate(ctx: BenchContext, prompts: list[str], guidance: float, batch: int = 8) -> tuple[list[Image.Image], float]:
    """Images for `prompts` (seed i for prompt i's batch slot); returns them and seconds per image."""
    images: list[Image.Image] = []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        for offset, prompt in enumerate(chunk):  # one job per prompt, as the service runs them
            params = text_to_image.Params(prompt=prompt, steps=ctx.steps, guidance_scale=guidance)
            generator = torch.Generator("cpu").manual_seed(ctx.seed + start + offset)
            images += text_to_image.run(ctx.components, params, generator=generator).images
    return images, (time.perf_counter() - started) / max(len(prompts), 1)


def accuracy(expected: list[Scene], images: list[Image.Image]) -> tuple[float, dict[str, float]]:
    """Share of images whose every object is right, and per-attribute accuracy over objects."""
    right = 0
    per_attribute: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for scene, image in zip(expected, images, strict=True):
        seen = read_scene(image)
        right += scene_correct(scene, seen)
        for agreement in match_objects(scene, seen):
            for attribute in ATTRIBUTES:
                per_attribute[attribute].append(agreement[attribute])
    return 100.0 * right / len(expected), {a: 100.0 * float(np.mean(v)) for a, v in per_attribute.items()}
