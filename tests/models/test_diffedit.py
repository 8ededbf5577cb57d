"""diffedit on the zoo model and the mask helpers: determinism, binary masks, the input kept outside the mask."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.common.components import Components
from models.common.inversion import ddim_invert
from models.common.latents import decode, encode, images_to_tensor, tensor_to_images
from models.common.masks import binarize, dilate, from_image, rescale, to_image, to_latent, to_pixels
from models.common.text import encode_prompts
from models.editing import diffedit
from models.shapes.world import Scene, ShapeObject, caption, render

SCENE = Scene((ShapeObject("circle", "red", "large", "center"), ShapeObject("square", "blue", "small", "top left")))
REFERENCE = caption(SCENE)  # "a large red circle at the center and a small blue square at the top left"
QUERY = REFERENCE.replace("red circle", "green circle")

# Outside the mask the final latent IS the input's latent (step 3 replaces it after every step), so the
# output differs from the VAE round trip D(E(x)) only through the decoder: its convolutions reach a few
# pixels across the mask's border and its mid-block self-attention reaches everywhere. Measured on the
# zoo VAE: a mean of <= 1.7 grey levels outside the mask grown by one latent cell; bound 4 of 255.
MAX_OUTSIDE_MEAN_DIFFERENCE = 4.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(render(SCENE).image)


@pytest.fixture(scope="module")
def round_trip(components: Components, image: Image.Image) -> np.ndarray:
    """D(E(x)) of the test image, (64, 64, 3) int16."""
    with torch.no_grad():
        return pixels(tensor_to_images(decode(components.vae, encode(components.vae, images_to_tensor([image]))))[0])


def edit(components: Components, image: Image.Image, seed: int = 0, **kwargs: object):  # type: ignore[no-untyped-def]
    values = {"query_prompt": QUERY, "reference_prompt": REFERENCE, "steps": 10, "n_mask_samples": 4, **kwargs}
    return diffedit.run(components, diffedit.Params(**values), {"image": image}, generator=gen(seed))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# The pure mask helpers


def test_rescale_binarize_dilate() -> None:
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 100.0]]).reshape(1, 1, 2, 4)
    scaled = rescale(values)
    assert float(scaled.min()) == 0.0 and float(scaled.max()) == 1.0
    clipped = rescale(values, clip_quantile=0.8)  # the outlier 100 no longer squashes the rest
    assert float(clipped[0, 0, 1, 2]) > 0.9 and float(clipped[0, 0, 1, 3]) == 1.0
    assert torch.equal(rescale(torch.full((1, 1, 3, 3), 7.0)), torch.zeros(1, 1, 3, 3))
    mask = binarize(clipped, 0.5)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    point = torch.zeros(1, 1, 7, 7)
    point[0, 0, 3, 3] = 1
    assert int(dilate(point, 2).sum()) == 25 and torch.equal(dilate(point, 0), point)
    with pytest.raises(ValueError, match="cells must be >= 0, got -1"):
        dilate(point, -1)


def test_mask_grids_and_images() -> None:
    pixel_mask = torch.zeros(1, 1, 16, 16)
    pixel_mask[0, 0, 5:6, 5:6] = 1  # one pixel
    assert int(to_latent(pixel_mask, 4).sum()) == 1  # any coverage marks the cell
    assert int(to_latent(pixel_mask, 4, coverage=0.5).sum()) == 0
    latent = to_latent(pixel_mask, 4)
    assert torch.equal(to_latent(to_pixels(latent, (16, 16)), 4), latent)
    image = to_image(latent, (16, 16))
    assert image.mode == "L" and image.size == (16, 16) and set(np.unique(np.asarray(image))) == {0, 255}
    assert torch.equal(from_image(image), to_pixels(latent, (16, 16)))
    with pytest.raises(ValueError, match="mask size must be a multiple of 4, got 15x16"):
        to_latent(torch.zeros(1, 1, 16, 15), 4)


# ------------------------------------------------------------------------------------------------
# The method


def test_diffedit_is_deterministic(components: Components, image: Image.Image) -> None:
    first, again = edit(components, image, 5), edit(components, image, 5)
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert np.array_equal(pixels(first.extra_images["mask"]), pixels(again.extra_images["mask"]))
    assert first.metrics == again.metrics


def test_diffedit_mask_is_binary_at_image_resolution(components: Components, image: Image.Image) -> None:
    out = edit(components, image)
    mask = np.asarray(out.extra_images["mask"])
    assert out.extra_images["mask"].size == image.size == out.images[0].size
    assert set(np.unique(mask)) <= {0, 255}
    # The rescaled map reaches 1, so at a threshold <= 1 at least one latent cell is in the mask.
    assert 0 < out.metrics["mask_fraction"] == pytest.approx((mask == 255).mean(), abs=1e-4)
    factor = components.vae_scale  # the mask is the latent grid, so constant on each factor x factor cell
    cells = mask.reshape(mask.shape[0] // factor, factor, mask.shape[1] // factor, factor)
    assert (cells.min(axis=(1, 3)) == cells.max(axis=(1, 3))).all()


def test_diffedit_keeps_the_input_outside_the_mask(
    components: Components, image: Image.Image, round_trip: np.ndarray
) -> None:
    """Couairon et al. step 3: outside the mask the output is the DDIM-encoded input decoded again, i.e. the
    input's own latent; the pixels there differ from the VAE round trip only through the decoder."""
    out = edit(components, image, mask_threshold=0.9)
    mask = from_image(out.extra_images["mask"])
    grown = dilate(mask, components.vae_scale)[0, 0].numpy() > 0  # one latent cell more
    assert (~grown).mean() > 0.2, out.metrics  # the check below is about something
    difference = np.abs(pixels(out.images[0]) - round_trip).mean(axis=-1)
    assert difference[~grown].mean() <= MAX_OUTSIDE_MEAN_DIFFERENCE, difference[~grown].mean()


def test_masked_decoding_restores_the_original_latent_outside(components: Components, image: Image.Image) -> None:
    """Step 3 with a hand-made mask: after the last step the latent outside the mask equals x_0 exactly."""
    with torch.no_grad():
        clean = encode(components.vae, images_to_tensor([image]))
        reference, query, uncond = (
            encode_prompts(components.text_encoder, components.tokenizer, [p]) for p in (REFERENCE, QUERY, "")
        )
        inverse = components.ddim_inverse()
        inverse.set_timesteps(10)
        trajectory = ddim_invert(components.unet, inverse, clean, reference, n_steps=6)
        mask = torch.zeros(1, 1, *clean.shape[2:])
        mask[..., 4:12, 4:12] = 1
        latents = diffedit.masked_decode(components, trajectory, clean, mask, query, uncond, 10, 7.5)
    assert torch.equal(latents * (1 - mask), clean * (1 - mask))
    assert not torch.equal(latents * mask, clean * mask)


def test_diffedit_with_query_equal_to_reference_changes_nothing(
    components: Components, image: Image.Image, round_trip: np.ndarray
) -> None:
    """Q == R: the noise predictions agree everywhere, the mask is empty and the output is D(E(x)) exactly."""
    out = edit(components, image, query_prompt=REFERENCE)
    assert out.metrics["mask_fraction"] == 0
    assert np.array_equal(pixels(out.images[0]), round_trip)


def test_diffedit_progress_covers_the_three_steps(components: Components, image: Image.Image) -> None:
    seen: list[tuple[int, int]] = []
    params = diffedit.Params(query_prompt=QUERY, reference_prompt="", steps=10, n_mask_samples=3, encoding_ratio=0.4)
    diffedit.run(components, params, {"image": image}, generator=gen(0), callback=lambda s, t: seen.append((s, t)))
    assert seen == [(i, 3 + 2 * 4) for i in range(1, 12)]
    assert diffedit.encoding_steps(10, 1.0) == 10 and diffedit.encoding_steps(10, 0.01) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoding_ratio": 0.0}, r"encoding_ratio must be in \(0, 1\], got 0.0"),
        ({"encoding_ratio": 1.5}, r"encoding_ratio must be in \(0, 1\], got 1.5"),
        ({"mask_threshold": 0.0}, r"mask_threshold must be in \(0, 1\], got 0.0"),
        ({"n_mask_samples": 0}, "n_mask_samples must be at least 1, got 0"),
        ({"mask_dilation": -1}, "mask_dilation must be >= 0, got -1"),
        ({"steps": 0}, r"steps must be in \[1, 1000\], got 0"),
        ({"guidance_scale": 0.0}, "guidance_scale must be >= 1, got 0.0"),
        ({"query_prompt": "circle " * 100}, "query_prompt is .* tokens"),
        ({"reference_prompt": "circle " * 100}, "reference_prompt is .* tokens"),
    ],
)
def test_diffedit_rejects_bad_input(
    components: Components, image: Image.Image, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        edit(components, image, **kwargs)


def test_diffedit_rejects_bad_image_size(components: Components, image: Image.Image) -> None:
    factor = components.vae_scale
    with pytest.raises(ValueError, match=f"image size must be a multiple of {factor}, got 64x{64 + factor // 2}"):
        edit(components, image.resize((64, 64 + factor // 2)))
