"""Issue 4's prompt-to-prompt rows: word swap (success with the layout kept), re-weighting monotonicity,
on generated pairs and on real images (world renders) through null-text inversion.

Word swap: a test scene's canonical caption with the colour or the shape word of its first object swapped
(cases alternate); the oracle must see the new attribute on the edit, and the layout must stay: the IoU of
the union of the oracle's object masks, source vs edit, at least 0.7. For reference the same seeds are also
run without injection (tau = 0, no self-attention: plain sampling of the target prompt).
Re-weighting: one-object scenes, source = target = the caption, the colour word re-weighted by each factor
of `REWEIGHT_FACTORS`; the colour's strength is the mean chroma along that colour's hue of the object pixels
(the oracle's masks on the factor-1 image). A case is monotonic when the strength never falls as the factor
grows. Real images: the rendered scene is inverted once (DDIM + null-text) and every edit shares it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from PIL import Image

from bench.harness import BenchContext, GroupResult, Row, grid, percent, scenes
from models.common.latents import decode, encode, images_to_tensor, tensor_to_images
from models.editing import prompt_to_prompt as p2p
from models.generation import text_to_image
from models.shapes.oracle import match_objects, opponent, read_scene, scene_correct
from models.shapes.world import COLORS, SHAPES, Scene, caption, is_held_out_object, render

NAME = "prompt_to_prompt"
IOU_KEPT = 0.7
SWAP_TARGET = 85.0
REWEIGHT_FACTORS = (0.5, 1.0, 2.0, 4.0)
GRID_CASES = 8


@dataclasses.dataclass(frozen=True)
class Swap:
    """A word-swap case: object 0's `attribute` changed from `old` to `new`."""

    source: Scene
    target: Scene
    attribute: str
    old: str
    new: str


def swapped(scene: Scene, attribute: str, rng: np.random.Generator) -> Swap:
    """`scene` with the colour or shape of its first object replaced by another in-distribution value."""
    first = scene.objects[0]
    values = SHAPES if attribute == "shape" else tuple(COLORS)
    old = getattr(first, attribute)
    choices = [v for v in values if v != old and not is_held_out_object(dataclasses.replace(first, **{attribute: v}))]
    new = str(rng.choice(choices))
    changed = dataclasses.replace(first, **{attribute: new})
    return Swap(scene, dataclasses.replace(scene, objects=(changed, *scene.objects[1:])), attribute, old, new)


def object_mask(image: Image.Image) -> np.ndarray:
    """Union (64, 64) bool of the objects the oracle sees."""
    mask = np.zeros((64, 64), dtype=bool)
    for seen in read_scene(image).objects:
        mask |= seen.mask
    return mask


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two masks; 0 when both are empty (no object seen: no layout to keep)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def color_strength(image: Image.Image, color: str, mask: np.ndarray | None = None) -> float:
    """Mean chroma of `image`'s pixels in `mask` (all pixels if None or empty) along the hue of `color`:
    the opponent-plane chroma (the oracle's colour space) projected on that colour's unit direction."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    if mask is not None and mask.any():
        pixels = pixels[mask]
    direction = opponent(np.asarray(COLORS[color], dtype=np.float64))
    return float((opponent(pixels) @ (direction / np.linalg.norm(direction))).mean())


def monotonic(values: list[float]) -> bool:
    return all(later >= earlier for earlier, later in zip(values, values[1:], strict=False))


def swap_params(ctx: BenchContext, swap: Swap, blend: bool) -> p2p.Params:
    words = (swap.old, swap.new) if blend else ()
    return p2p.Params(caption(swap.source), caption(swap.target), steps=ctx.steps, local_blend_words=words)


def swap_scores(swap: Swap, source: Image.Image, edit: Image.Image) -> tuple[bool, float]:
    """(the oracle sees the new attribute on object 0 of the edit, object-mask IoU source vs edit)."""
    seen = match_objects(swap.target, read_scene(edit))[0][swap.attribute]
    return seen, mask_iou(object_mask(source), object_mask(edit))


def swap_rows(
    ctx: BenchContext, result: GroupResult, label: str, cases: list[Swap], starts: list[p2p.Start] | None
) -> None:
    """Word swap (and word swap with local blend) on generated pairs (`starts` None) or inverted images."""
    grid_images: list[Image.Image] = []
    grid_labels: list[str] = []
    for variant in ("", "local blend"):
        seen_flags, ious, kept, sources_right, areas, seconds = [], [], [], [], [], 0.0
        for index, swap in enumerate(cases):
            params = swap_params(ctx, swap, blend=bool(variant))
            started = time.perf_counter()
            with torch.no_grad():
                start = starts[index] if starts else p2p.generated_start(ctx.components, params, seeded(ctx, index))
                out = p2p.sample_pair(ctx.components, params, start)
            seconds += time.perf_counter() - started
            seen, iou = swap_scores(swap, *out.images)
            seen_flags.append(seen)
            ious.append(iou)
            kept.append(seen and iou >= IOU_KEPT)
            sources_right.append(scene_correct(swap.source, read_scene(out.images[0])))
            areas.append(float(out.metrics.get("local_blend_area", 1.0)))
            if not variant and index < GRID_CASES:
                grid_images += out.images
                grid_labels += [caption(swap.source), f"-> {swap.new}"]
        name = f"word swap, {label}{', ' + variant if variant else ''}"
        per = seconds / max(len(cases), 1)
        iou_kept = percent([i >= IOU_KEPT for i in ious])
        note = (
            f"new attribute seen {percent(seen_flags):.0f}%, IoU >= {IOU_KEPT} {iou_kept:.0f}%"
            f", source correct {percent(sources_right):.0f}%"
        )
        if variant:
            note += f", mean blend mask area {100 * float(np.mean(areas)):.0f}% of the image"
        success = percent(kept)
        result.rows.append(
            Row(
                NAME,
                f"{name}: success with layout kept",
                success,
                f">= {SWAP_TARGET:g}",
                success >= SWAP_TARGET,
                len(cases),
                per,
                note=note,
            )
        )
        mean_iou = float(np.mean(ious)) if ious else 0.0
        result.rows.append(
            Row(
                NAME,
                f"{name}: mean object-mask IoU source vs edit",
                mean_iou,
                f">= {IOU_KEPT}",
                mean_iou >= IOU_KEPT,
                len(cases),
                per,
                unit="IoU",
            )
        )
        result.extra[f"{name} ious"] = [round(i, 3) for i in ious]
    result.grids[f"p2p_swap_{label.replace(' ', '_')}"] = grid(grid_images, grid_labels)


def seeded(ctx: BenchContext, index: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(ctx.seed + index)


def no_injection_reference(ctx: BenchContext, result: GroupResult, cases: list[Swap]) -> None:
    """The same seeds with the target prompt sampled plainly: what injection adds to layout keeping."""
    seen_flags, ious = [], []
    for index, swap in enumerate(cases):
        with torch.no_grad():
            source, edit = (
                text_to_image.run(
                    ctx.components,
                    text_to_image.Params(prompt=caption(scene), steps=ctx.steps),
                    generator=seeded(ctx, index),
                ).images[0]
                for scene in (swap.source, swap.target)
            )
        seen, iou = swap_scores(swap, source, edit)
        seen_flags.append(seen)
        ious.append(iou)
    result.rows.append(
        Row(
            NAME,
            "reference, no injection (plain target prompt, same seed): mean IoU",
            float(np.mean(ious)),
            "-",
            None,
            len(cases),
            unit="IoU",
            note=f"new attribute seen {percent(seen_flags):.0f}%",
        )
    )


def reweight_rows(
    ctx: BenchContext, result: GroupResult, label: str, cases: list[Scene], starts: list[p2p.Start] | None
) -> None:
    """Re-weight the colour word by each factor; is the colour's strength monotonic in the factor?"""
    curves, seconds = [], 0.0
    grid_images: list[Image.Image] = []
    grid_labels: list[str] = []
    for index, scene in enumerate(cases):
        color = scene.objects[0].color
        images = []
        for factor in REWEIGHT_FACTORS:
            params = p2p.Params(
                source_prompt=caption(scene),
                target_prompt=caption(scene),
                mode="reweight",
                reweight_token=color,
                reweight_factor=factor,
                steps=ctx.steps,
            )
            started = time.perf_counter()
            with torch.no_grad():
                start = starts[index] if starts else p2p.generated_start(ctx.components, params, seeded(ctx, index))
                images.append(p2p.sample_pair(ctx.components, params, start).images[1])
            seconds += time.perf_counter() - started
        mask = object_mask(images[REWEIGHT_FACTORS.index(1.0)])
        curves.append([color_strength(image, color, mask) for image in images])
        if index < GRID_CASES // 2:
            grid_images += images
            grid_labels += [f"{color} x{factor:g}" for factor in REWEIGHT_FACTORS]
    rate = percent([monotonic(curve) for curve in curves])
    means = np.mean(curves, axis=0).tolist() if curves else []
    per = seconds / max(len(cases) * len(REWEIGHT_FACTORS), 1)
    factors = ", ".join(f"x{f:g}" for f in REWEIGHT_FACTORS)
    result.rows.append(
        Row(
            NAME,
            f"re-weighting, {label}: colour strength monotonic in the factor ({factors})",
            rate,
            "-",
            None,
            len(cases),
            per,
            note="mean strength by factor " + ", ".join(f"{m:.1f}" for m in means),
        )
    )
    result.rows.append(
        Row(
            NAME,
            f"re-weighting, {label}: mean colour strength increases with the factor",
            100.0 * monotonic(means),
            "monotonic",
            monotonic(means),
            len(cases),
            per,
        )
    )
    result.extra[f"reweight {label} curves"] = [[round(v, 2) for v in curve] for curve in curves]
    result.grids[f"p2p_reweight_{label.replace(' ', '_')}"] = grid(
        grid_images, grid_labels, columns=len(REWEIGHT_FACTORS) * 2
    )


def invert_all(ctx: BenchContext, result: GroupResult, cases: list[Scene]) -> tuple[list[Image.Image], list[p2p.Start]]:
    """Render and invert each scene (null-text, default budget); rows: reconstruction quality and cost."""
    images = [Image.fromarray(render(scene).image) for scene in cases]
    starts, psnr_vae, right, right_vae, seconds = [], [], [], [], 0.0
    for scene, image in zip(cases, images, strict=True):
        params = p2p.Params(source_prompt=caption(scene), target_prompt=caption(scene), steps=ctx.steps)
        started = time.perf_counter()
        start = p2p.inverted_start(ctx.components, params, image)
        seconds += time.perf_counter() - started
        starts.append(start)
        with torch.no_grad():
            source = p2p.sample_pair(ctx.components, params, start).images[0]
            round_trip = tensor_to_images(
                decode(ctx.components.vae, encode(ctx.components.vae, images_to_tensor([image])))
            )[0]
        psnr_vae.append(psnr(source, round_trip))
        right.append(scene_correct(scene, read_scene(source)))
        right_vae.append(scene_correct(scene, read_scene(round_trip)))
    per = seconds / max(len(cases), 1)
    mean_psnr = float(np.mean(psnr_vae))
    result.rows.append(
        Row(
            NAME,
            f"real images: null-text reconstruction vs VAE round trip ({p2p.Params.null_text_steps} iterations/step)",
            mean_psnr,
            "-",
            None,
            len(cases),
            per,
            unit="dB",
            note=f"oracle agrees with the reconstruction {percent(right):.0f}% (with the VAE round trip "
            f"{percent(right_vae):.0f}%); s/case = the inversion",
        )
    )
    return images, starts


def psnr(a: Image.Image, b: Image.Image) -> float:
    error = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(float(error), 1e-10)))


def run(ctx: BenchContext) -> GroupResult:
    """Word swap and re-weighting on generated pairs and on inverted renders."""
    result = GroupResult()
    rng = np.random.default_rng(ctx.seed + 400)
    attributes = ("color", "shape")

    # 1. Generated pairs
    generated = [swapped(s, attributes[i % 2], rng) for i, s in enumerate(scenes("test", ctx.n, ctx.seed + 400, None))]
    swap_rows(ctx, result, "generated", generated, None)
    no_injection_reference(ctx, result, generated)
    reweight_rows(ctx, result, "generated", scenes("test", ctx.n, ctx.seed + 401, 1), None)

    # 2. Real images (world renders) through DDIM + null-text inversion, one inversion per image
    real = [swapped(s, attributes[i % 2], rng) for i, s in enumerate(scenes("test", ctx.n, ctx.seed + 402, 1))]
    images, starts = invert_all(ctx, result, [swap.source for swap in real])
    swap_rows(ctx, result, "real images", real, starts)
    reweight_rows(ctx, result, "real images", [swap.source for swap in real], starts)
    result.grids["p2p_real_inputs"] = grid(images[:GRID_CASES], [caption(s.source) for s in real[:GRID_CASES]])
    return result
