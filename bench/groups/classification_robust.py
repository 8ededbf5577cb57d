"""Issue 6's robust-training rows: adversarially trained classifiers with and without generated data.

Robust rows: colour (6 classes), 20 real train scenes per class; generated data from `synthetic_data.run`
jobs (every colour at a random train context: shape, size, position, background), pseudo-labelled by the
Diffusion Classifier; the same CNN adversarially trained (PGD) on (a) real only, (b) real + generated with
pseudo-labels, (c) real + generated with prompt labels, (d) real only for as many optimizer steps as (b) (at equal
epochs (a) takes a third of the steps); clean and PGD accuracy on held-out real test scenes.
PGD is L-infinity with eps 8/255 on 32x32 inputs in [0, 1]: 3 steps of 3/255 in training, 10 steps of 2/255 in
evaluation. Sized for a shared 2-core CPU (a 16-channel CNN, 20 epochs); `robust.py` holds the model and attack.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from PIL import Image

from bench.groups.classification import CNN_SIZE, read_archive, with_attribute
from bench.harness import BenchContext, GroupResult, Row, grid, scenes
from models.classification import robust, synthetic_data
from models.shapes.world import COLORS, Scene, caption, render

NAME = "classification_robust"
REAL_PER_CLASS = 20
GENERATED_JOBS = 10  # synthetic-dataset jobs; each draws every colour `GENERATED_PER_JOB` times
GENERATED_PER_JOB = 4
ROBUST_TEST = 300
ADVERSARY = robust.Adversary(eps=8 / 255, alpha=3 / 255, steps=3)  # training
ATTACK = robust.Adversary(eps=8 / 255, alpha=2 / 255, steps=10)  # evaluation
ROBUST_CONFIG = robust.TrainConfig(epochs=20, batch_size=32, lr=2e-3, adversary=ADVERSARY, width=16)
ROBUST_SEEDS = (0, 1, 2)


def colour_scenes(split: str, per_class: int, seed: int) -> list[Scene]:
    """Single-object scenes, exactly `per_class` of each colour."""
    rng = np.random.default_rng(seed)
    found: dict[str, list[Scene]] = {c: [] for c in COLORS}
    while any(len(v) < per_class for v in found.values()):
        scene = scenes(split, 1, int(rng.integers(2**31)), 1)[0]
        if len(found[scene.objects[0].color]) < per_class:
            found[scene.objects[0].color].append(scene)
    return [scene for colour in COLORS for scene in found[colour]]


def robust_rows(ctx: BenchContext, result: GroupResult) -> None:
    """Adversarial training with and without generated data; clean and PGD accuracy on real test scenes."""
    colours = tuple(COLORS)
    real = colour_scenes("train", REAL_PER_CLASS, ctx.seed + 800)
    test = colour_scenes("test", ROBUST_TEST // len(colours), ctx.seed + 801)
    real_pixels = robust.to_tensor([Image.fromarray(render(s).image) for s in real], CNN_SIZE)
    real_labels = torch.tensor([colours.index(s.objects[0].color) for s in real])
    test_pixels = robust.to_tensor([Image.fromarray(render(s).image) for s in test], CNN_SIZE)
    test_labels = torch.tensor([colours.index(s.objects[0].color) for s in test])

    # Generated data: one synthetic-dataset job per context, every colour GENERATED_PER_JOB times
    started = time.perf_counter()
    contexts = scenes("train", GENERATED_JOBS, ctx.seed + 802, 1)
    generated: list[Image.Image] = []
    pseudo, prompted, agreement = [], [], []
    for job, context in enumerate(contexts):
        classes = [
            {"label": c, "prompt": caption(with_attribute(context, "color", c)), "count": GENERATED_PER_JOB}
            for c in colours
        ]
        params = synthetic_data.Params(classes=classes, steps=ctx.steps, pseudo_label=True)
        out = synthetic_data.run(ctx.components, params, generator=torch.Generator().manual_seed(ctx.seed + job))
        images, records = read_archive(out.files[synthetic_data.ARCHIVE].data)
        generated += images
        pseudo += [int(r["pseudo_label_index"]) for r in records]
        prompted += [int(r["class_index"]) for r in records]
        agreement.append(float(out.result["agreement_rate"]))
    generation_seconds = (time.perf_counter() - started) / len(generated)
    gen_pixels = robust.to_tensor(generated, CNN_SIZE)
    agree = 100.0 * float(np.mean([p == q for p, q in zip(pseudo, prompted, strict=True)]))

    settings = {
        "(a) real only": (real_pixels, real_labels),
        "(b) real + generated, pseudo-labels": (
            torch.cat([real_pixels, gen_pixels]),
            torch.cat([real_labels, torch.tensor(pseudo)]),
        ),
        "(c) real + generated, prompt labels": (
            torch.cat([real_pixels, gen_pixels]),
            torch.cat([real_labels, torch.tensor(prompted)]),
        ),
        "(d) real only, as many optimizer steps as (b)": (real_pixels, real_labels),
    }
    # (d) controls for training length: (b) and (c) have 3x the images, so 3x the steps at equal epochs
    epochs = {name: ROBUST_CONFIG.epochs for name in settings}
    epochs["(d) real only, as many optimizer steps as (b)"] = (
        ROBUST_CONFIG.epochs * len(settings["(b) real + generated, pseudo-labels"][0]) // len(real_pixels)
    )
    figures: dict[str, dict[str, list[float]]] = {}
    for name, (pixels, labels) in settings.items():
        figures[name] = {"clean": [], "robust": [], "seconds": []}
        for seed in ROBUST_SEEDS:
            started = time.perf_counter()
            config = dataclasses.replace(ROBUST_CONFIG, epochs=epochs[name])
            model = robust.train(pixels, {"color": labels}, {"color": len(colours)}, config, seed=seed)
            figures[name]["seconds"].append(time.perf_counter() - started)
            figures[name]["clean"].append(100 * robust.accuracy(model, test_pixels, test_labels, "color"))
            figures[name]["robust"].append(
                100 * robust.robust_accuracy(model, test_pixels, test_labels, "color", ATTACK, seed=ctx.seed + seed)
            )
    base_robust = max(float(np.mean(figures[name]["robust"])) for name in settings if "real only" in name)
    for name, f in figures.items():
        clean, rob = float(np.mean(f["clean"])), float(np.mean(f["robust"]))
        spread = (
            f"clean {min(f['clean']):.1f}-{max(f['clean']):.1f}, robust {min(f['robust']):.1f}-{max(f['robust']):.1f}"
        )
        n_train = int(settings[name][0].shape[0])
        common = f"{n_train} training images, {epochs[name]} epochs; mean of {len(ROBUST_SEEDS)} seeds ({spread}); "
        result.rows.append(
            Row(NAME, f"robust colour CNN {name}: clean accuracy", clean, "-", None, len(test), None, "%", common)
        )
        is_generated = name.startswith("(b)")
        result.rows.append(
            Row(
                NAME,
                f"robust colour CNN {name}: PGD accuracy",
                rob,
                "> (a), (d)" if is_generated else "-",
                rob > base_robust if is_generated else None,
                len(test),
                float(np.mean(f["seconds"])),
                "%",
                common
                + f"PGD L-inf eps {ATTACK.eps * 255:.0f}/255, {ATTACK.steps} steps of {ATTACK.alpha * 255:.0f}/255 "
                f"(training: {ADVERSARY.steps} steps); s / case is training seconds",
            )
        )
    result.rows.append(
        Row(
            NAME,
            "synthetic dataset: prompt / pseudo-label agreement",
            agree,
            "-",
            None,
            len(generated),
            generation_seconds,
            "%",
            f"{len(generated)} images from {GENERATED_JOBS} jobs ({ctx.steps} steps, guidance 7.5); pseudo-labels by "
            "the diffusion classifier over the job's 6 colour prompts (4 all, keep 2, +12)",
        )
    )
    shown = range(min(24, len(generated)))
    result.grids["classification_synthetic"] = grid(
        [generated[i] for i in shown],
        [f"asked {colours[prompted[i]]}, labelled {colours[pseudo[i]]}" for i in shown],
        columns=6,
    )
    result.extra["robust"] = {
        "figures": figures,
        "agreement_per_job": agreement,
        "generated": len(generated),
        "real": int(real_pixels.shape[0]),
    }


def run(ctx: BenchContext) -> GroupResult:
    """Issue 6: clean and PGD accuracy of adversarially trained CNNs with and without generated data."""
    result = GroupResult()
    robust_rows(ctx, result)
    return result
