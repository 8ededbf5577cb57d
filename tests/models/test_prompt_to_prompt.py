"""prompt-to-prompt on the zoo model: determinism, the paper's invariants, real images, bad inputs.

Figures that depend on the model following the words (colour re-weighting, the layout IoU of a word swap)
are asserted only where the model draws the prompts at all (measured first, the figure in the skip
reason); the invariants of the mechanism hold for any model and are always asserted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bench.groups.prompt_to_prompt import color_strength, mask_iou, monotonic, object_mask, psnr
from models.common.components import Components, MethodOutput
from models.common.latents import decode, encode, images_to_tensor, tensor_to_images
from models.editing import null_text
from models.editing import prompt_to_prompt as p2p
from models.generation import text_to_image
from models.shapes.oracle import match_objects, read_scene, scene_correct
from models.shapes.world import Scene, ShapeObject, parse_caption, render

SOURCE = "a large red circle at the center"
TARGET = "a large blue circle at the center"
STEPS = 10
# The layout claims need a layout that the prompt leaves open: with shape, size and position all named, the zoo
# model draws the same geometry with or without injection, and only the noise is left to keep. Without a position
# the noise places the object, and injection is what keeps it there.
LAYOUT_SOURCE, LAYOUT_TARGET = "a large red circle", "a large blue circle"
LAYOUT_DRAWN = (Scene((ShapeObject("circle", "red", "large", "center"),), "light"), ("shape", "color", "size"))


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def edit(
    components: Components, seed: int = 0, inputs: dict[str, Image.Image] | None = None, **kwargs: Any
) -> MethodOutput:
    values = {"source_prompt": SOURCE, "target_prompt": TARGET, "steps": STEPS, **kwargs}
    return p2p.run(components, p2p.Params(**values), inputs, generator=gen(seed))


def plain(components: Components, prompt: str, seed: int, **kwargs: Any) -> np.ndarray:
    params = text_to_image.Params(prompt=prompt, steps=STEPS, **kwargs)
    return pixels(text_to_image.run(components, params, generator=gen(seed)).images[0])


def test_prompt_to_prompt_is_deterministic(components: Components) -> None:
    first, again, other = edit(components, 1), edit(components, 1), edit(components, 2)
    for a, b in zip(first.images, again.images, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(first.images[1]), pixels(other.images[1]))
    assert len(first.images) == 2 and first.metrics["mode"] == "replace"


@pytest.mark.parametrize(
    "mode, extra", [("replace", {}), ("refine", {}), ("reweight", {"reweight_token": "red", "reweight_factor": 1.0})]
)
def test_identical_prompts_equal_plain_sampling(components: Components, mode: str, extra: dict[str, Any]) -> None:
    """The paper's invariant: with source == target, injecting the source's maps changes nothing, so both
    images are text_to_image's image for the same seed, steps and guidance (up to float rounding: the
    explicit softmax and the batch of 4 against SDPA and a batch of 2 move a few pixels by one level)."""
    out = edit(components, 3, target_prompt=SOURCE, mode=mode, **extra)
    reference = plain(components, SOURCE, 3)
    source, edited = (pixels(image) for image in out.images)
    assert np.array_equal(source, edited)
    assert np.abs(source - reference).max() <= 1 and (source != reference).mean() < 0.01


def test_without_injection_each_branch_is_plain_sampling(components: Components) -> None:
    """tau = 0 and no self-attention injection: the batch layout [uncond_src, uncond_edit, cond_src, cond_edit]
    gives each branch exactly what text_to_image gives for its own prompt (and guidance off: [cond_src, cond_edit])."""
    for guidance in (7.5, 1.0):
        out = edit(components, 4, cross_replace_fraction=0.0, self_replace_fraction=0.0, guidance_scale=guidance)
        for image, prompt in zip(out.images, (SOURCE, TARGET), strict=True):
            reference = plain(components, prompt, 4, guidance_scale=guidance)
            assert np.abs(pixels(image) - reference).max() <= 1


@pytest.fixture(scope="module")
def swaps(components: Components) -> list[tuple[MethodOutput, MethodOutput]]:
    """Word swap red -> blue, position left open, on four seeds: (with injection at the defaults, without any)."""
    prompts = {"source_prompt": LAYOUT_SOURCE, "target_prompt": LAYOUT_TARGET}
    return [
        (
            edit(components, seed, **prompts),
            edit(components, seed, **prompts, cross_replace_fraction=0.0, self_replace_fraction=0.0),
        )
        for seed in range(4)
    ]


def require_drawn_source(components: Components, seeds: range) -> None:
    """The layout claims need a model that draws the source prompt; measure that first and say so if not."""
    expected, attributes = LAYOUT_DRAWN
    drawn = [
        scene_correct(
            expected, read_scene(Image.fromarray(plain(components, LAYOUT_SOURCE, s).astype(np.uint8))), attributes
        )
        for s in seeds
    ]
    if np.mean(drawn) < 0.5:
        pytest.skip(f"the model draws {LAYOUT_SOURCE!r} in {sum(drawn)}/{len(drawn)} cases: no layout to keep")


def test_injection_keeps_the_edit_closer_to_the_source(
    components: Components, swaps: list[tuple[MethodOutput, MethodOutput]]
) -> None:
    """Injecting the source's maps keeps more of the source than sampling the target prompt alone, by
    pixels and by the oracle's object masks (zoo v2, these 4 seeds: mean |source - edit| 9.5 vs 13.0 grey
    levels, IoU 0.78 vs 0.40)."""

    def distance(out: MethodOutput) -> float:
        return float(np.abs(pixels(out.images[0]) - pixels(out.images[1])).mean())

    def iou(out: MethodOutput) -> float:
        return mask_iou(object_mask(out.images[0]), object_mask(out.images[1]))

    require_drawn_source(components, range(4))
    injected, free = zip(*swaps, strict=True)
    assert np.mean([distance(o) for o in injected]) < np.mean([distance(o) for o in free])
    assert np.mean([iou(o) for o in injected]) >= np.mean([iou(o) for o in free])


def test_word_swap_keeps_the_layout(swaps: list[tuple[MethodOutput, MethodOutput]]) -> None:
    """Issue 4: object-mask IoU source vs edit at least 0.7, where the model draws the source scene."""
    expected, attributes = LAYOUT_DRAWN
    drawn = [scene_correct(expected, read_scene(out.images[0]), attributes) for out, _ in swaps]
    if np.mean(drawn) < 0.5:
        pytest.skip(f"the model draws {LAYOUT_SOURCE!r} in {sum(drawn)}/{len(drawn)} cases: no layout to keep")
    ious = [mask_iou(object_mask(out.images[0]), object_mask(out.images[1])) for out, _ in swaps]
    assert np.mean(ious) >= 0.7, ious


@pytest.mark.xfail(
    strict=True,
    reason="known gap, measured on zoo v2 (shapes-sd-tiny, UNet step 18,750): the colour's strength on the object "
    "does not rise with the factor (mean over the 3 cases at x0.5 / x1 / x2 / x4: 120.5 / 61.5 / 91.8 / 71.7; red "
    "alone falls, 146 / 141 / 130 / 123; v1 at step 3000: 98.7 / 96.1 / 88.4 / 70.9); the bench reports the monotonic "
    "share. Strict: passing flags a change.",
)
def test_reweighting_a_colour_word_changes_its_strength_monotonically(components: Components) -> None:
    """Paper, sec. 3.2: scaling a word's attention scales its effect; the colour's chroma on the object
    grows with the factor. Measured where the model follows colour words (the precondition)."""
    cases = [("red", 0), ("blue", 1), ("green", 2)]
    prompts = {color: f"a large {color} circle at the center" for color, _ in cases}
    follows = [
        match_objects(
            parse_caption(prompts[color]),
            read_scene(Image.fromarray(plain(components, prompts[color], seed).astype(np.uint8))),
        )[0]["color"]
        for color, seed in cases
    ]
    if sum(follows) < 2:
        pytest.skip(
            f"the model draws the asked colour in {sum(follows)}/3 plain generations; re-weighting a word it ignores"
        )
    curves = []
    for color, seed in cases:
        images = [
            edit(
                components,
                seed,
                source_prompt=prompts[color],
                target_prompt=prompts[color],
                mode="reweight",
                reweight_token=color,
                reweight_factor=factor,
            ).images[1]
            for factor in (0.5, 1.0, 2.0, 4.0)
        ]
        mask = object_mask(images[1])
        curves.append([color_strength(image, color, mask) for image in images])
    assert monotonic(np.mean(curves, axis=0).tolist()), curves
    assert sum(monotonic(curve) for curve in curves) >= 2, curves


def test_local_blend_returns_a_binary_mask_and_keeps_the_source_outside(components: Components) -> None:
    """Outside the mask the edit's latent is the source's (exactly: see test_attention_control); in pixels the
    VAE decoder's mid-block attention spreads the inside's change, so the check is relative: outside the mask
    the blended edit is closer to the source than the unblended edit (dev model: 4.1 vs 8.0 grey levels)."""
    out = edit(components, 0, local_blend_words=("red", "blue"), local_blend_threshold=0.9)
    mask = np.asarray(out.extra_images["local_blend_mask"])
    assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) <= {0, 255}
    assert 0 < float(out.metrics["local_blend_area"]) < 1
    outside = mask == 0
    free = edit(components, 0)
    blended, unblended = (np.abs(pixels(o.images[0]) - pixels(o.images[1])).mean(axis=-1) for o in (out, free))
    assert blended[outside].mean() < unblended[outside].mean()
    # The source branch is never edited; the two runs differ only in float rounding (explicit softmax in the
    # controlled layers against SDPA), as in test_identical_prompts_equal_plain_sampling.
    source_difference = np.abs(pixels(out.images[0]) - pixels(free.images[0]))
    assert source_difference.max() <= 1 and (source_difference > 0).mean() < 0.01


@pytest.fixture(scope="module")
def render_image() -> tuple[Image.Image, str]:
    prompt = "a large green square at the center"
    return Image.fromarray(render(parse_caption(prompt)).image), prompt


def test_null_text_inversion_reconstructs_a_real_image_under_guidance(
    components: Components, render_image: tuple[Image.Image, str]
) -> None:
    """Mokady et al.: with guidance 7.5 plain DDIM inversion drifts; null-text inversion's source branch
    reproduces the image (to the VAE's round trip) and identical prompts leave the edit equal to it. At 25 steps
    (the authors use 50): zoo v2 measured 46.5 dB against 30.2 for plain DDIM inversion. At 10 steps null-text
    does not help on this model (21-25 dB against 27.5): the guidance-1 inversion it pivots on is itself too coarse."""
    image, prompt = render_image
    steps = 25
    with torch.no_grad():
        round_trip = tensor_to_images(decode(components.vae, encode(components.vae, images_to_tensor([image]))))[0]
    seen: list[tuple[int, int]] = []
    optimised = p2p.run(
        components,
        p2p.Params(source_prompt=prompt, target_prompt=prompt, steps=steps, null_text_steps=10),
        {"image": image},
        generator=gen(0),
        callback=lambda step, total: seen.append((step, total)),
    )
    ddim = edit(
        components, 0, {"image": image}, source_prompt=prompt, target_prompt=prompt, steps=steps, null_text_steps=0
    )
    assert optimised.metrics["inversion"] == "null-text" and ddim.metrics["inversion"] == "ddim"
    assert seen == [(i, 3 * steps) for i in range(1, 3 * steps + 1)]
    faithful, drifting = psnr(optimised.images[0], round_trip), psnr(ddim.images[0], round_trip)
    assert faithful > drifting + 3, (faithful, drifting)
    assert np.array_equal(pixels(optimised.images[0]), pixels(optimised.images[1]))


def test_null_text_learning_rate_stays_positive_for_every_allowed_step_count() -> None:
    """The authors' 1e-2 * (1 - i / 100) for runs of up to 100 steps; positive and decaying at every step of the
    longer runs the API allows (up to 200)."""
    for steps in range(1, 201):
        rates = [null_text.learning_rate(i, steps) for i in range(steps)]
        assert all(0 < rate <= 1e-2 for rate in rates), steps
        assert rates == sorted(rates, reverse=True)
        if steps <= 100:
            assert rates == [1e-2 * (1 - i / 100) for i in range(steps)]


def test_null_text_inversion_runs_200_steps(components: Components, render_image: tuple[Image.Image, str]) -> None:
    """Past step 100 the authors' rate is negative (Adam refuses it): a 200-step inversion must still run."""
    image, prompt = render_image
    params = p2p.Params(source_prompt=prompt, target_prompt=prompt, steps=200, null_text_steps=1)
    start = p2p.inverted_start(components, params, image)
    assert start.inversion == "null-text" and len(start.nulls) == 200
    assert all(torch.isfinite(null).all() for null in start.nulls)


def test_processors_are_restored_after_a_job_and_after_a_cancel(components: Components) -> None:
    before = dict(components.unet.attn_processors)
    edit(components, 0, local_blend_words=("blue",))

    def cancel(step: int, total: int) -> None:
        if step == 3:
            raise RuntimeError("canceled")

    with pytest.raises(RuntimeError, match="canceled"):
        p2p.run(
            components,
            p2p.Params(source_prompt=SOURCE, target_prompt=TARGET, steps=STEPS),
            generator=gen(0),
            callback=cancel,
        )
    assert all(components.unet.attn_processors[name] is proc for name, proc in before.items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "reweight", "reweight_token": "purple"}, "reweight_token 'purple' is not a word of target_prompt"),
        ({"mode": "reweight"}, "mode 'reweight' needs a reweight_token"),
        (
            {"target_prompt": "a large blue circle at the top left"},
            r"equal token counts, got 9 \(source_prompt\) and 10",
        ),
        ({"target_prompt": "a large zzyzx circle at the center"}, "mode 'replace' needs prompts of equal token counts"),
        ({"mode": "swap"}, "mode must be one of"),
        ({"cross_replace_fraction": 1.5}, r"cross_replace_fraction must be in \[0, 1\], got 1.5"),
        ({"local_blend_words": ("square",)}, "local_blend_words: 'square' is a word of neither prompt"),
        ({"width": 62}, "width must be a multiple of 4, got 62"),
        ({"target_prompt": "circle " * 40}, "target_prompt is .* tokens"),
    ],
)
def test_bad_inputs_name_the_value(components: Components, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        edit(components, **kwargs)


def test_refine_adds_a_word_with_the_source_layout(components: Components) -> None:
    """Refinement accepts prompts of different lengths and, with identical shared words, keeps the source's
    objects where they were better than plain sampling of the longer prompt does (object-mask IoU over four seeds;
    pixels would mostly measure the new background)."""
    longer = f"{LAYOUT_SOURCE} on a dark background"
    assert dataclasses.asdict(p2p.Params(source_prompt="a", target_prompt="b"))["mode"] == "replace"
    prompts = {"source_prompt": LAYOUT_SOURCE, "target_prompt": longer, "mode": "refine"}
    runs = [
        (
            edit(components, seed, **prompts),
            edit(components, seed, **prompts, cross_replace_fraction=0.0, self_replace_fraction=0.0),
        )
        for seed in range(5, 9)
    ]
    for out, free in runs:
        # The source branch is never edited; the two runs differ only in float rounding (explicit softmax in the
        # controlled layers against SDPA), as in test_identical_prompts_equal_plain_sampling.
        source_difference = np.abs(pixels(out.images[0]) - pixels(free.images[0]))
        assert source_difference.max() <= 1 and (source_difference > 0).mean() < 0.01

    def iou(o: MethodOutput) -> float:
        return mask_iou(object_mask(o.images[0]), object_mask(o.images[1]))

    require_drawn_source(components, range(5, 9))
    kept, free_kept = np.mean([iou(out) for out, _ in runs]), np.mean([iou(free) for _, free in runs])
    assert kept > free_kept, (kept, free_kept)
