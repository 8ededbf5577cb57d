"""region-edit on the zoo model: the outside is untouched, determinism, sparse close to dense, cleanup, bad input."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from models.common.components import Components, MethodOutput
from models.editing import region_edit
from models.shapes.world import render, sample_scene


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def case(seed: int = 0) -> tuple[Image.Image, Image.Image, str]:
    """A test scene, the mask of its first object (white = edit), a prompt asking for a blue circle there."""
    scene = sample_scene(np.random.default_rng(seed), split="test")
    rendered = render(scene)
    mask = Image.fromarray(rendered.masks[0].astype(np.uint8) * 255)
    return Image.fromarray(rendered.image), mask, f"a large blue circle at the {scene.objects[0].position}"


def edit(components: Components, seed: int = 0, image_seed: int = 0, **kwargs: object) -> MethodOutput:
    image, mask, prompt = case(image_seed)
    params = region_edit.Params(**{"prompt": prompt, "strength": 0.8, "steps": 10, **kwargs})  # type: ignore[arg-type]
    return region_edit.run(components, params, {"image": image, "mask": mask}, generator=gen(seed))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_latent_mask_marks_every_touched_cell_then_dilates() -> None:
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[5, 9] = 200  # one white pixel: the latent cell (1, 2) at factor 4
    mask[0, 0] = 127  # not white
    cells = region_edit.latent_mask(Image.fromarray(mask), factor=4, dilation=0)
    assert cells.nonzero().tolist() == [[1, 2]]
    grown = region_edit.latent_mask(Image.fromarray(mask), factor=4, dilation=1)
    assert grown.nonzero().tolist() == [[y, x] for y in range(3) for x in range(1, 4)]


@pytest.mark.parametrize("sparse", [True, False])
def test_outside_the_dilated_mask_is_exactly_the_input(components: Components, sparse: bool) -> None:
    """The paper-level invariant of a region edit: only the (dilated) mask changes, bit for bit."""
    image, mask, _ = case()
    out = edit(components, sparse=sparse)
    region = np.asarray(out.extra_images["region"]) > 0
    user = np.asarray(mask) > 127
    assert region[user].all() and region.mean() < 0.5  # the region covers the mask, grown a little
    assert np.array_equal(pixels(out.images[0])[~region], pixels(image)[~region])
    assert np.abs(pixels(out.images[0])[region] - pixels(image)[region]).mean() > 5  # and inside it, it edited


def test_region_edit_is_deterministic(components: Components) -> None:
    first, second, other = (pixels(edit(components, seed).images[0]) for seed in (1, 1, 2))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


@pytest.mark.xfail(
    strict=True,
    reason="known gap, measured on zoo v2 (shapes-sd-tiny, UNet step 18,750): mean |sparse - dense| inside the "
    "region over the edit's own change there is 16% / 82% / 42% / 50% for image seeds 0-3 (bound 15%; v1 at step "
    "3000: 2% / 49% / 1% / 17%). Sparse steps reuse the original's GroupNorm statistics and cached activations "
    "(SIGE's approximation), which this model's larger, prompt-following edits stretch.",
)
def test_sparse_result_matches_the_dense_masked_edit(components: Components) -> None:
    """SIGE's claim: recomputing only the touched tiles gives (nearly) the dense result. Measured on these
    four cases: mean |sparse - dense| inside the region 0.1-0.5 of 255 (1-2% of the edit's own change
    there), max 3; over 16 bench cases at 25 steps the max was 25. On shapes-sd-tiny at UNet step 2000 single
    pixels reach 44 (a sparse step's small error can flip an edge pixel), so the bound is the mean one: 15% of the
    edit's own change inside the region; the bench reports the max."""
    for image_seed in range(4):
        image, _, _ = case(image_seed)
        dense = pixels(edit(components, image_seed=image_seed, sparse=False).images[0])
        sparse_out = edit(components, image_seed=image_seed, sparse=True)
        region = np.asarray(sparse_out.extra_images["region"]) > 0
        difference = np.abs(pixels(sparse_out.images[0]) - dense)
        change = np.abs(dense - pixels(image))[region].mean()
        assert difference[region].mean() < 0.15 * change, (image_seed, difference[region].mean(), change)
        assert float(sparse_out.metrics["active_fraction"]) < 1.0


def snapshot(components: Components) -> tuple[list[tuple[str, type]], dict[str, object], int]:
    unet = components.unet
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    return [(name, type(m)) for name, m in unet.named_modules()], dict(unet.attn_processors), hooks


def test_the_cached_model_is_unchanged_after_a_job_and_after_a_cancel(components: Components) -> None:
    before = snapshot(components)
    weights = {k: v.clone() for k, v in components.unet.state_dict().items()}
    edit(components)
    assert snapshot(components) == before

    def cancel(step: int, total: int) -> None:
        if step == 2:
            raise InterruptedError("canceled")

    image, mask, prompt = case()
    with pytest.raises(InterruptedError):
        region_edit.run(
            components,
            region_edit.Params(prompt=prompt),
            {"image": image, "mask": mask},
            generator=gen(0),
            callback=cancel,
        )
    assert snapshot(components) == before
    assert all(torch.equal(weights[k], v) for k, v in components.unet.state_dict().items())


def test_progress_counts_the_denoising_steps(components: Components) -> None:
    seen: list[tuple[int, int]] = []
    image, mask, prompt = case()
    params = region_edit.Params(prompt=prompt, strength=0.5, steps=10)
    inputs = {"image": image, "mask": mask}
    region_edit.run(components, params, inputs, generator=gen(0), callback=lambda s, t: seen.append((s, t)))
    assert seen == [(i, 5) for i in range(1, 6)]


def bad(
    image: Image.Image, mask: Image.Image | None, prompt: str = "a blue circle", **kwargs: object
) -> Callable[[Components], object]:
    def go(components: Components) -> object:
        inputs = {"image": image} if mask is None else {"image": image, "mask": mask}
        params = region_edit.Params(**{"prompt": prompt, "steps": 4, **kwargs})  # type: ignore[arg-type]
        return region_edit.run(components, params, inputs, generator=gen(0))

    return go


IMAGE, MASK, _ = case()
BAD_INPUTS = {
    "mask size": (bad(IMAGE, MASK.resize((32, 32))), r"mask size must equal the image size 64x64, got 32x32"),
    "empty mask": (bad(IMAGE, Image.new("L", (64, 64), 0)), r"mask has no white pixels"),
    "no mask": (bad(IMAGE, None), r"mask is required"),
    "strength": (bad(IMAGE, MASK, strength=1.5), r"strength must be in \(0, 1\], got 1.5"),
    "steps": (bad(IMAGE, MASK, steps=0), r"steps must be at least 1, got 0"),
    "image size": (bad(IMAGE.resize((62, 64)), MASK.resize((62, 64))), r"image size must be a multiple of 4"),
    "prompt": (bad(IMAGE, MASK, prompt="circle " * 100), r"prompt is \d+ tokens"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_a_clear_error(components: Components, name: str) -> None:
    run_it, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        run_it(components)


def test_a_sparse_job_decodes_the_regions_box_close_to_a_full_decode(components: Components) -> None:
    """The sparse path decodes only the region's bounding box grown by DECODE_MARGIN latent cells: the region's
    pixels stay within a few levels of a full decode of the same latents (measured on the zoo VAE at 256 px, 10%
    squares: mean 0.7-1.4 of 255), everything else is the input; a box as large as the latent decodes in full."""
    rng = np.random.default_rng(3)
    image = Image.fromarray(render(sample_scene(rng, split="test"), 256).image)
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[96:176, 40:120] = 255
    factor = components.vae_scale
    region = region_edit.latent_mask(Image.fromarray(mask), factor, 1)
    original = pixels(image)
    with torch.no_grad():
        latents = region_edit.encode(components.vae, region_edit.images_to_tensor([image]))
        full = pixels(region_edit.tensor_to_images(region_edit.decode(components.vae, latents))[0])
        boxed = region_edit.decode_box(components.vae, latents, region, factor, original)
        assert boxed is not None
        inside = region.repeat_interleave(factor, 0).repeat_interleave(factor, 1).numpy()
        ys, xs = region.nonzero(as_tuple=True)
        margin = region_edit.DECODE_MARGIN
        box = np.zeros_like(inside)
        box[
            max(int(ys.min()) - margin, 0) * factor : (int(ys.max()) + 1 + margin) * factor,
            max(int(xs.min()) - margin, 0) * factor : (int(xs.max()) + 1 + margin) * factor,
        ] = True
        assert np.array_equal(boxed[~box], original[~box])
        difference = np.abs(boxed.astype(int) - full.astype(int))[inside]
        assert difference.mean() < 2.0, difference.mean()
        everywhere = torch.ones_like(region)
        assert region_edit.decode_box(components.vae, latents, everywhere, factor, original) is None
