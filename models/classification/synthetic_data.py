"""Generated training data for robust classifiers (Gowal et al., "Improving Robustness using Generated Data",
NeurIPS 2021; Wang et al., "Better Diffusion Models Further Improve Adversarial Training", ICML 2023).

The papers sample many images from a generative model, label them with a classifier (not with the
conditioning they were drawn with), and add them to the real training set of an adversarially trained
classifier. This job is the data half: for each class, `count` images from its prompt (DDIM, classifier-free
guidance), written as a zip archive of PNGs with a JSONL labels file; optionally every image is pseudo-labelled
by the Diffusion Classifier over the job's class prompts (`models/classification/diffusion_classifier.py`) and
the agreement rate between prompt and pseudo-label is reported.

Archive `dataset.zip`: `images/00000.png`, ... and `labels.jsonl`, one line per image in order:
{"file", "index", "class_index", "label", "prompt", "seed", and with pseudo-labelling "pseudo_label",
"pseudo_label_index", "pseudo_label_score", "agrees"}. Image i's initial noise is drawn from its own generator
seeded `seed` (recorded), so a text-to-image job with that seed and the same settings redraws it.
Adapters (a personalized concept) need nothing here: every job's `adapters` field makes the worker install them
on the model around `run` (issue 5), so a class prompt can name a textual-inversion token.
Not implemented: the robust training itself (the bench's `models/classification/robust.py` does it).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from models.classification import diffusion_classifier
from models.common.components import Components, MethodOutput, OutputFile, ProgressCallback, no_progress
from models.common.latents import decode, randn, tensor_to_images
from models.common.sampling import ddim_sample
from models.common.text import check_prompt, encode_prompts

ARCHIVE = "dataset.zip"
ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed member dates: the same job gives the same bytes
SEED_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Params:
    """classes: [{"label": str, "prompt": str, "count": int}, ...]."""

    classes: Sequence[Mapping[str, Any]]
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    width: int | None = None  # None: the model's native size (Components.side)
    height: int | None = None
    batch_size: int = 8
    pseudo_label: bool = False
    pseudo_label_samples_per_stage: Sequence[int] = (4, 12)
    pseudo_label_keep_per_stage: Sequence[int] = (2,)


def image_seeds(n: int, generator: torch.Generator) -> list[int]:
    """One seed per image, drawn from the job's generator."""
    return [int(s) for s in torch.randint(0, SEED_LIMIT, (n,), generator=generator)]


def generate(
    components: Components,
    prompt: str,
    seeds: Sequence[int],
    params: Params,
    callback: ProgressCallback = no_progress,
) -> list[Image.Image]:
    """Images of one prompt, image k from noise drawn with Generator().manual_seed(seeds[k]) (as a batch-1
    text-to-image job with that seed), denoised `params.batch_size` at a time. callback(step, steps) per step."""
    factor = components.vae_scale
    shape = (
        1,
        components.unet.config.in_channels,
        components.side(params.height) // factor,
        components.side(params.width) // factor,
    )
    images: list[Image.Image] = []
    for start in range(0, len(seeds), params.batch_size):
        chunk = seeds[start : start + params.batch_size]
        cond = encode_prompts(components.text_encoder, components.tokenizer, [prompt] * len(chunk))
        uncond = encode_prompts(components.text_encoder, components.tokenizer, [params.negative_prompt] * len(chunk))
        scheduler = components.ddim()
        scheduler.set_timesteps(params.steps, device=components.device)
        noise = [
            randn(shape, torch.Generator("cpu").manual_seed(s), components.device, components.dtype) for s in chunk
        ]
        latents = torch.cat(noise) * scheduler.init_noise_sigma
        latents = ddim_sample(
            components.unet, scheduler, latents, scheduler.timesteps, cond, uncond, params.guidance_scale, callback
        )
        images += tensor_to_images(decode(components.vae, latents))
    return images


def archive(images: Sequence[Image.Image], records: Sequence[dict[str, Any]]) -> bytes:
    """A zip of images/00000.png, ... and labels.jsonl (one record per image, in order), byte-deterministic."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive_file:
        for image, record in zip(images, records, strict=True):
            png = io.BytesIO()
            image.save(png, format="PNG")
            archive_file.writestr(zipfile.ZipInfo(record["file"], ZIP_DATE), png.getvalue())
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        archive_file.writestr(zipfile.ZipInfo("labels.jsonl", ZIP_DATE), lines)
    return buffer.getvalue()


def check_classes(components: Components, classes: Sequence[Mapping[str, Any]], pseudo_label: bool) -> None:
    """Raise ValueError naming the first bad class: missing keys, count < 1, a prompt the encoder would cut."""
    if not classes:
        raise ValueError("classes needs at least one class")
    for index, item in enumerate(classes):
        if not isinstance(item.get("label"), str) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"classes[{index}] needs a label and a prompt")
        if not isinstance(item.get("count"), int) or item["count"] < 1:
            raise ValueError(f"classes[{index}].count must be an integer >= 1, got {item.get('count')!r}")
        check_prompt(components.tokenizer, item["prompt"], f"classes[{index}].prompt")
    if pseudo_label:
        prompts = [item["prompt"] for item in classes]
        if len(classes) < 2 or len(set(prompts)) != len(prompts):
            raise ValueError("pseudo_label needs at least 2 classes with distinct prompts")


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, object] | None = None,
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Generate the dataset; `files["dataset.zip"]` holds it, `result` the counts and agreement rates."""
    # 1. Check inputs
    check_classes(components, params.classes, params.pseudo_label)
    factor = components.vae_scale
    for name, value in (("width", components.side(params.width)), ("height", components.side(params.height))):
        if value % factor:
            raise ValueError(f"{name} must be a multiple of {factor}, got {value}")
    if params.steps < 1:
        raise ValueError(f"steps must be at least 1, got {params.steps}")
    if params.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {params.batch_size}")
    check_prompt(components.tokenizer, params.negative_prompt, "negative_prompt")
    labeller = diffusion_classifier.Params(
        prompts=[item["prompt"] for item in params.classes],
        samples_per_stage=params.pseudo_label_samples_per_stage,
        keep_per_stage=params.pseudo_label_keep_per_stage,
    )
    if params.pseudo_label:
        diffusion_classifier.check_schedule(len(params.classes), labeller.samples_per_stage, labeller.keep_per_stage)
    counts = [int(item["count"]) for item in params.classes]
    n_images = sum(counts)
    batches = sum((count + params.batch_size - 1) // params.batch_size for count in counts)
    generation_total = batches * params.steps
    label_total = (
        n_images
        * diffusion_classifier.planned_evaluations(len(counts), labeller.samples_per_stage, labeller.keep_per_stage)
        if params.pseudo_label
        else 0
    )
    total = generation_total + label_total

    # 2. Seeds: one per image, from the job's generator
    seeds = image_seeds(n_images, generator)

    # 3. Generate class by class
    images: list[Image.Image] = []
    records: list[dict[str, Any]] = []
    steps_done = [0]  # denoising steps over all batches so far

    def report(step: int, steps: int) -> None:
        steps_done[0] += 1
        callback(steps_done[0], total)

    for class_index, item in enumerate(params.classes):
        class_seeds = seeds[len(images) : len(images) + counts[class_index]]
        class_images = generate(components, item["prompt"], class_seeds, params, report)
        for seed, image in zip(class_seeds, class_images, strict=True):
            index = len(images)
            images.append(image)
            records.append(
                {
                    "file": f"images/{index:05d}.png",
                    "index": index,
                    "class_index": class_index,
                    "label": item["label"],
                    "prompt": item["prompt"],
                    "seed": seed,
                }
            )

    # 4. Pseudo-labels by the Diffusion Classifier over the class prompts (one shared (t, eps) plan)
    result: dict[str, Any] = {"images": n_images, "archive": ARCHIVE}
    metrics: dict[str, float | int | str] = {"images": n_images, "steps": params.steps}
    per_class = [{"label": item["label"], "prompt": item["prompt"], "count": item["count"]} for item in params.classes]
    if params.pseudo_label:

        def label_report(step: int, steps: int) -> None:
            callback(generation_total + step, total)

        answer = diffusion_classifier.run(
            components, labeller, {"images": images}, generator=generator, callback=label_report
        ).result
        for record, found in zip(records, answer["results"], strict=True):
            best = found["ranking"][0]
            record["pseudo_label_index"] = int(found["predicted_index"])
            record["pseudo_label"] = params.classes[record["pseudo_label_index"]]["label"]
            record["pseudo_label_score"] = round(float(best["score"]), 6)
            record["agrees"] = record["pseudo_label_index"] == record["class_index"]
        agreement = sum(r["agrees"] for r in records) / n_images
        for class_index, summary in enumerate(per_class):
            mine = [r["agrees"] for r in records if r["class_index"] == class_index]
            summary["agreement_rate"] = round(sum(mine) / len(mine), 4)
        result |= {"agreement_rate": round(agreement, 4), "unet_evaluations": answer["unet_evaluations"]}
        metrics |= {"agreement_rate": round(agreement, 4), "unet_evaluations": int(answer["unet_evaluations"])}
    result["classes"] = per_class

    # 5. The archive
    files = {ARCHIVE: OutputFile(archive(images, records), "application/zip")}
    return MethodOutput(files=files, result=result, metrics=metrics)
