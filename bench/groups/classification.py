"""Issue 6's rows: the Diffusion Classifier's zero-shot accuracy (naive and adaptive protocols) and robust
classifiers trained with generated data.

Zero-shot cases are single-object ShapesWorld test scenes (fresh seeds), rendered, classified among:
- shape (5), colour (6), position (9): the scene's canonical caption with that attribute set to each value
  (the other attributes of the caption are the scene's own: the world's grammar has no shape-free colour
  phrase, so the attribute tasks are "which value, given the rest of the caption");
- caption (36): the scene's canonical caption and 35 distinct canonical captions of other random single-object
  test scenes, in random order.
One (t, eps) plan (seed ctx.seed) serves every case. For each case and task the errors of every class on
every sample of the plan are computed once (`sample_errors`, batched through the UNet); the naive protocol at
k samples per class is the plan's first k samples, and an adaptive schedule uses the same prefixes, so both
are read off one error matrix. The default adaptive schedule of `diffusion_classifier.Params` is also run
through `run(...)` on the first cases to check that the job gives the same predictions as the matrix.
Reference: a small multi-head CNN (`models/classification/robust.py`) trained on labelled train-split scenes;
for the caption task it scores each candidate by the sum of its heads' log-probabilities.
The robust-training rows are the group `classification_robust`.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.harness import BenchContext, GroupResult, Row, grid, percent, scenes
from models.classification import diffusion_classifier as dc
from models.classification import robust
from models.common.latents import encode, images_to_tensor
from models.common.text import encode_prompts
from models.shapes.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, caption, render

NAME = "classification"
N_CAPTION_CLASSES = 36
TASKS = ("shape", "color", "position", "caption")
VALUES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "position": POSITIONS}
NAIVE_BUDGETS = (1, 2, 4, 8, 16, 32)  # samples per class; the last is the naive reference
ADAPTIVE_FIRST_STAGES = (1, 2, 4, 8)  # samples per class in stage 1 of the adaptive curve (keep 5, total 32)
ADAPTIVE_KEEP = 5
RUN_CHECK_CASES = 4  # cases checked through run(...) with the default schedule
# Supervised reference
CNN_SIZE = 32
CNN_TRAIN_SCENES = 2000
CNN_CONFIG = robust.TrainConfig(epochs=10, batch_size=64, lr=3e-3)


def with_attribute(scene: Scene, attribute: str, value: str) -> Scene:
    return dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], **{attribute: value}),))


def candidates(scene: Scene, task: str, rng: np.random.Generator) -> tuple[list[str], int]:
    """The class prompts of one case and the index of the right one."""
    if task in VALUES:
        values = VALUES[task]
        return [caption(with_attribute(scene, task, v)) for v in values], values.index(getattr(scene.objects[0], task))
    truth = caption(scene)
    others: list[str] = []
    while len(others) < N_CAPTION_CLASSES - 1:
        other = caption(scenes("test", 1, int(rng.integers(2**31)), 1)[0])
        if other != truth and other not in others:
            others.append(other)
    where = int(rng.integers(N_CAPTION_CLASSES))
    return others[:where] + [truth] + others[where:], where


def adaptive_prediction(errors: torch.Tensor, first: int, keep: int) -> tuple[int, int]:
    """Algorithm 2 read off an error matrix (N, K) whose rows are the plan's samples in order: stage 1 with the
    first `first` samples for every class, keep `keep`, stage 2 with all N for those. (prediction, evaluations)."""
    n, k = errors.shape
    stage1 = errors[:first].mean(0)
    alive = sorted(range(k), key=lambda c: (float(stage1[c]), c))[: min(keep, k)]
    final = errors[:, alive].mean(0)
    best = alive[min(range(len(alive)), key=lambda i: (float(final[i]), alive[i]))]
    return best, k * first + len(alive) * (n - first)


def naive_prediction(errors: torch.Tensor, budget: int) -> int:
    mean = errors[:budget].mean(0)
    return min(range(errors.shape[1]), key=lambda c: (float(mean[c]), c))


def plot(curves: dict[str, dict[str, list[tuple[float, float]]]], chance: dict[str, float]) -> Image.Image:
    """Accuracy against UNet evaluations per image, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4), dpi=100)
    for axis, (task, lines) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        for label, points in lines.items():
            xs, ys = zip(*points, strict=True)
            axis.plot(xs, ys, marker="o" if label == "naive" else "s", label=label)
        axis.axhline(chance[task], color="grey", linestyle=":", label="chance")
        axis.set_xscale("log")
        axis.set_title(task)
        axis.set_xlabel("UNet evaluations per image")
        axis.set_ylabel("accuracy %")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def zero_shot(ctx: BenchContext, result: GroupResult) -> dict[str, list[tuple[list[str], int]]]:
    """The error matrices, the naive and adaptive curves, the target row; returns the cases for the CNN rows."""
    components = ctx.components
    cases = scenes("test", ctx.n, ctx.seed + 600, 1)
    rng = np.random.default_rng(ctx.seed + 601)
    task_cases = {task: [candidates(scene, task, rng) for scene in cases] for task in TASKS}
    n_max = NAIVE_BUDGETS[-1]
    defaults = dc.Params()
    plan_params = dc.Params(samples_per_stage=(n_max,), keep_per_stage=())
    images = [Image.fromarray(render(scene).image) for scene in cases]
    with torch.no_grad():
        latents = encode(components.vae, images_to_tensor(images))
        plan = dc.make_plan(components, plan_params, tuple(latents.shape[1:]), torch.Generator().manual_seed(ctx.seed))
    matrices: dict[str, list[torch.Tensor]] = {task: [] for task in TASKS}
    seconds: dict[str, float] = {}
    for task in TASKS:
        started = time.perf_counter()
        for index, (prompts, _) in enumerate(task_cases[task]):
            with torch.no_grad():
                embeddings = encode_prompts(components.text_encoder, components.tokenizer, prompts)
                errors = dc.sample_errors(
                    components, latents[index : index + 1], embeddings, plan, range(n_max), range(len(prompts)), 64
                )
            matrices[task].append(errors)
        seconds[task] = (time.perf_counter() - started) / len(cases)

    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    table: list[dict[str, Any]] = []
    chance = {task: 100.0 / len(task_cases[task][0][0]) for task in TASKS}
    summary: dict[str, dict[str, float]] = {}
    for task in TASKS:
        truths = [truth for _, truth in task_cases[task]]
        k = len(task_cases[task][0][0])
        lines: dict[str, list[tuple[float, float]]] = {"naive": []}
        for budget in NAIVE_BUDGETS:
            acc = percent([naive_prediction(m, budget) == t for m, t in zip(matrices[task], truths, strict=True)])
            lines["naive"].append((k * budget, acc))
            table.append({"task": task, "protocol": "naive", "samples": f"{budget}", "evals": k * budget, "acc": acc})
        label = f"adaptive (s1, keep {ADAPTIVE_KEEP}, {n_max})"
        lines[label] = []
        for first in ADAPTIVE_FIRST_STAGES:
            outcomes = [adaptive_prediction(m, first, ADAPTIVE_KEEP) for m in matrices[task]]
            acc = percent([p == t for (p, _), t in zip(outcomes, truths, strict=True)])
            evals = float(np.mean([e for _, e in outcomes]))
            lines[label].append((evals, acc))
            schedule = f"{first} all, keep {ADAPTIVE_KEEP}, +{n_max - first}"
            table.append({"task": task, "protocol": "adaptive", "samples": schedule, "evals": evals, "acc": acc})
        curves[task] = lines
        first, keep = defaults.samples_per_stage[0], defaults.keep_per_stage[0]
        outcomes = [adaptive_prediction(m, first, keep) for m in matrices[task]]
        summary[task] = {
            "naive": lines["naive"][-1][1],
            "naive_evals": float(k * n_max),
            "adaptive": percent([p == t for (p, _), t in zip(outcomes, truths, strict=True)]),
            "adaptive_evals": float(np.mean([e for _, e in outcomes])),
            "seconds_full_matrix": seconds[task],
        }

    # The job itself, default schedule, on the first cases: same predictions as the matrix read-off
    check_cases = min(RUN_CHECK_CASES, ctx.n)
    agree, run_seconds = [], []
    for index in range(check_cases):
        prompts, _ = task_cases["caption"][index]
        started = time.perf_counter()
        out = dc.run(
            components,
            dataclasses.replace(defaults, prompts=prompts),
            {"image": images[index]},
            generator=torch.Generator().manual_seed(ctx.seed),
        )
        run_seconds.append(time.perf_counter() - started)
        expected, _ = adaptive_prediction(matrices["caption"][index], first, keep)
        agree.append(out.result["results"][0]["predicted_index"] == expected)

    caption_summary = summary["caption"]
    saving = caption_summary["naive_evals"] / caption_summary["adaptive_evals"]
    reached = caption_summary["adaptive"] >= caption_summary["naive"] - 1.0
    setting = f"{n_max} samples per class, t uniform over [0, 1000), uniform weighting, one shared (t, eps) plan"
    for task in TASKS:
        s = summary[task]
        k = len(task_cases[task][0][0])
        note = (
            f"chance {chance[task]:.1f}%; adaptive ({defaults.samples_per_stage[0]} all, keep "
            f"{defaults.keep_per_stage[0]}, +{defaults.samples_per_stage[1]}): {s['adaptive']:.1f}% at "
            f"{s['adaptive_evals']:.0f} evaluations; {setting}"
        )
        result.rows.append(
            Row(
                NAME,
                f"diffusion classifier, {task} ({k} classes), naive {int(s['naive_evals'])} evaluations",
                s["naive"],
                f"> chance {chance[task]:.1f}",
                s["naive"] > chance[task],
                ctx.n,
                s["seconds_full_matrix"],
                "%",
                note,
            )
        )
    result.rows.append(
        Row(
            NAME,
            "diffusion classifier, caption (36 classes): evaluation saving of adaptive over naive",
            saving,
            ">= 4 (adaptive within 1 point)",
            reached and saving >= 4.0,
            ctx.n,
            float(np.mean(run_seconds)),
            "x",
            f"adaptive {caption_summary['adaptive']:.1f}% at {caption_summary['adaptive_evals']:.0f} evaluations vs "
            f"naive {caption_summary['naive']:.1f}% at {caption_summary['naive_evals']:.0f}; s / case is run(...) "
            f"with the default schedule; its prediction equals the read-off in {sum(agree)} of {check_cases} cases",
        )
    )
    result.grids["classification_accuracy_vs_evaluations"] = plot(curves, chance)
    shown = range(min(8, ctx.n))
    verdicts = [naive_prediction(matrices["caption"][i], n_max) == task_cases["caption"][i][1] for i in shown]
    result.grids["classification_cases"] = grid(
        [images[i] for i in shown],
        [f"{caption(cases[i])}: {'right' if right else 'wrong'}" for i, right in zip(shown, verdicts, strict=True)],
        columns=4,
    )
    result.extra["zero_shot"] = {"summary": summary, "curve_table": table, "run_check_agrees": agree}
    return {task: task_cases[task] for task in TASKS}


def reference_cnn(ctx: BenchContext, result: GroupResult, task_cases: dict[str, list[tuple[list[str], int]]]) -> None:
    """The supervised reference: one multi-head CNN on labelled train scenes, judged on the same cases."""
    started = time.perf_counter()
    train_scenes = scenes("train", CNN_TRAIN_SCENES, ctx.seed + 700, 1)
    heads = {"shape": len(SHAPES), "color": len(COLORS), "size": len(SIZES), "position": len(POSITIONS)}
    heads["background"] = len(BACKGROUNDS)
    values: dict[str, tuple[str, ...]] = {**VALUES, "size": SIZES}
    pixels = robust.to_tensor([Image.fromarray(render(s).image) for s in train_scenes], CNN_SIZE)

    def labels_of(scene_list: list[Scene]) -> dict[str, torch.Tensor]:
        out = {a: torch.tensor([values[a].index(getattr(s.objects[0], a)) for s in scene_list]) for a in values}
        out["background"] = torch.tensor([BACKGROUNDS.index(s.background) for s in scene_list])
        return out

    model = robust.train(pixels, labels_of(train_scenes), heads, CNN_CONFIG, seed=ctx.seed)
    train_seconds = time.perf_counter() - started
    test_scenes = scenes("test", ctx.n, ctx.seed + 600, 1)  # the zero-shot cases
    log_probs = robust.predict(
        model, robust.to_tensor([Image.fromarray(render(s).image) for s in test_scenes], CNN_SIZE)
    )
    test_labels = labels_of(test_scenes)
    figures: dict[str, float] = {}
    for task in ("shape", "color", "position"):
        figures[task] = 100.0 * float((log_probs[task].argmax(-1) == test_labels[task]).float().mean())
    from models.shapes.world import parse_caption

    right = []
    for index, (prompts, truth) in enumerate(task_cases["caption"]):
        scores = []
        for prompt in prompts:
            scene = parse_caption(prompt)
            obj = scene.objects[0]
            score = sum(float(log_probs[a][index, values[a].index(getattr(obj, a))]) for a in values)
            scores.append(score + float(log_probs["background"][index, BACKGROUNDS.index(scene.background)]))
        right.append(int(np.argmax(scores)) == truth)
    figures["caption"] = percent(right)
    for task, figure in figures.items():
        result.rows.append(
            Row(
                NAME,
                f"supervised reference CNN, {task}",
                figure,
                "-",
                None,
                ctx.n,
                None,
                "%",
                f"{CNN_TRAIN_SCENES} labelled train scenes at {CNN_SIZE}x{CNN_SIZE}, {CNN_CONFIG.epochs} epochs, "
                f"trained in {train_seconds:.0f} s",
            )
        )
    result.extra["reference_cnn"] = {**figures, "train_seconds": train_seconds}


def read_archive(data: bytes) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    """The images and label records of a dataset.zip, in the labels file's order."""
    import json
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        records = [json.loads(line) for line in archive.read("labels.jsonl").decode().splitlines()]
        images = [Image.open(io.BytesIO(archive.read(r["file"]))).convert("RGB") for r in records]
    return images, records


def run(ctx: BenchContext) -> GroupResult:
    """Issue 6: zero-shot accuracy and UNet evaluations of the Diffusion Classifier, and the supervised reference."""
    result = GroupResult()
    task_cases = zero_shot(ctx, result)
    reference_cnn(ctx, result, task_cases)
    return result
