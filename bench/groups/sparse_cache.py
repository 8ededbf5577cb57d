"""Bench group `sparse_cache`: what the activation cache buys a sequence of region edits of one image, end to end.

Ten successive `region-edit` jobs (`region_edit.run`, the worker's call, each with the cache handle a worker
passes) of one image, each with another 10% mask, the prompt, seed, steps and strength fixed (docs/sparse-cache.md):

1. On the zoo model at 256 px (64x64 latents), 25 steps at strength 0.6: every edit run three ways, interleaved so
   that a swing in the machine's load hits the three alike -- dense, sparse without the cache, sparse with it (the
   first a miss, then hits). Row: total time cached / dense (target <= 0.35); every cached output equal to its
   uncached sparse one.
2. On an SD 1.5-shaped random-weight model (bench/gpu.py's configs) at 256 px (32x32 latents), 10 steps at strength
   0.6: the ten cached edits, with dense and uncached sparse runs of the same edits interleaved at three and two of
   them. A dense job's time does not depend on the mask, so ten dense edits are ten times their mean (a note says
   how many were run). Row: cached / dense (target <= 0.6); the checked cached outputs equal to the uncached ones.
3. Memory, on the zoo model at 64 px: edits of two images alternate on a cache whose budget holds 1.5 recordings, so
   each miss evicts the other image's; the cache's bytes after every job (never above the budget), the evictions,
   and a job with the cache off (budget 0) equal to the job without a cache.

A plot of cumulative seconds over the ten edits, per way, for each model.

    python -m bench.quality --groups sparse_cache
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from bench.groups.region_edit import follow_up_masks
from bench.harness import BenchContext, GroupResult, Row, scenes
from models.common.activation_cache import ActivationCache, CacheHandle
from models.common.components import Components, MethodOutput
from models.editing import region_edit
from models.shapes.world import caption, render

NAME = "sparse_cache"
SIZE = 256
EDITS = 10
FRACTION = 0.10
STRENGTH = 0.6
ZOO_STEPS = 25
SD15_STEPS = 10  # a dense SD 1.5-shaped job at 256 px takes minutes on one CPU thread
SD15_DENSE_AT = (0, 4, 9)
SD15_SPARSE_AT = (1, 9)  # the first hit and the last
BUDGET = 16 * 1024**3  # bytes: roomy, so the sequences measure hits, not eviction


@dataclass
class Sequence:
    """Per way ("dense", "sparse", "cached"): the seconds of each edit that ran it, by edit index."""

    seconds: dict[str, dict[int, float]] = field(default_factory=lambda: {"dense": {}, "sparse": {}, "cached": {}})
    statuses: list[str] = field(default_factory=list)
    identical: list[bool] = field(default_factory=list)
    recording_bytes: int = 0
    cache_bytes: int = 0

    def total(self, way: str) -> float:
        """Seconds for all the edits: measured, or the measured ones' mean times their count."""
        values = self.seconds[way]
        if len(values) == EDITS:
            return sum(values.values())
        return statistics.mean(values.values()) * EDITS

    def series(self, way: str) -> list[float]:
        """Seconds per edit, the mean standing in for an edit not run that way."""
        values = self.seconds[way]
        mean = statistics.mean(values.values())
        return [values.get(i, mean) for i in range(EDITS)]


def run_sequence(
    components: Components,
    weights: str,
    steps: int,
    ways_at: Callable[[int], tuple[str, ...]],
    seed: int,
) -> Sequence:
    """Ten edits of one image; edit i runs the ways `ways_at(i)` (in that order), the cached one on one cache."""
    scene = scenes("test", 1, seed + 80, None)[0]
    image = Image.fromarray(render(scene, SIZE).image)
    prompt = caption(scene)
    cache = ActivationCache(BUDGET)
    result = Sequence()
    for index, mask in enumerate(follow_up_masks(EDITS, FRACTION, SIZE, seed + 81)):
        outputs: dict[str, MethodOutput] = {}
        for way in ways_at(index):
            inputs: dict[str, object] = {"image": image, "mask": mask}
            if way == "cached":
                inputs["activation_cache"] = CacheHandle(cache, weights)
            params = region_edit.Params(prompt=prompt, strength=STRENGTH, steps=steps, sparse=way != "dense")
            started = time.perf_counter()
            outputs[way] = region_edit.run(components, params, inputs, generator=torch.Generator().manual_seed(seed))
            result.seconds[way][index] = time.perf_counter() - started
        result.statuses.append(str(outputs["cached"].metrics["activation_cache"]))
        result.recording_bytes = int(outputs["cached"].metrics["activation_bytes"])
        result.cache_bytes = max(result.cache_bytes, cache.nbytes)
        if "sparse" in outputs:
            result.identical.append(
                np.array_equal(np.asarray(outputs["cached"].images[0]), np.asarray(outputs["sparse"].images[0]))
            )
    return result


def sequence_rows(result: GroupResult, label: str, sequence: Sequence, target: float, steps: int) -> None:
    ratio = sequence.total("cached") / sequence.total("dense")
    runs = {way: len(values) for way, values in sequence.seconds.items()}
    hits = sequence.statuses.count("hit")
    note = (
        f"uncached sparse / dense {sequence.total('sparse') / sequence.total('dense'):.2f}; {hits} hits, "
        f"{sequence.statuses.count('miss')} miss; {steps} steps at strength {STRENGTH}; one recording "
        f"{sequence.recording_bytes / 1e6:.0f} MB; edits run dense / sparse / cached: {runs['dense']} / "
        f"{runs['sparse']} / {runs['cached']}"
    )
    if min(runs.values()) < EDITS:
        note += f" (a way run fewer than {EDITS} times: the mean of its runs stands for the others)"
    result.rows.append(
        Row(NAME, f"{label}: {EDITS} edits of one image, 10% masks, {SIZE} px: total time cached / dense", ratio,
            f"<= {target}", ratio <= target, EDITS, sequence.total("cached") / EDITS, "x", note)
    )
    same = 100.0 * float(np.mean(sequence.identical))
    result.rows.append(
        Row(NAME, f"{label}: cached outputs identical to the uncached sparse ones", same, "100", same == 100.0,
            len(sequence.identical))
    )


def memory_rows(ctx: BenchContext, result: GroupResult) -> dict[str, object]:
    """Two images alternating on a cache that holds 1.5 recordings; then a job with the cache off."""
    images = [Image.fromarray(render(scene, 64).image) for scene in scenes("test", 2, ctx.seed + 90, None)]
    prompt = "a large red circle"
    masks = follow_up_masks(4, FRACTION, 64, ctx.seed + 91)
    params = region_edit.Params(prompt=prompt, strength=STRENGTH, steps=10)

    def job(image: Image.Image, mask: Image.Image, cache: ActivationCache | None) -> MethodOutput:
        inputs: dict[str, object] = {"image": image, "mask": mask}
        if cache is not None:
            inputs["activation_cache"] = CacheHandle(cache, "zoo")
        return region_edit.run(ctx.components, params, inputs, generator=torch.Generator().manual_seed(ctx.seed))

    entry = int(job(images[0], masks[0], ActivationCache(BUDGET)).metrics["activation_bytes"])
    cache = ActivationCache(entry * 3 // 2)
    held, statuses = [], []
    for mask in masks:
        for image in images:  # each image's entry evicts the other's
            statuses.append(str(job(image, mask, cache).metrics["activation_cache"]))
            held.append(cache.nbytes)
    over = sum(size > cache.budget_bytes for size in held)
    result.rows.append(
        Row(NAME, "memory: cache bytes after each of 8 jobs on two images <= the budget (1.5 recordings)",
            100.0 * (len(held) - over) / len(held), "100", over == 0, len(held), None, "%",
            f"budget {cache.budget_bytes / 1e6:.1f} MB, most held {max(held) / 1e6:.1f} MB; "
            f"{statuses.count('miss')} misses (every job evicts the other image's entry), {statuses.count('hit')} hits")
    )
    off = job(images[0], masks[1], ActivationCache(0))
    plain = job(images[0], masks[1], None)
    unchanged = np.array_equal(np.asarray(off.images[0]), np.asarray(plain.images[0]))
    result.rows.append(
        Row(NAME, "memory: a job with the cache off (budget 0) equals the job without a cache", 100.0 * unchanged,
            "100", unchanged, 1, None, "%", f"status {off.metrics['activation_cache']}")
    )
    return {"budget_bytes": cache.budget_bytes, "held_bytes": held, "statuses": statuses, "off_unchanged": unchanged}


def cumulative_plot(sequences: dict[str, Sequence]) -> Image.Image:
    """Cumulative seconds against the number of edits done: one panel per model, one line per way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"dense": "dense", "sparse": "sparse, no cache", "cached": "sparse, activation cache"}
    figure, axes = plt.subplots(1, len(sequences), figsize=(5 * len(sequences), 3.6), dpi=100, squeeze=False)
    for axis, (title, sequence) in zip(axes[0], sequences.items(), strict=True):
        for way, label in labels.items():
            measured = len(sequence.seconds[way]) == EDITS
            axis.plot(range(1, EDITS + 1), np.cumsum(sequence.series(way)), marker="o" if measured else None,
                      linestyle="-" if measured else "--", label=label + ("" if measured else " (mean of runs)"))
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("edits of the same image (each another 10% mask)")
        axis.set_ylabel("cumulative seconds")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def run(ctx: BenchContext) -> GroupResult:
    from bench.gpu import sd15_components

    torch.set_num_threads(1)
    result = GroupResult()
    zoo = run_sequence(ctx.components, "zoo", ZOO_STEPS, lambda i: ("dense", "sparse", "cached"), ctx.seed)
    sequence_rows(result, "zoo model", zoo, 0.35, ZOO_STEPS)

    def sd15_ways(index: int) -> tuple[str, ...]:
        return (
            ("dense",) * (index in SD15_DENSE_AT) + ("sparse",) * (index in SD15_SPARSE_AT) + ("cached",)
        )

    sd15 = run_sequence(sd15_components(torch.device("cpu"), torch.float32), "sd15-random", SD15_STEPS, sd15_ways,
                        ctx.seed)
    sequence_rows(result, "SD 1.5-shaped", sd15, 0.6, SD15_STEPS)
    memory = memory_rows(ctx, result)
    sequences = {"zoo model, 64x64 latents": zoo, "SD 1.5-shaped, 32x32 latents": sd15}
    result.grids["sparse_cache_cumulative"] = cumulative_plot(sequences)
    result.extra = {
        "zoo": {"seconds": zoo.seconds, "statuses": zoo.statuses, "identical": zoo.identical,
                "recording_bytes": zoo.recording_bytes, "steps": ZOO_STEPS},
        "sd15": {"seconds": sd15.seconds, "statuses": sd15.statuses, "identical": sd15.identical,
                 "recording_bytes": sd15.recording_bytes, "steps": SD15_STEPS},
        "memory": memory,
    }
    return result
