"""Issue 4, `imagic`: target attribute present and position kept, and the effect of eta.

Every case is a rendered test scene (a real image) and the caption of the same scene with one attribute of its
first object changed (colour and shape edits alternate, as in the diffedit rows; `bench.groups.inversion.edits`).
One Imagic job per case with the default stage A and B settings returns one image per eta of `ETAS`, all from
the same noise, so the eta table compares like with like. Fixed seeds: the cases from `ctx.seed`, each job's
generator from the case index.

- Success (the issue's figure): the oracle matches the edited object and sees the target attribute on it AND
  its cell (position) unchanged. The headline row is at `HEADLINE_ETA` (the job's default, chosen before the
  run); the table over eta shows the rest. "Everything else kept" (the other attributes and objects, the
  object count) is reported beside it, not part of the target.
- "Best eta per case" picks, per case, any eta in 0.6 ... 1.2 that succeeds: the paper chooses eta per image
  by eye, so this is that protocol with the oracle as the eye. It is labelled as such and is not the headline.
- eta = 0 is the fine-tuned model's reconstruction of the input (Kawar et al. fig. 5): the oracle's agreement
  with the source scene there says how well stages A and B fitted the image.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from bench.groups.inversion import Edit, edit_scores, edits
from bench.harness import BenchContext, GroupResult, Row, grid, percent
from models.editing import imagic
from models.shapes.oracle import match_objects, read_scene, scene_correct
from models.shapes.world import caption, render

NAME = "imagic"
ETAS = (0.0, 0.6, 0.7, 0.8, 1.0, 1.2)
EDIT_ETAS = tuple(eta for eta in ETAS if eta > 0)
HEADLINE_ETA = 0.7  # the default of the job; chosen before the run
GRID_CASES = 6
TARGET = 60.0


def success(edit: Edit, image: Image.Image) -> bool:
    """The target attribute on the matched edited object, and that object in its cell."""
    agreement = match_objects(edit.target, read_scene(image))[0]
    return agreement[edit.attribute] and agreement["position"]


def run(ctx: BenchContext) -> GroupResult:
    """Imagic against the ShapesWorld oracle: success per eta, the reconstruction at eta 0, seconds per job."""
    result = GroupResult()
    cases = edits(ctx, 400, ("color", "shape"))
    images = [Image.fromarray(render(edit.source).image) for edit in cases]
    defaults = imagic.Params(target_prompt="")
    outputs, seconds = [], 0.0
    for index, (edit, image) in enumerate(zip(cases, images, strict=True)):
        params = imagic.Params(target_prompt=caption(edit.target), etas=ETAS, steps=ctx.steps)
        generator = torch.Generator("cpu").manual_seed(ctx.seed + index)
        started = time.perf_counter()
        outputs.append(imagic.run(ctx.components, params, {"image": image}, generator=generator))
        seconds += time.perf_counter() - started
    per = seconds / max(len(cases), 1)
    by_eta = {eta: [out.images[ETAS.index(eta)] for out in outputs] for eta in ETAS}

    # Success and "everything else kept" per eta, and per edit kind
    table: dict[float, dict[str, float]] = {}
    for eta in EDIT_ETAS:
        wins = [success(edit, image) for edit, image in zip(cases, by_eta[eta], strict=True)]
        scores = [edit_scores(edit, image) for edit, image in zip(cases, by_eta[eta], strict=True)]
        table[eta] = {
            "success": percent(wins),
            "attribute_seen": percent([s[0] for s in scores]),
            "position_kept": percent([s[2]["position"] for s in scores]),
            "everything_else_kept": percent([s[1] for s in scores]),
            **{
                f"success_{kind}": percent([w for w, e in zip(wins, cases, strict=True) if e.attribute == kind])
                for kind in ("color", "shape")
            },
        }
    best = percent([any(success(edit, by_eta[eta][i]) for eta in EDIT_ETAS) for i, edit in enumerate(cases)])
    reconstructed = percent(
        [scene_correct(edit.source, read_scene(image)) for edit, image in zip(cases, by_eta[0.0], strict=True)]
    )

    setting = (
        f"stage A {defaults.embedding_steps} steps lr {defaults.embedding_lr:g}, stage B {defaults.finetune_steps} "
        f"steps lr {defaults.finetune_lr:g}, {ctx.steps} DDIM steps, guidance {defaults.guidance_scale}; "
        f"s / case is one job with all {len(ETAS)} etas"
    )
    head = table[HEADLINE_ETA]
    head_note = (
        f"eta {HEADLINE_ETA}; colour edits {head['success_color']:.0f}%, shape edits {head['success_shape']:.0f}%; "
        f"everything else kept {head['everything_else_kept']:.0f}%; " + setting
    )
    result.rows.append(
        Row(
            NAME,
            "imagic: target attribute seen and position kept",
            head["success"],
            f">= {TARGET:g}",
            head["success"] >= TARGET,
            ctx.n,
            per,
            "%",
            head_note,
        )
    )
    for eta in EDIT_ETAS:
        row = table[eta]
        note = (
            f"attribute seen {row['attribute_seen']:.0f}%, position kept {row['position_kept']:.0f}%, "
            f"everything else kept {row['everything_else_kept']:.0f}%; colour {row['success_color']:.0f}%, "
            f"shape {row['success_shape']:.0f}%"
        )
        result.rows.append(Row(NAME, f"imagic, eta {eta:g}: success", row["success"], "-", None, ctx.n, per, "%", note))
    result.rows += [
        Row(
            NAME,
            "imagic, best eta per case (oracle-chosen, as the paper chooses by eye)",
            best,
            "-",
            None,
            ctx.n,
            per,
            "%",
            f"any eta in {EDIT_ETAS} succeeds",
        ),
        Row(
            NAME,
            "imagic, eta 0: oracle sees the input's scene (reconstruction)",
            reconstructed,
            "-",
            None,
            ctx.n,
            per,
            "%",
            "how well stages A and B fitted the input",
        ),
    ]

    shown = range(min(GRID_CASES, ctx.n))
    result.grids["imagic"] = grid(
        [im for i in shown for im in (images[i], *(by_eta[eta][i] for eta in ETAS))],
        [label for i in shown for label in (caption(cases[i].target), *(f"eta {eta:g}" for eta in ETAS))],
        columns=1 + len(ETAS),
    )
    metric_names = ("embedding_loss_first", "embedding_loss_last", "finetune_loss_first", "finetune_loss_last")
    result.extra["by_eta"] = {f"{eta:g}": row for eta, row in table.items()}
    result.extra["losses"] = {
        name: float(np.mean([float(out.metrics[name]) for out in outputs])) for name in metric_names
    }
    result.extra["embedding_relative_change"] = float(
        np.mean([float(out.metrics["embedding_relative_change"]) for out in outputs])
    )
    return result
