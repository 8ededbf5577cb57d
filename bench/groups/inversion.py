"""Issue 4's inversion rows: ddim-inversion (oracle agreement, PSNR), ddib translations, diffedit (mask IoU, edits).

Every case starts from a rendered test scene (a real image, not a generated one) and its canonical caption;
an edit changes one attribute of the scene's first object, and the oracle reads the output back. Fixed
seeds: the scenes and the edits come from `ctx.seed`, each job's generator from the case index.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.harness import ATTRIBUTES, BenchContext, GroupResult, Row, grid, percent, scenes
from models.common.components import MethodOutput
from models.common.latents import decode, encode, images_to_tensor, tensor_to_images
from models.editing import ddib, ddim_inversion, diffedit
from models.shapes.oracle import match_objects, read_scene, scene_correct
from models.shapes.world import COLORS, SHAPES, Scene, caption, is_held_out_object, render

NAME = "inversion"
GRID_CASES = 8
DDIB_GUIDANCE = (1.0, ddib.Params.guidance_scale)


@dataclasses.dataclass(frozen=True)
class Edit:
    """One translation case: the source scene, the target scene (one attribute of object 0 changed)."""

    source: Scene
    target: Scene
    attribute: str


def edited(scene: Scene, attribute: str, rng: np.random.Generator) -> Edit:
    """`scene` with `attribute` ("shape" or "color") of its first object changed to another value that keeps
    the object inside the training distribution (no held-out shape or combination)."""
    first = scene.objects[0]
    values = SHAPES if attribute == "shape" else tuple(COLORS)
    choices = [
        value
        for value in values
        if value != getattr(first, attribute)
        and not is_held_out_object(dataclasses.replace(first, **{attribute: value}))
    ]
    changed = dataclasses.replace(first, **{attribute: str(rng.choice(choices))})
    return Edit(scene, dataclasses.replace(scene, objects=(changed, *scene.objects[1:])), attribute)


def edits(ctx: BenchContext, offset: int, attributes: tuple[str, ...]) -> list[Edit]:
    """ctx.n edits of test scenes, cycling through `attributes`."""
    rng = np.random.default_rng(ctx.seed + offset + 1)
    sources = scenes("test", ctx.n, ctx.seed + offset, None)
    return [edited(scene, attributes[i % len(attributes)], rng) for i, scene in enumerate(sources)]


def timed_jobs(
    ctx: BenchContext, method: Callable[..., MethodOutput], params: list[Any], images: list[Image.Image]
) -> tuple[list[MethodOutput], float]:
    """Run `method` (a module's `run`) on each (params, image) pair, one job at a time as the service does,
    case i with a generator seeded ctx.seed + i; returns the outputs and seconds per job."""
    outputs, seconds = [], 0.0
    for index, (job_params, image) in enumerate(zip(params, images, strict=True)):
        generator = torch.Generator("cpu").manual_seed(ctx.seed + index)
        started = time.perf_counter()
        outputs.append(method(ctx.components, job_params, {"image": image}, generator=generator))
        seconds += time.perf_counter() - started
    return outputs, seconds / max(len(params), 1)


def edit_scores(edit: Edit, image: Image.Image) -> tuple[bool, bool, dict[str, bool]]:
    """(the edited attribute is seen, every other attribute of every object is kept and no object is
    added or lost, per-attribute agreement of the edited object) for one output."""
    seen = read_scene(image)
    agreements = match_objects(edit.target, seen)
    others = [a for a in ATTRIBUTES if a != edit.attribute]
    kept = len(seen.objects) == len(edit.target.objects)
    kept = kept and all(agreements[0][a] for a in others)
    kept = kept and all(agreement[a] for agreement in agreements[1:] for a in ATTRIBUTES)
    return agreements[0][edit.attribute], kept, agreements[0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def latent_grid_best(mask: np.ndarray, factor: int) -> np.ndarray:
    """The best a latent-grid mask can do: cells more than half covered by `mask` (H, W), back at pixels."""
    height, width = mask.shape
    cells = mask.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3)) > 0.5
    return np.kron(cells, np.ones((factor, factor), dtype=bool)).astype(bool)


def inversion_rows(ctx: BenchContext, result: GroupResult) -> None:
    """DDIM inversion then reconstruction with the canonical caption, guidance 1."""
    cases = scenes("test", ctx.n, ctx.seed + 100, None)
    images = [Image.fromarray(render(scene).image) for scene in cases]
    params = [ddim_inversion.Params(prompt=caption(scene), steps=ctx.steps) for scene in cases]
    outputs, per = timed_jobs(ctx, ddim_inversion.run, params, images)
    recon = [out.images[0] for out in outputs]
    agree = [scene_correct(scene, read_scene(image)) for scene, image in zip(cases, recon, strict=True)]
    with torch.no_grad():  # the ceiling: the VAE round trip alone
        round_trips = [
            tensor_to_images(decode(ctx.components.vae, encode(ctx.components.vae, images_to_tensor([image]))))[0]
            for image in images
        ]
    vae_agree = [scene_correct(scene, read_scene(image)) for scene, image in zip(cases, round_trips, strict=True)]
    psnr = [float(out.metrics["psnr"]) for out in outputs]
    psnr_rt = [float(out.metrics["psnr_vs_round_trip"]) for out in outputs]
    vae_psnr = [float(out.metrics["vae_round_trip_psnr"]) for out in outputs]
    acc = percent(agree)
    agree_note = f"{ctx.steps} steps each way, guidance 1; the VAE round trip alone: oracle {percent(vae_agree):.0f}%"
    psnr_note = (
        f"VAE round trip {np.mean(vae_psnr):.1f} dB (the ceiling); "
        f"vs the round trip {np.mean(psnr_rt):.1f} dB (the inversion's own error)"
    )
    result.rows += [
        Row(
            NAME,
            "ddim-inversion: oracle agrees with the input's scene",
            acc,
            ">= 95",
            acc >= 95,
            ctx.n,
            per,
            "%",
            agree_note,
        ),
        Row(NAME, "ddim-inversion: PSNR vs input", float(np.mean(psnr)), "-", None, ctx.n, per, "dB", psnr_note),
    ]
    shown = range(min(GRID_CASES, ctx.n))
    result.grids["inversion_ddim_inversion"] = grid(
        [im for i in shown for im in (images[i], round_trips[i], recon[i])],
        [label for i in shown for label in (caption(cases[i]), "VAE round trip", f"inverted {psnr[i]:.1f} dB")],
        columns=3,
    )
    result.extra["ddim_inversion"] = {
        "psnr_mean": float(np.mean(psnr)),
        "psnr_vs_round_trip_mean": float(np.mean(psnr_rt)),
        "vae_round_trip_psnr_mean": float(np.mean(vae_psnr)),
        "vae_round_trip_oracle": percent(vae_agree),
    }


def ddib_rows(ctx: BenchContext, result: GroupResult) -> None:
    """Shape translations "a red circle ..." -> "a red square ...", at guidance 1 and at the default."""
    cases = edits(ctx, 200, ("shape",))
    images = [Image.fromarray(render(edit.source).image) for edit in cases]
    for guidance in DDIB_GUIDANCE:
        params = [
            ddib.Params(caption(e.source), caption(e.target), steps=ctx.steps, guidance_scale=guidance) for e in cases
        ]
        outputs, per = timed_jobs(ctx, ddib.run, params, images)
        scores = [edit_scores(edit, out.images[0]) for edit, out in zip(cases, outputs, strict=True)]
        changed, kept = percent([s[0] for s in scores]), percent([s[1] for s in scores])
        attributes = {a: percent([s[2][a] for s in scores]) for a in ATTRIBUTES}
        note = f"{ctx.steps} steps; edited object: " + ", ".join(f"{a} {v:.0f}%" for a, v in attributes.items())
        kept_note = "colour, size, position of the edited object; every attribute of the others; object count"
        name = f"ddib, guidance {guidance:g}"
        result.rows += [
            Row(NAME, f"{name}: target shape seen", changed, ">= 80", changed >= 80, ctx.n, per, "%", note),
            Row(NAME, f"{name}: other attributes kept", kept, ">= 90", kept >= 90, ctx.n, per, "%", kept_note),
        ]
        shown = range(min(GRID_CASES, ctx.n))
        result.grids[f"inversion_ddib_g{guidance:g}"] = grid(
            [im for i in shown for im in (images[i], outputs[i].images[0])],
            [label for i in shown for label in (caption(cases[i].source), caption(cases[i].target))],
            columns=4,
        )
        result.extra[f"ddib_g{guidance:g}"] = {"edited_object_attributes": attributes}


def diffedit_rows(ctx: BenchContext, result: GroupResult) -> None:
    """Colour and shape edits (alternating) with R = the source caption and Q = the target caption."""
    cases = edits(ctx, 300, ("color", "shape"))
    images = [Image.fromarray(render(edit.source).image) for edit in cases]
    params = [diffedit.Params(caption(e.target), caption(e.source), steps=ctx.steps) for e in cases]
    outputs, per = timed_jobs(ctx, diffedit.run, params, images)
    factor = ctx.components.vae_scale
    ious, best_ious, outside_diffs, successes, kept = [], [], [], [], []
    for edit, image, out in zip(cases, images, outputs, strict=True):
        # The true edit region: the first object before and after the edit
        true_mask = render(edit.source).masks[0] | render(edit.target).masks[0]
        mask = np.asarray(out.extra_images["mask"].convert("L")) >= 128
        ious.append(iou(mask, true_mask))
        best_ious.append(iou(latent_grid_best(true_mask, factor), true_mask))
        difference = np.abs(np.asarray(out.images[0], dtype=np.float64) - np.asarray(image, dtype=np.float64))
        outside_diffs.append(float(difference.mean(axis=-1)[~true_mask].mean()))
        seen, others_kept, _ = edit_scores(edit, out.images[0])
        successes.append(seen)
        kept.append(others_kept)
    mean_iou, success = float(np.mean(ious)), percent(successes)
    by_kind = {
        kind: percent([s for s, e in zip(successes, cases, strict=True) if e.attribute == kind])
        for kind in ("color", "shape")
    }
    fractions = [float(out.metrics["mask_fraction"]) for out in outputs]
    defaults = diffedit.Params(query_prompt="")
    setting = (
        f"{ctx.steps} steps, r {defaults.encoding_ratio}, threshold {defaults.mask_threshold}, "
        f"{defaults.n_mask_samples} mask samples, guidance {defaults.guidance_scale}"
    )
    iou_note = (
        f"mean mask area {100 * np.mean(fractions):.0f}%; the true mask on the latent grid: IoU "
        f"{np.mean(best_ious):.2f}; "
    )
    success_note = (
        f"colour edits {by_kind['color']:.0f}%, shape edits {by_kind['shape']:.0f}%; "
        f"everything else kept {percent(kept):.0f}%"
    )
    outside = float(np.mean(outside_diffs))
    outside_note = "vs the input; includes the VAE round trip's own error"
    result.rows += [
        Row(
            NAME,
            "diffedit: mask IoU with the true edit region",
            mean_iou,
            ">= 0.6",
            mean_iou >= 0.6,
            ctx.n,
            per,
            "IoU",
            iou_note + setting,
        ),
        Row(
            NAME,
            "diffedit: edit succeeds (oracle sees the query attribute)",
            success,
            ">= 80",
            success >= 80,
            ctx.n,
            per,
            "%",
            success_note,
        ),
        Row(
            NAME,
            "diffedit: mean abs difference outside the true mask",
            outside,
            "-",
            None,
            ctx.n,
            per,
            "/255",
            outside_note,
        ),
    ]
    shown = range(min(GRID_CASES, ctx.n))
    result.grids["inversion_diffedit"] = grid(
        [im for i in shown for im in (images[i], outputs[i].images[0], outputs[i].extra_images["mask"].convert("RGB"))],
        [
            label
            for i in shown
            for label in (caption(cases[i].source), caption(cases[i].target), f"mask IoU {ious[i]:.2f}")
        ],
        columns=3,
    )
    extra: dict[str, Any] = {"iou_mean": mean_iou, "best_latent_grid_iou": float(np.mean(best_ious))}
    extra |= {"success_by_kind": by_kind, "kept": percent(kept), "mask_fraction_mean": float(np.mean(fractions))}
    result.extra["diffedit"] = extra


def run(ctx: BenchContext) -> GroupResult:
    """Issue 4: ddim-inversion, ddib and diffedit against the ShapesWorld oracle."""
    result = GroupResult()
    inversion_rows(ctx, result)
    ddib_rows(ctx, result)
    diffedit_rows(ctx, result)
    return result
