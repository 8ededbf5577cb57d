"""Region edit: SDEdit inside a mask, with spatially sparse inference (Meng et al., SDEdit, ICLR 2022;
Li et al., "Efficient Spatially Sparse Inference for Conditional GANs and Diffusion Models" -- SIGE,
NeurIPS 2022).

The input is noised to t0 = strength * T and denoised towards the prompt, as in SDEdit, but only
inside the mask: before every UNet step the latent outside the (dilated) mask is set to the original's
latent noised to that step's level, q(z_t | z_0) with the job's one noise draw (SIGE's inpainting loop;
also Blended Latent Diffusion), and at the end the output is composited in pixel space, so every pixel
outside the dilated mask is exactly the input's.

With `sparse` (the default), each step first runs the UNet densely on the original's noised latent and
records its activations, then runs it on the edited latent recomputing only the tiles the mask touches
(`models/common/sparse.py`). Outside the mask the two latents are equal by construction, which is the
premise of SIGE. `sparse=False` runs the same loop with the plain dense UNet: the reference the sparse
result approximates.

The recorded activations do not depend on the mask, so they are reused across jobs, as SIGE pre-computes
them once per original image: given `inputs["activation_cache"]` (a `CacheHandle`; the worker passes its
process-wide cache to every job), a sparse job looks up its recording under `activation_key` (weights, image
pixels, prompts, guidance, steps, strength, noise -- not the mask). On a hit it skips every record pass, the
image's VAE encoding and the prompts' encoding, and replays the stored activations (the sparse pass writes into
them and puts back what it overwrote, `SparseEngine.replay` / `restore`), with a result bit-identical to recording
them again; on a miss it records as above and stores what it recorded when it ends, if the recording fits the
budget. A follow-up edit of the same image with another mask, by the same worker process, is then only the sparse
pass (docs/sparse-cache.md).

The block side (`tile`, of the convolutions' work; attention and feed-forward recompute the active cells only)
trades speed for closeness to the dense result: smaller blocks recompute fewer cells but each gathers its halo again,
and CPU convolutions on small blocks run poorly. A UNet sparse pass at a 10% mask (one CPU thread) costs, with blocks
of 4 / 2 / 1: 0.23 / 0.22 / 0.23 of a dense pass on the zoo model at 64x64 latents, 0.45 / 0.62 / 0.85 on an SD
1.5-shaped UNet at 32x32 latents; on a single UNet call of an SD-like UNet the error inside the mask is 0.07-0.09 of
the edit's own effect with blocks of 4, 0.11-0.15 with 2, 0.23-0.28 with 1 (`tests/models/test_sparse.py`). 4 is
the default.

Implemented: the mask is white = edit (luminance > 127), a latent cell is edited when any of its pixels
is, dilated by `dilation` cells; DDIM, classifier-free guidance; SDXL's conditioning (`models/common/conditioning.py`)
in the record and the edit passes; with `sparse=False`, the controls of
`models/control/` (`inputs["controls"]`, `["t2i_adapters"]`, `["grounding"]`) steer the edit pass.
`metrics` report the edit passes and the record passes separately (`unet_record_seconds`, 0 on a hit), the
cache's answer (`activation_cache`: hit, miss, or off for a dense job, no cache or a budget of 0) and the
recording's size (`activation_bytes`, over all steps: what the job's cache entry takes) and whether the cache holds it
when the job ends (`activation_held`: the worker then routes follow-up edits of the image to itself,
store/recordings.py).
A sparse job decodes only the region's bounding box grown by `DECODE_MARGIN` latent cells (`decode_box`; SIGE
decodes sparsely too); a cache hit skips the encoding. Not implemented: sharing recordings between worker
processes (the cache lives in one process and a restart empties it). Controls with `sparse`: the recorded
activations would have to include the control residuals of both latents; refused for now.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.common.activation_cache import CacheHandle, cache_key, tensor_bytes
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.conditioning import TextConditioning, encode_guided
from models.common.latents import decode, encode, images_to_tensor, randn, tensor_to_images
from models.common.sampling import combined, guided_noise, start_timesteps
from models.common.sparse import Recording, SparseEngine, sparse_inference
from models.common.text import check_prompt
from models.control.inputs import ControlInputs, control_inputs


@dataclass(frozen=True)
class Params:
    prompt: str
    strength: float = 0.75
    steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    sparse: bool = True
    dilation: int = 1  # latent cells added around the mask: the edited region
    tile: int = 4  # SIGE block side, in feature-map cells (see below)
    sparse_margin: int = 1  # cells added around the region at every UNet resolution before tiling (SIGE)


def latent_mask(mask: Image.Image, factor: int, dilation: int) -> torch.Tensor:
    """Mask image (W, H) -> (H/f, W/f) bool: a latent cell is edited when any of its f x f pixels is
    white (luminance > 127), then grown by `dilation` cells (a square structuring element)."""
    pixels = torch.from_numpy(np.asarray(mask.convert("L")) > 127)
    cells = F.max_pool2d(pixels[None, None].float(), factor)
    if dilation:
        cells = F.max_pool2d(cells, 2 * dilation + 1, stride=1, padding=dilation)
    return cells[0, 0] > 0


DECODE_MARGIN = 8
"""Latent cells of context decoded around the region's bounding box by a sparse job."""


def decode_box(
    vae: Any, latents: torch.Tensor, region: torch.Tensor, factor: int, original: np.ndarray
) -> np.ndarray | None:
    """The region's pixels decoded from its bounding box grown by `DECODE_MARGIN` latent cells, placed in a copy
    of `original` (H, W, 3) uint8 (only the region's pixels are kept from it); None when the box is the whole
    latent. The VAE decoder's convolutions see the box only (its mid-block attention too): SIGE decodes sparsely
    as well; the margin keeps the region's pixels close to a full decode (docs/sparse-cache.md: measured)."""
    ys, xs = region.nonzero(as_tuple=True)
    height, width = region.shape
    top, bottom = max(int(ys.min()) - DECODE_MARGIN, 0), min(int(ys.max()) + 1 + DECODE_MARGIN, height)
    left, right = max(int(xs.min()) - DECODE_MARGIN, 0), min(int(xs.max()) + 1 + DECODE_MARGIN, width)
    if (bottom - top) * (right - left) == height * width:
        return None
    pixels = np.asarray(tensor_to_images(decode(vae, latents[:, :, top:bottom, left:right]))[0])
    out = original.copy()
    out[top * factor : bottom * factor, left * factor : right * factor] = pixels
    return out


RECORD_VERSION = 1
"""Part of every activation-cache key: bump it when what the record pass computes from the key's other parts
changes (the loop, the noise, the text encoding), so no recording made by other code is ever replayed."""


def activation_key(
    components: Components, params: Params, image: Image.Image, noise: torch.Tensor, weights: str
) -> str:
    """The activation-cache key of a sparse job: everything its record passes depend on, and nothing else.

    The original's latent at each step, q(z_t | z_0) = add_noise(clean, noise, t), and the UNet's activations on
    it (classifier-free guidance batch) depend on the weights (`weights`: base model and installed adapters, as
    the worker names them; device, dtype and torch's CPU threads, which can change the bits), the scheduler, the
    image's pixels, the prompt, negative prompt and guidance scale, steps and strength (the timesteps), and the
    noise (the seed). Not on the mask, the dilation, the tile or the margin: the record pass is dense and its
    kept outputs are the full layers' outputs. `noise`: the job's one draw, hashed as float32 bytes.
    """
    pixels = image.convert("RGB")
    return cache_key(
        "region-edit",
        RECORD_VERSION,
        weights,
        str(components.device),
        str(components.dtype),
        torch.get_num_threads(),
        json.dumps(components.scheduler_config, sort_keys=True, default=str),
        pixels.width,
        pixels.height,
        pixels.tobytes(),
        params.prompt,
        params.negative_prompt,
        float(params.guidance_scale),
        params.steps,
        float(params.strength),
        noise.detach().float().cpu().numpy().tobytes(),
    )


@dataclass
class _Reuse:
    """A job's use of the activation cache. An entry is `(clean, text, recordings)`: the original's latent (its VAE
    encoding, which the key's pixels and weights determine), the prompts' conditioning (which the key's prompts and
    weights determine) and one recording per step. `stored`: on a hit, the recordings that replace the record
    passes, and `clean` and `text` what replace the encodings; `collected`: on a miss, what each record pass kept
    (shared, restored after each sparse pass), stored with `clean` and `text` when the job ends, dropped as soon as
    the whole recording is seen not to fit the budget. `nbytes`: the entry's size (SDXL's pooled embeddings, inside
    `text.added`, a few kilobytes, are not counted); `other_bytes`: the latent's and the text's."""

    status: Literal["hit", "miss", "off"]
    steps: int
    handle: CacheHandle | None = None
    key: str = ""
    stored: list[Recording] | None = None
    collected: list[Recording] | None = None
    nbytes: int = 0
    clean: torch.Tensor | None = None
    text: TextConditioning | None = None
    other_bytes: int = 0

    @classmethod
    def start(
        cls, components: Components, params: Params, inputs: dict[str, Any], noise: torch.Tensor, steps: int
    ) -> _Reuse:
        """Look the job up: "off" for a dense job, without `inputs["activation_cache"]` or with a budget of 0."""
        handle: CacheHandle | None = inputs.get("activation_cache")
        if not params.sparse or handle is None or not handle.cache.enabled:
            return cls("off", steps)
        key = activation_key(components, params, inputs["image"], noise, handle.weights)
        entry = handle.cache.get(key)
        if entry is not None:
            clean, text, stored = entry
            return cls("hit", steps, stored=stored, nbytes=tensor_bytes(entry), clean=clean, text=text)
        return cls("miss", steps, handle, key, collected=[], other_bytes=tensor_bytes(noise))

    def conditioning(self, encode_text: Callable[[], TextConditioning]) -> TextConditioning:
        """The prompts' conditioning: a hit's stored one, else `encode_text()` (kept for the entry on a miss)."""
        if self.text is None:
            self.text = encode_text()
            self.other_bytes += tensor_bytes(self.text)
        return self.text

    def recorded(self, engine: SparseEngine) -> None:
        """After a record pass (before its sparse pass): count its bytes; on a miss, keep what it kept."""
        step_bytes = tensor_bytes([cache.entries for cache in engine.caches])
        self.nbytes += step_bytes
        if self.collected is not None and self.handle is not None:
            # every step records the same shapes; the latent has the noise's shape and dtype
            if self.handle.cache.fits(step_bytes * self.steps + self.other_bytes):
                self.collected.append(engine.share_record())
            else:
                self.collected = None

    def finish(self, clean: torch.Tensor) -> bool:
        """After the last step: store what a miss collected (the job ran to the end) with the original's latent and
        the prompts' conditioning. A sparse job that recorded counts both in `nbytes` too: the size of its cache
        entry. Returns whether the cache holds the job's recording now (a hit, or a miss that was stored)."""
        if self.status != "hit" and self.nbytes:
            self.nbytes += tensor_bytes(clean) + tensor_bytes(self.text)
        if self.collected is not None and self.handle is not None:
            return self.handle.cache.put(self.key, (clean, self.text, self.collected))
        return self.status == "hit"


def check_inputs(components: Components, params: Params, inputs: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad value."""
    if not 0.0 < params.strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {params.strength}")
    if params.steps < 1:
        raise ValueError(f"steps must be at least 1, got {params.steps}")
    if params.dilation < 0:
        raise ValueError(f"dilation must be at least 0, got {params.dilation}")
    if params.tile < 1:
        raise ValueError(f"tile must be at least 1, got {params.tile}")
    if params.sparse_margin < 0:
        raise ValueError(f"sparse_margin must be at least 0, got {params.sparse_margin}")
    for name in ("image", "mask"):
        if name not in inputs:
            raise ValueError(f"{name} is required")
    image, mask = inputs["image"], inputs["mask"]
    factor = components.vae_scale
    width, height = image.size
    if width % factor or height % factor:
        raise ValueError(f"image size must be a multiple of {factor}, got {width}x{height}")
    if mask.size != image.size:
        raise ValueError(f"mask size must equal the image size {width}x{height}, got {mask.size[0]}x{mask.size[1]}")
    if not (np.asarray(mask.convert("L")) > 127).any():
        raise ValueError("mask has no white pixels: nothing to edit (white marks the region to edit)")
    if params.sparse and any(inputs.get(name) for name in ("controls", "t2i_adapters", "grounding")):
        raise ValueError("controls and grounding need sparse=false (the sparse pass cannot take them yet)")
    check_prompt(components.tokenizer, params.prompt)
    check_prompt(components.tokenizer, params.negative_prompt, "negative_prompt")


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, Any],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Edit `inputs["image"]` inside `inputs["mask"]` (white = edit) towards `params.prompt`.

    Returns the edited image (the input's size) and, as `region`, the dilated mask actually edited.
    """
    # 1. Check inputs
    check_inputs(components, params, inputs)
    with control_inputs(components, inputs, *inputs["image"].size) as control:
        return _edit(components, params, inputs, generator, callback, control)


def _edit(
    components: Components,
    params: Params,
    inputs: dict[str, Any],
    generator: torch.Generator,
    callback: ProgressCallback,
    control: ControlInputs,
) -> MethodOutput:
    """Steps 2-6 of `run`, inside its control context."""
    image = inputs["image"]
    factor = components.vae_scale

    # 2. The job's one noise draw; the cache lookup; the prompt and the image (unless the cache kept them)
    width, height = image.size
    shape = (1, int(components.vae.config.latent_channels), height // factor, width // factor)
    noise = randn(shape, generator, components.device, components.dtype)
    scheduler = components.ddim()
    scheduler.set_timesteps(params.steps, device=components.device)
    timesteps = start_timesteps(scheduler.timesteps, params.strength)
    reuse = _Reuse.start(components, params, inputs, noise, len(timesteps))
    cond, uncond, added = reuse.conditioning(
        lambda: encode_guided(components, [params.prompt], [params.negative_prompt], height, width)
    )
    clean = reuse.clean if reuse.clean is not None else encode(components.vae, images_to_tensor([image]))

    # 3. The edited region: latent cells (h, w), and the same region in pixels (H, W)
    region = latent_mask(inputs["mask"], factor, params.dilation).to(components.device)
    inside = region[None, None]  # broadcasts over (1, 4, h, w)
    region_pixels = region.repeat_interleave(factor, 0).repeat_interleave(factor, 1)

    # 4. Perturb to t0 (SDEdit eq. 2); the same noise gives the original's latent at every level
    latents = scheduler.add_noise(clean, noise, timesteps[:1])

    # 5. Denoise inside the region; outside it the latent is the original's at each level
    edit_seconds = record_seconds = 0.0
    sparse = sparse_inference(components.unet, region, params.tile, params.sparse_margin)  # entered only if asked
    with sparse if params.sparse else nullcontext() as engine:
        for index, timestep in enumerate(timesteps):
            reference = scheduler.add_noise(clean, noise, timestep[None])  # q(z_t | z_0)
            latents = torch.where(inside, latents, reference)
            if engine is not None and reuse.stored is not None:  # a cache hit: the original's activations, kept
                engine.replay(reuse.stored[index])
            elif engine is not None:  # SIGE: the original's activations, then the sparse pass
                started = time.perf_counter()
                engine.set_mode("record")
                reference_input = scheduler.scale_model_input(reference, timestep)
                guided_noise(components.unet, reference_input, timestep, cond, uncond, params.guidance_scale, added)
                record_seconds += time.perf_counter() - started
                reuse.recorded(engine)
                engine.set_mode("sparse")
            started = time.perf_counter()
            model_input = scheduler.scale_model_input(latents, timestep)
            extras = None
            if control:
                control.step(index, len(timesteps))
                extras = partial(control.extras, index, len(timesteps), added=added)
            try:
                eps = guided_noise(
                    components.unet, model_input, timestep, cond, uncond, params.guidance_scale, combined(added, extras)
                )
            finally:  # a shared recording (a hit's, or a miss's being kept) gets back what the sparse pass overwrote
                if engine is not None:
                    engine.restore()
            edit_seconds += time.perf_counter() - started
            latents = scheduler.step(eps, timestep, latents).prev_sample
            callback(index + 1, len(timesteps))
        active_fraction = engine.region(*region.shape).fraction if engine is not None else 1.0
    held = reuse.finish(clean)
    latents = torch.where(inside, latents, clean)

    # 6. Decode (a sparse job: only the region's box with a margin), then composite in pixel space: outside the
    #    region the output is the input, bit for bit
    original = np.asarray(image.convert("RGB"))
    decoded = decode_box(components.vae, latents, region, factor, original) if params.sparse else None
    if decoded is None:
        decoded = np.asarray(tensor_to_images(decode(components.vae, latents))[0])
    keep = ~region_pixels.cpu().numpy()
    output = Image.fromarray(np.where(keep[:, :, None], original, decoded))
    edited = Image.fromarray((~keep).astype(np.uint8) * 255)
    return MethodOutput(
        images=[output],
        extra_images={"region": edited},
        metrics={
            "denoising_steps": len(timesteps),
            "strength": params.strength,
            "sparse": int(params.sparse),
            "region_fraction": round(float(region.float().mean()), 4),
            "active_fraction": round(active_fraction, 4),
            "unet_seconds": round(edit_seconds, 4),
            "unet_record_seconds": round(record_seconds, 4),
            "activation_cache": reuse.status,
            "activation_bytes": reuse.nbytes,
            "activation_held": int(held),
        },
    )
