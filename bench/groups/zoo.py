"""Issue 3's rows: the VAE round trip, text-to-image quality at two guidance scales, speed."""

from __future__ import annotations

import time

import torch
from PIL import Image

from bench.harness import BenchContext, GroupResult, Row, accuracy, generate, grid, scenes
from models.common.latents import decode, encode, images_to_tensor, tensor_to_images
from models.generation import text_to_image
from models.shapes.world import caption, render

NAME = "zoo"


def run(ctx: BenchContext) -> GroupResult:
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
    # Issue 10's targets are at the default guidance; one object also needs every attribute >= 97%.
    cases = {
        "one object": (scenes("test", ctx.n, ctx.seed + 1, 1), 95.0, 97.0),
        "two objects": (scenes("test", ctx.n, ctx.seed + 2, 2), 80.0, None),
        "held-out combinations": (scenes("held_out_combo", ctx.n, ctx.seed + 3, None), 80.0, None),
    }
    for label, (expected, target, attribute_target) in cases.items():
        prompts = [caption(s) for s in expected]
        for guidance in (1.0, text_to_image.Params.guidance_scale):
            images, per = generate(ctx, prompts, guidance)
            acc, attributes = accuracy(expected, images)
            met = acc >= target
            target_text = f">= {target:g}"
            if attribute_target is not None:
                met = met and min(attributes.values()) >= attribute_target
                target_text += f", each attribute >= {attribute_target:g}"
            result.rows.append(
                Row(
                    "zoo",
                    f"text-to-image, {label}, guidance {guidance:g}",
                    acc,
                    target_text,
                    met,
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
        speed_met = per <= 1.0 if batch == 1 else None
        result.rows.append(
            Row(
                "zoo",
                f"speed, batch {batch}",
                per,
                "<= 1 s" if batch == 1 else "-",
                speed_met,
                repeats * batch,
                per,
                "s",
            )
        )
    return result
