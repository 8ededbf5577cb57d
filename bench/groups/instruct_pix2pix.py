"""Issue 4's instruct-pix2pix rows: instruction success and untouched attributes kept, per edit type, on
zoo/shapes-ip2p-tiny; a small table over the two guidance scales.

Every case is a fresh test-split scene with one edit drawn as the training data draws them
(zoo/ip2p_data.py: recolour, reshape, resize, change background, cycled in that order; the instruction
templates varied), from `ctx.seed`, never the training seeds. The oracle reads the output back:
- success: the edited object shows the requested value (matched to the edited scene), or the background
  is the requested one;
- kept: the object count is right, every other attribute of the edited object, every attribute of the
  other objects and (for object edits) the background are the input's.
The InstructPix2Pix model is loaded from zoo/shapes-ip2p-tiny unless `ctx.components` is already one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.harness import ATTRIBUTES, BenchContext, GroupResult, Row, grid, percent
from models.common.components import MethodOutput
from models.editing import instruct_pix2pix
from models.shapes.oracle import match_objects, read_scene
from models.shapes.world import render
from zoo.ip2p_data import EDIT_TYPES, EditTriple, sample_triple

NAME = "instruct_pix2pix"
MODEL = Path(__file__).resolve().parents[2] / "zoo" / "shapes-ip2p-tiny"
GRID_CASES = 16
EDITED_ATTRIBUTE = {"recolor": "color", "reshape": "shape", "resize": "size"}
TABLE_TEXT = (3.0, 7.5)
TABLE_IMAGE = (1.5, 5.0, 10.0)


def cases(n: int, seed: int) -> list[EditTriple]:
    """n test triples, edit types cycling through EDIT_TYPES."""
    rng = np.random.default_rng([seed, 41])
    return [sample_triple(rng, edit=EDIT_TYPES[i % len(EDIT_TYPES)], split="test") for i in range(n)]


def score(triple: EditTriple, image: Image.Image) -> tuple[bool, bool]:
    """(the requested change is seen, everything else is kept) for one output."""
    seen = read_scene(image)
    target = triple.target
    count_ok = len(seen.objects) == len(target.objects)
    agreements = match_objects(target, seen)
    if triple.edit == "background":
        success = seen.background == target.background
        kept = count_ok and all(agreement[a] for agreement in agreements for a in ATTRIBUTES)
        return success, kept
    attribute = EDITED_ATTRIBUTE[triple.edit]
    success = agreements[triple.index][attribute]
    kept = count_ok and seen.background == target.background
    for i, agreement in enumerate(agreements):
        kept = kept and all(agreement[a] for a in ATTRIBUTES if i != triple.index or a != attribute)
    return success, kept


def edit_all(
    ctx: BenchContext, triples: list[EditTriple], images: list[Image.Image], text: float, image: float
) -> tuple[list[MethodOutput], float]:
    """One job per case (generator seeded ctx.seed + i), as the service runs them; outputs and s/job."""
    outputs, seconds = [], 0.0
    for index, (triple, picture) in enumerate(zip(triples, images, strict=True)):
        params = instruct_pix2pix.Params(
            instruction=triple.instruction, steps=ctx.steps, guidance_scale=text, image_guidance_scale=image
        )
        generator = torch.Generator("cpu").manual_seed(ctx.seed + index)
        started = time.perf_counter()
        outputs.append(instruct_pix2pix.run(ctx.components, params, {"image": picture}, generator=generator))
        seconds += time.perf_counter() - started
    return outputs, seconds / max(len(triples), 1)


def run(ctx: BenchContext) -> GroupResult:
    """Issue 4: instruct-pix2pix against the ShapesWorld oracle."""
    if int(ctx.components.unet.config.in_channels) != 8:
        from bench.quality import load_model

        ctx = dataclasses.replace(ctx, components=load_model(MODEL))
    result = GroupResult()
    defaults = instruct_pix2pix.Params(instruction="")
    text, image = defaults.guidance_scale, defaults.image_guidance_scale

    # 1. Main rows at the default guidance scales, per edit type and overall.
    triples = cases(ctx.n, ctx.seed)
    inputs = [Image.fromarray(render(t.source).image) for t in triples]
    outputs, per = edit_all(ctx, triples, inputs, text, image)
    scores = [score(t, out.images[0]) for t, out in zip(triples, outputs, strict=True)]
    identity = [score(t, picture) for t, picture in zip(triples, inputs, strict=True)]
    setting = f"{ctx.steps} DDIM steps, s_T {text:g}, s_I {image:g}"
    success, kept = percent([s for s, _ in scores]), percent([k for _, k in scores])
    result.rows += [
        Row(
            NAME,
            "instruction success (oracle sees the change)",
            success,
            ">= 80",
            success >= 80,
            ctx.n,
            per,
            "%",
            setting + f"; the unedited input scores {percent([s for s, _ in identity]):.0f}%",
        ),
        Row(
            NAME,
            "untouched attributes kept",
            kept,
            ">= 90",
            kept >= 90,
            ctx.n,
            per,
            "%",
            "object count, the other attributes and objects, the background; "
            f"the input itself {percent([k for _, k in identity]):.0f}%",
        ),
    ]
    by_edit: dict[str, dict[str, float]] = {}
    for edit in EDIT_TYPES:
        chosen = [s for s, t in zip(scores, triples, strict=True) if t.edit == edit]
        by_edit[edit] = {"success": percent([s for s, _ in chosen]), "kept": percent([k for _, k in chosen])}
        result.rows.append(
            Row(
                NAME,
                f"{edit}: success / kept",
                by_edit[edit]["success"],
                "-",
                None,
                len(chosen),
                per,
                "%",
                f"kept {by_edit[edit]['kept']:.1f}%",
            )
        )
    shown = range(min(GRID_CASES, ctx.n))
    result.grids["instruct_pix2pix"] = grid(
        [im for i in shown for im in (inputs[i], outputs[i].images[0])],
        [label for i in shown for label in ("input", triples[i].instruction + (" ok" if scores[i][0] else " MISS"))],
        columns=8,
    )

    # 2. The two guidance scales: a small table on the first sixth of the cases.
    n_table = max(4, ctx.n // 6)
    table: list[dict[str, float]] = []
    for text_scale in TABLE_TEXT:
        for image_scale in TABLE_IMAGE:
            outs, seconds = edit_all(ctx, triples[:n_table], inputs[:n_table], text_scale, image_scale)
            pairs = [score(t, out.images[0]) for t, out in zip(triples[:n_table], outs, strict=True)]
            table.append(
                {
                    "guidance_scale": text_scale,
                    "image_guidance_scale": image_scale,
                    "success": percent([s for s, _ in pairs]),
                    "kept": percent([k for _, k in pairs]),
                    "seconds_per_job": seconds,
                }
            )
            result.rows.append(
                Row(
                    NAME,
                    f"s_T {text_scale:g}, s_I {image_scale:g}: success / kept",
                    table[-1]["success"],
                    "-",
                    None,
                    n_table,
                    seconds,
                    "%",
                    f"kept {table[-1]['kept']:.1f}%",
                )
            )
    result.extra = {"by_edit": by_edit, "guidance_table": table, "steps": ctx.steps, "model": MODEL.name}
    return result
