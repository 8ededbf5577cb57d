"""`make bench-quality`: every method measured against the ShapesWorld oracle.

Each group is one function that takes the loaded model and returns rows (figure, target, cases,
seconds per case) and image grids; later issues add their groups to `GROUPS`. Writes
`bench/results/quality.{json,md}` and PNG grids beside them.

    python -m bench.quality                   # every group
    python -m bench.quality --groups zoo --n 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench.common import RESULTS, machine
from models.common.components import Components
from models.common.latents import decode, encode, images_to_tensor, tensor_to_images
from models.generation import text_to_image
from models.shapes.oracle import match_objects, read_scene, scene_correct
from models.shapes.world import Scene, caption, render, sample_scene

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
    right, per_attribute = 0, {a: [] for a in ATTRIBUTES}  # type: dict[str, list[bool]]
    for scene, image in zip(expected, images, strict=True):
        seen = read_scene(image)
        right += scene_correct(scene, seen)
        for agreement in match_objects(scene, seen):
            for attribute in ATTRIBUTES:
                per_attribute[attribute].append(agreement[attribute])
    return 100.0 * right / len(expected), {a: 100.0 * float(np.mean(v)) for a, v in per_attribute.items()}


def zoo_group(ctx: BenchContext) -> GroupResult:
    """Issue 3: the VAE round trip, text-to-image quality at two guidance scales, speed."""
    result = GroupResult()
    components = ctx.components

    # 1. VAE round trip on test scenes.
    test = scenes("test", ctx.n, ctx.seed, None)
    originals = [Image.fromarray(render(s).image) for s in test]
    started = time.perf_counter()
    with torch.no_grad():
        recon = []
        for start in range(0, len(originals), 32):
            pixels = images_to_tensor(originals[start : start + 32])
            recon += tensor_to_images(decode(components.vae, encode(components.vae, pixels)))
    per = (time.perf_counter() - started) / len(test)
    vae_acc, vae_attr = accuracy(test, recon)
    result.rows.append(Row("zoo", "VAE round trip: oracle agrees", vae_acc, ">= 99", vae_acc >= 99, len(test), per))
    result.grids["zoo_vae_roundtrip"] = grid(originals[:8] + recon[:8], ["original"] * 8 + ["round trip"] * 8)
    result.extra["vae_attributes"] = vae_attr

    # 2. Text to image: one object, two objects, held-out combinations; guidance 1 and default.
    cases = {
        "one object": (scenes("test", ctx.n, ctx.seed + 1, 1), 95.0),
        "two objects": (scenes("test", ctx.n, ctx.seed + 2, 2), 80.0),
        "held-out combinations": (scenes("held_out_combo", ctx.n, ctx.seed + 3, None), 80.0),
    }
    for label, (expected, target) in cases.items():
        prompts = [caption(s) for s in expected]
        for guidance in (1.0, text_to_image.Params.guidance_scale):
            images, per = generate(ctx, prompts, guidance)
            acc, attributes = accuracy(expected, images)
            result.rows.append(
                Row(
                    "zoo",
                    f"text-to-image, {label}, guidance {guidance:g}",
                    acc,
                    f">= {target:g}",
                    acc >= target,
                    len(expected),
                    per,
                    note=", ".join(f"{a} {v:.0f}%" for a, v in attributes.items()),
                )
            )
            key = f"zoo_t2i_{label.replace(' ', '_').replace('-', '_')}_g{guidance:g}"
            result.grids[key] = grid(images[:16], prompts[:16])

    # 3. Speed: seconds per image, 25 steps, guidance on, batch 1 and batch 8.
    for batch in (1, 8):
        params = text_to_image.Params(prompt="a large red circle at the center", steps=25, num_images=batch)
        text_to_image.run(components, params, generator=torch.Generator("cpu").manual_seed(0))
        started = time.perf_counter()
        repeats = 5 if batch == 1 else 2
        for i in range(repeats):
            text_to_image.run(components, params, generator=torch.Generator("cpu").manual_seed(i))
        per = (time.perf_counter() - started) / (repeats * batch)
        met = per <= 1.0 if batch == 1 else None
        result.rows.append(
            Row("zoo", f"speed, batch {batch}", per, "<= 1 s" if batch == 1 else "-", met, repeats * batch, per, "s")
        )
    return result


GROUPS: dict[str, Callable[[BenchContext], GroupResult]] = {"zoo": zoo_group}


def load_model(folder: Path) -> Components:
    from worker.runtime import DevicePolicy, load_components

    torch.set_num_threads(1)  # as the worker does
    return load_components(folder, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))


def markdown(rows: list[Row]) -> str:
    lines = [
        "| group | measure | figure | target | met | cases | s / case | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        figure = f"{r.figure:.1f}%" if r.unit == "%" else f"{r.figure:.3f} {r.unit}"
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        per = f"{r.seconds_per_case:.3f}" if r.seconds_per_case is not None else "-"
        lines.append(f"| {r.group} | {r.name} | {figure} | {r.target} | {met} | {r.cases} | {per} | {r.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from store.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--n", type=int, default=200, help="cases per measure (the issues ask for >= 200)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the settings' default)")
    args = parser.parse_args(argv)
    settings = get_settings()
    folder = args.model or settings.models_dir / settings.default_model
    ctx = BenchContext(components=load_model(folder), n=args.n, seed=args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    for name in args.groups:
        started = time.perf_counter()
        result = GROUPS[name](ctx)
        rows += result.rows
        extra[name] = {**result.extra, "wall_seconds": round(time.perf_counter() - started, 1)}
        for key, image in result.grids.items():
            image.save(RESULTS / f"{key}.png")
    data = {
        "machine": machine(),
        "model": str(folder.name),
        "n": args.n,
        "seed": args.seed,
        "rows": [asdict(r) for r in rows],
        "extra": extra,
    }
    suffix = "" if set(args.groups) == set(GROUPS) else "-" + "-".join(args.groups)
    (RESULTS / f"quality{suffix}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"quality{suffix}.md").write_text(markdown(rows))
    sys.stdout.write(markdown(rows))


if __name__ == "__main__":
    main()
