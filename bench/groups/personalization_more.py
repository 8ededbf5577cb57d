"""Issue 5's DreamBooth, Custom Diffusion and Perfusion rows on ShapesWorld's held-out concepts.

Concepts (never in base training): the star, heart and cross shapes, the checkered fill and the two-tone circle
subject, each learned from 5 rendered images (random colour, size, cell, background; fixed seeds). Each method
trains one adapter per concept, then with fixed generation seeds (ctx.seed + i, DDIM `GEN_STEPS`, guidance 7.5):
- fidelity: "a S*" prompts; the oracle must see the concept (the shape; the checkered fill; a two-tone red+blue
  object for the subject). Target >= 80%;
- editability: "a blue S* at the top left" (the subject is two-tone by definition: "a S* at the top left"); the
  concept, the colour and the cell must all be read. Target >= 70%;
- DreamBooth prior preservation: "a <class>" prompts with the adapter installed must still show that class shape,
  solid, in >= 90% -- beside the base model's own figure and the figure of the same training without the prior loss;
- two concepts in one image (Custom Diffusion: the closed-form merge of the star and heart adapters; Perfusion: the
  two adapters applied together): both shapes read in one image, target >= 50%;
- adapter size (safetensors bytes), training wall time per concept on this CPU (one torch thread), and the peak
  resident memory of the process while training (sampled every 20 ms; the loaded model is included).

Prompts of DreamBooth and Custom Diffusion carry the class word after the token ("a S* diamond"), as they were
trained; Perfusion's carry the token alone (its key is locked to the class word). The numbers are the tiny zoo
model's: its own text-to-image reads position right ~15% and colour ~70% (bench/results/quality-zoo.md), which
bounds editability from above whatever the method does.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.harness import BenchContext, GroupResult, Row, grid, percent
from models.common.components import Components, MethodOutput
from models.generation import text_to_image
from models.personalization import captions, custom_diffusion, dreambooth, perfusion
from models.personalization.common import Adapter
from models.personalization.training import concept_phrase
from models.shapes.oracle import SeenObject, read_scene
from models.shapes.world import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SIZES,
    SUBJECT_COLOR,
    Scene,
    ShapeObject,
    render,
)

NAME = "personalization_more"
N_IMAGES = 5
GUIDANCE = 7.5
GRID_SHOWN = 3


@dataclasses.dataclass(frozen=True)
class Concept:
    """A held-out concept: how to draw its training objects, its class word, and how the oracle recognises it."""

    name: str
    class_word: str
    make: Callable[[np.random.Generator, str], ShapeObject]  # (rng, position) -> object
    seen: Callable[[SeenObject], bool]
    editable_color: bool = True


def _shape_concept(shape: str, class_word: str) -> Concept:
    return Concept(
        shape,
        class_word,
        lambda rng, cell: ShapeObject(shape, str(rng.choice(list(COLORS))), str(rng.choice(SIZES)), cell),
        lambda obj: obj.shape == shape,
    )


CONCEPTS: tuple[Concept, ...] = (
    _shape_concept("star", "diamond"),
    _shape_concept("heart", "circle"),
    _shape_concept("cross", "square"),
    Concept(
        "checkered",
        "square",
        lambda rng, cell: ShapeObject(
            "square", str(rng.choice(list(COLORS))), str(rng.choice(SIZES)), cell, "checkered"
        ),
        lambda obj: obj.fill == "checkered",
    ),
    Concept(
        "two-tone circle",
        "circle",
        lambda rng, cell: ShapeObject("circle", SUBJECT_COLOR, str(rng.choice(SIZES)), cell, "two-tone"),
        lambda obj: obj.fill == "two-tone" and obj.color == SUBJECT_COLOR,
        editable_color=False,
    ),
)


def training_images(concept: Concept, seed: int) -> list[Image.Image]:
    """N_IMAGES renders of the concept alone, random cell and background."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(N_IMAGES):
        cell = str(rng.choice(POSITIONS))
        scene = Scene((concept.make(rng, cell),), str(rng.choice(BACKGROUNDS)))
        images.append(Image.fromarray(render(scene).image))
    return images


# ----------------------------------------------------------------------------------------------
# Measuring


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Samples the resident set size every 20 ms while the block runs; yields a one-item list with the peak."""
    page = os.sysconf("SC_PAGE_SIZE")
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with open("/proc/self/statm") as statm:
                peak[0] = max(peak[0], int(statm.read().split()[1]) * page)
            done.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def generate(
    ctx: BenchContext, prompts: list[str], installed: Callable[[], AbstractContextManager[None]]
) -> list[Image.Image]:
    """One image per prompt (seed ctx.seed + i), the adapters installed around each job as the worker does."""
    images = []
    for index, prompt in enumerate(prompts):
        params = text_to_image.Params(prompt=prompt, steps=GEN_STEPS, guidance_scale=GUIDANCE)
        with installed():
            output = text_to_image.run(
                ctx.components, params, generator=torch.Generator().manual_seed(ctx.seed + index)
            )
        images += output.images
    return images


def found(concept: Concept, image: Image.Image) -> list[SeenObject]:
    return [obj for obj in read_scene(image).objects if concept.seen(obj)]


@dataclasses.dataclass
class Trained:
    concept: Concept
    adapter: Adapter
    seconds: float
    peak_bytes: int
    size_bytes: int
    images: list[Image.Image]


Trainer = Callable[[Components, Concept, str, list[Image.Image], int], MethodOutput]


def train_all(ctx: BenchContext, trainer: Trainer, tag: str) -> list[Trained]:
    trained = []
    for index, concept in enumerate(CONCEPTS):
        images = training_images(concept, ctx.seed + 100 * index)
        started = time.perf_counter()
        with peak_rss() as peak:
            output = trainer(ctx.components, concept, f"<{tag}{index}>", images, ctx.seed + index)
        assert output.adapter is not None
        seconds = time.perf_counter() - started
        size = len(output.adapter.to_bytes())
        trained.append(Trained(concept, output.adapter, seconds, peak[0], size, images))
    return trained


@contextmanager
def installed_adapters(module: Any, components: Components, adapters: list[Adapter]) -> Iterator[None]:
    """`module.apply` of every adapter (scale 1) for the block, as the worker's `applied` does."""
    with ExitStack() as stack:
        for adapter in adapters:
            stack.enter_context(module.apply(components, adapter, 1.0))
        yield


def apply_fn(module: Any, components: Components, adapters: list[Adapter]) -> Callable[[], Any]:
    """A factory of the context manager that installs `adapters` for one job."""
    return lambda: installed_adapters(module, components, adapters)


def concept_rows(
    ctx: BenchContext, result: GroupResult, method: str, module: Any, trained: list[Trained], with_class: bool
) -> dict[str, Any]:
    """Fidelity and editability over every concept (ctx.n prompts each), size, time, memory; the grid."""
    fidelity: list[bool] = []
    editable: list[bool] = []
    per_concept: dict[str, dict[str, float]] = {}
    grid_images: list[Image.Image] = []
    grid_labels: list[str] = []
    for item in trained:
        token = item.adapter.tokens[0]
        phrase = concept_phrase(token, item.concept.class_word) if with_class else token
        installed = apply_fn(module, ctx.components, [item.adapter])
        plain = generate(ctx, [f"a {phrase}"] * ctx.n, installed)
        hits = [bool(found(item.concept, image)) for image in plain]
        edit_prompt = (
            f"a blue {phrase} at the top left" if item.concept.editable_color else f"a {phrase} at the top left"
        )
        edits = generate(ctx, [edit_prompt] * ctx.n, installed)
        obeyed = []
        for image in edits:
            objects = found(item.concept, image)
            obeyed.append(
                any(
                    obj.position == "top left" and (obj.color == "blue" or not item.concept.editable_color)
                    for obj in objects
                )
            )
        fidelity += hits
        editable += obeyed
        per_concept[item.concept.name] = {"fidelity": percent(hits), "editability": percent(obeyed)}
        shown = min(GRID_SHOWN, ctx.n)
        grid_images += item.images[:2] + plain[:shown] + edits[:shown]
        grid_labels += [f"train {item.concept.name}"] * 2 + [f"a {phrase}"] * shown + [edit_prompt] * shown
    result.grids[f"personalization_{method.replace(' ', '_').lower()}"] = grid(
        grid_images, grid_labels, columns=2 + 2 * min(GRID_SHOWN, ctx.n)
    )
    cases = ctx.n * len(trained)
    seconds = float(np.mean([t.seconds for t in trained]))
    size = float(np.mean([t.size_bytes for t in trained]))
    peak = max(t.peak_bytes for t in trained)
    detail = ", ".join(f"{k} {v['fidelity']:.0f}/{v['editability']:.0f}" for k, v in per_concept.items())
    fid, edit = percent(fidelity), percent(editable)
    result.rows += [
        Row(NAME, f"{method}: fidelity (concept seen in 'a S*')", fid, ">= 80", fid >= 80, cases, None, "%",
            f"per concept fidelity/editability: {detail}"),
        Row(NAME, f"{method}: editability (blue, top left)", edit, ">= 70", edit >= 70, cases, None, "%",
            "the subject: position only (it is two-tone)"),
        Row(NAME, f"{method}: adapter size", size / 1e3, "-", None, len(trained), None, "kB"),
        Row(NAME, f"{method}: training wall time per concept", seconds, "-", None, len(trained), seconds, "s",
            "one torch thread on this CPU, incl. class-image generation"),
        Row(NAME, f"{method}: peak RSS while training", peak / 2**30, "< 4", peak < 4 * 2**30, len(trained), None,
            "GiB", "whole process, model included"),
    ]  # fmt: skip
    return {"fidelity": fid, "editability": edit, "size_kb": size / 1e3, "seconds": seconds,
            "peak_gib": peak / 2**30, "per_concept": per_concept}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The three methods


DB_STEPS, CD_STEPS, PF_STEPS = 80, 80, 100
CLASS_IMAGES = 4  # prior / regularisation images per concept
GEN_STEPS = 20  # DDIM steps of every evaluation image


def dreambooth_trainer(prior: bool) -> Trainer:
    def train(c: Components, concept: Concept, token: str, images: list[Image.Image], seed: int) -> MethodOutput:
        params = dreambooth.Params(
            token=token, class_word=concept.class_word, steps=DB_STEPS, learning_rate=2e-4, prior_preservation=prior,
            num_class_images=CLASS_IMAGES, class_steps=GEN_STEPS, checkpoint_every=0,
        )  # fmt: skip
        return dreambooth.run(c, params, {"images": images}, generator=torch.Generator().manual_seed(seed))

    return train


def cd_trainer(c: Components, concept: Concept, token: str, images: list[Image.Image], seed: int) -> MethodOutput:
    params = custom_diffusion.Params(
        token=token, class_word=concept.class_word, steps=CD_STEPS, learning_rate=2e-3, num_class_images=CLASS_IMAGES,
        class_steps=GEN_STEPS, checkpoint_every=0,
    )  # fmt: skip
    return custom_diffusion.run(c, params, {"images": images}, generator=torch.Generator().manual_seed(seed))


def pf_trainer(c: Components, concept: Concept, token: str, images: list[Image.Image], seed: int) -> MethodOutput:
    params = perfusion.Params(
        token=token, class_word=concept.class_word, steps=PF_STEPS, learning_rate=5e-3, checkpoint_every=0
    )
    return perfusion.run(c, params, {"images": images}, generator=torch.Generator().manual_seed(seed))


def prior_preservation(ctx: BenchContext, trained: list[Trained]) -> tuple[float, list[Image.Image]]:
    """Share of "a <class>" images (adapter installed) the oracle reads as one solid object of that class shape."""
    flags, shown = [], []
    for item in trained:
        word = item.concept.class_word
        installed = apply_fn(dreambooth, ctx.components, [item.adapter]) if item.adapter.tensors else _nothing
        images = generate(ctx, [f"a {word}"] * ctx.n, installed)
        for image in images:
            objects = read_scene(image).objects
            flags.append(len(objects) == 1 and objects[0].shape == word and objects[0].fill == "solid")
        shown += images[:2]
    return percent(flags), shown


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def two_concepts(
    ctx: BenchContext, module: Any, adapters: list[Adapter], phrases: tuple[str, str], pair: tuple[Concept, Concept]
) -> tuple[float, list[Image.Image]]:
    prompt = f"a {phrases[0]} at the left and a {phrases[1]} at the right"
    images = generate(ctx, [prompt] * ctx.n, apply_fn(module, ctx.components, adapters))
    both = [bool(found(pair[0], image)) and bool(found(pair[1], image)) for image in images]
    return percent(both), images


def run(ctx: BenchContext) -> GroupResult:
    torch.set_num_threads(1)
    result = GroupResult()
    summary: dict[str, Any] = {}

    # DreamBooth, with and without the prior-preservation loss
    db = train_all(ctx, dreambooth_trainer(True), "db")
    summary["DreamBooth"] = concept_rows(ctx, result, "DreamBooth", dreambooth, db, with_class=True)
    db_free = train_all(ctx, dreambooth_trainer(False), "dn")
    summary["DreamBooth without prior loss"] = concept_rows(
        ctx, result, "DreamBooth without prior loss", dreambooth, db_free, with_class=True
    )
    base_rate, base_images = prior_preservation(
        ctx, [dataclasses.replace(t, adapter=Adapter("dreambooth", {}, {})) for t in db]
    )
    with_prior, prior_images = prior_preservation(ctx, db)
    without_prior, free_images = prior_preservation(ctx, db_free)
    cases = ctx.n * len(db)
    result.rows += [
        Row(NAME, "DreamBooth: prior preservation ('a <class>' still the class)", with_prior, ">= 90",
            with_prior >= 90, cases, None, "%", f"base model alone {base_rate:.0f}%; without the prior loss "
            f"{without_prior:.0f}%"),
        Row(NAME, "DreamBooth without prior loss: prior preservation", without_prior, "-", None, cases, None, "%",
            "what the prior loss prevents"),
    ]  # fmt: skip
    summary["prior"] = {"base": base_rate, "with_prior": with_prior, "without_prior": without_prior}
    result.grids["personalization_dreambooth_prior"] = grid(
        base_images + prior_images + free_images,
        ["base"] * len(base_images) + ["with prior loss"] * len(prior_images) + ["no prior loss"] * len(free_images),
        columns=len(base_images),
    )

    # Custom Diffusion, and the closed-form merge of star + heart
    cd = train_all(ctx, cd_trainer, "cd")
    summary["Custom Diffusion"] = concept_rows(ctx, result, "Custom Diffusion", custom_diffusion, cd, with_class=True)
    corpus = captions.caption_corpus(ctx.components.domain, 200)
    merged = custom_diffusion.merge(ctx.components, cd[0].adapter, cd[1].adapter, corpus)
    phrases = tuple(concept_phrase(t.adapter.tokens[0], t.concept.class_word) for t in cd[:2])
    cd_both, cd_images = two_concepts(ctx, custom_diffusion, [merged], phrases, (cd[0].concept, cd[1].concept))  # type: ignore[arg-type]

    # Perfusion, and two adapters applied together
    pf = train_all(ctx, pf_trainer, "pf")
    summary["Perfusion"] = concept_rows(ctx, result, "Perfusion", perfusion, pf, with_class=False)
    tokens = (pf[0].adapter.tokens[0], pf[1].adapter.tokens[0])
    pf_both, pf_images = two_concepts(
        ctx, perfusion, [pf[0].adapter, pf[1].adapter], tokens, (pf[0].concept, pf[1].concept)
    )
    pair = f"{cd[0].concept.name} + {cd[1].concept.name}"
    result.rows += [
        Row(NAME, "Custom Diffusion (merged): two concepts in one image", cd_both, ">= 50", cd_both >= 50, ctx.n,
            None, "%", f"{pair}, closed-form merge of the two single-concept adapters"),
        Row(NAME, "Perfusion (two adapters): two concepts in one image", pf_both, ">= 50", pf_both >= 50, ctx.n,
            None, "%", f"{pair}, both gated edits installed"),
    ]  # fmt: skip
    summary["two_concepts"] = {"custom_diffusion": cd_both, "perfusion": pf_both}
    shown = min(8, ctx.n)
    result.grids["personalization_two_concepts"] = grid(
        cd_images[:shown] + pf_images[:shown], ["CD merged"] * shown + ["Perfusion x2"] * shown, columns=shown
    )
    result.extra = {"summary": summary, "steps": {"dreambooth": DB_STEPS, "custom_diffusion": CD_STEPS,
                                                 "perfusion": PF_STEPS}, "train_images": N_IMAGES}  # fmt: skip
    return result
