"""Prompt-to-Prompt image editing with cross-attention control (Hertz et al., ICLR 2023).

A source prompt and a target prompt are sampled together from the same noise; the edited branch
receives the source branch's attention maps, so the layout stays and only what the words change moves:
- "replace" (word swap, sec. 3.2): for the first tau = `cross_replace_fraction` of the steps the edited
  branch uses the source's cross-attention maps (the prompts must have as many tokens);
- "refine" (adding a phrase): target tokens shared with the source (a global alignment of the token
  sequences) take the source's maps, new tokens keep their own;
- "reweight" (attention re-weighting): the refine maps with the column of `reweight_token` scaled by
  `reweight_factor` (usually with source_prompt == target_prompt). A `reweight_token` given in the other
  modes is applied on top of them, as the paper's code chains controllers.
Self-attention maps of the source are injected for the first `self_replace_fraction` of the steps.
Local blend (appendix): after each step, outside the region where `local_blend_words` attend (maps
thresholded at `local_blend_threshold`, union over both branches) the edit's latent is reset to the source's.

Real images (`inputs["image"]`) are DDIM-inverted with the source prompt (Song et al.); with guidance,
null-text inversion (Mokady et al., `models/editing/null_text.py`, `null_text_steps` > 0) makes the
source branch reconstruct the image. Both branches then share the per-step null-text embeddings.

Differences from the paper's code: local blend averages every cross-attention layer (resized to the
latent grid) rather than SD's 16x16 layers only; the blend starts at step 0.2 * steps as in the null-text
notebook. Not implemented: per-word tau, word swaps between words of different token counts.
Outputs: images [source, edited]; with local blend, the last step's mask as `local_blend_mask`.
`run` = `generated_start` or `inverted_start`, then `sample_pair`; one inversion can serve several edits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from PIL import Image

from models.common.attention import (
    AttentionStore,
    CrossEdit,
    EditController,
    controlled_attention,
    refine_maps,
    replace_maps,
    reweight_maps,
    token_alignment,
    word_token_positions,
)
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.inversion import ddim_invert
from models.common.latents import decode, encode, images_to_tensor, randn, tensor_to_images
from models.common.sampling import guided_noise
from models.common.text import check_prompt, count_tokens, encode_prompts
from models.editing.null_text import null_text_inversion

MODES = ("replace", "refine", "reweight")
LOCAL_BLEND_START = 0.2  # fraction of the steps before local blend starts (null-text notebook)
LOCAL_BLEND_DILATION = 1  # max-pool radius on the latent grid (the paper's k = 1)


@dataclass(frozen=True)
class Params:
    source_prompt: str
    target_prompt: str
    mode: str = "replace"
    cross_replace_fraction: float = 0.8
    self_replace_fraction: float = 0.4
    reweight_token: str | None = None
    reweight_factor: float = 1.0
    local_blend_words: Sequence[str] = ()
    local_blend_threshold: float = 0.3
    steps: int = 25
    guidance_scale: float = 7.5
    width: int | None = None  # None: the model's native size (Components.side)
    height: int | None = None
    null_text_steps: int = 10


def cross_edit_for(components: Components, params: Params) -> CrossEdit:
    """The cross-attention edit of `params.mode` (a small dict of factories), with the re-weighting on top."""
    tokenizer = components.tokenizer
    device = components.device

    def refinement() -> CrossEdit:
        mapper, alphas = token_alignment(tokenizer, params.source_prompt, params.target_prompt)
        return partial(refine_maps, mapper=mapper.to(device), alphas=alphas.to(device, components.dtype))

    factories = {"replace": lambda: replace_maps, "refine": refinement, "reweight": refinement}
    edit: CrossEdit = factories[params.mode]()
    if params.reweight_token is None:
        return edit
    equalizer = torch.ones(tokenizer.model_max_length, device=device, dtype=components.dtype)
    equalizer[word_token_positions(tokenizer, params.target_prompt, params.reweight_token)] = params.reweight_factor
    return lambda source, edited: reweight_maps(edit(source, edited), equalizer)


def blend_weights(components: Components, params: Params) -> torch.Tensor:
    """(2, T): 1 at the tokens of `local_blend_words` in the source (row 0) and target (row 1) prompt."""
    weights = torch.zeros(2, components.tokenizer.model_max_length)
    for row, prompt in enumerate((params.source_prompt, params.target_prompt)):
        for word in params.local_blend_words:
            weights[row, word_token_positions(components.tokenizer, prompt, word)] = 1.0
    return weights


def local_blend(
    latents: torch.Tensor, maps: torch.Tensor, weights: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local blend (paper, appendix): keep the source outside where the blend words attend.

    latents: (2, C, h, w) [source, edit]; maps: (2, T, h, w) this step's cross-attention maps of the
    conditional pair; weights: (2, T). Returns the blended latents and the mask (1, 1, h, w) in {0, 1}.
    """
    attended = (maps * weights[:, :, None, None].to(maps)).sum(dim=1, keepdim=True)  # (2, 1, h, w)
    size = 2 * LOCAL_BLEND_DILATION + 1
    attended = F.max_pool2d(attended, size, stride=1, padding=LOCAL_BLEND_DILATION)
    attended = attended / attended.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    inside = (attended > threshold).any(dim=0, keepdim=True)  # (1, 1, h, w), union of both branches
    edit = torch.where(inside, latents[1:], latents[:1])  # x_edit = x_src + mask * (x_edit - x_src)
    return torch.cat([latents[:1], edit]), inside.to(latents.dtype)


def check_params(components: Components, params: Params) -> None:
    """Raise ValueError naming the first bad value."""
    tokenizer = components.tokenizer
    if params.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {params.mode!r}")
    for name in ("cross_replace_fraction", "self_replace_fraction"):
        value = getattr(params, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0.0 < params.local_blend_threshold < 1.0:
        raise ValueError(f"local_blend_threshold must be in (0, 1), got {params.local_blend_threshold}")
    if params.steps < 1:
        raise ValueError(f"steps must be at least 1, got {params.steps}")
    if params.null_text_steps < 0:
        raise ValueError(f"null_text_steps must be at least 0, got {params.null_text_steps}")
    check_prompt(tokenizer, params.source_prompt, "source_prompt")
    check_prompt(tokenizer, params.target_prompt, "target_prompt")
    if params.mode == "replace":
        n_source, n_target = (
            count_tokens(tokenizer, params.source_prompt),
            count_tokens(tokenizer, params.target_prompt),
        )
        if n_source != n_target:
            raise ValueError(
                f"mode 'replace' needs prompts of equal token counts, got {n_source} (source_prompt) and "
                f"{n_target} (target_prompt); use mode 'refine' to add or remove words"
            )
    if params.mode == "reweight" and params.reweight_token is None:
        raise ValueError("mode 'reweight' needs a reweight_token")
    if params.reweight_token is not None:
        if not word_token_positions(tokenizer, params.target_prompt, params.reweight_token):
            raise ValueError(f"reweight_token {params.reweight_token!r} is not a word of target_prompt")
    for word in params.local_blend_words:
        if not (
            word_token_positions(tokenizer, params.source_prompt, word)
            or word_token_positions(tokenizer, params.target_prompt, word)
        ):
            raise ValueError(f"local_blend_words: {word!r} is a word of neither prompt")


@dataclass(frozen=True)
class Start:
    """Where both branches start: z_T (1, C, h, w) and the unconditional embedding of each step (1, L, D)
    (the empty prompt's, or the null-text inversion's). `inversion`: "none", "ddim" or "null-text"."""

    latents: torch.Tensor
    nulls: list[torch.Tensor]
    inversion: str = "none"


def uses_null_text(params: Params) -> bool:
    """Null-text optimisation only matters under guidance (with w = 1 DDIM inversion is already faithful)."""
    return params.null_text_steps > 0 and params.guidance_scale != 1.0


def generated_start(components: Components, params: Params, generator: torch.Generator) -> Start:
    """One noise draw for both branches, exactly as `text_to_image` draws it for one image."""
    factor = components.vae_scale
    shape = (
        1,
        components.unet.config.in_channels,
        components.side(params.height) // factor,
        components.side(params.width) // factor,
    )
    uncond = encode_prompts(components.text_encoder, components.tokenizer, [""])  # (1, L, D)
    noise = randn(shape, generator, components.device, components.dtype) * components.ddim().init_noise_sigma
    return Start(noise, [uncond] * params.steps)


def inverted_start(
    components: Components, params: Params, image: Image.Image, callback: ProgressCallback = no_progress
) -> Start:
    """A real image -> its DDIM inversion with the source prompt (guidance 1), then null-text optimisation
    (`uses_null_text`). Depends only on the image, source prompt, steps, guidance and null_text_steps, so
    several edits of one image can share it. `callback` counts up to 2 * steps (steps without null-text)."""
    steps = params.steps
    clean = encode(components.vae, images_to_tensor([image]))  # (1, C, h, w)
    cond = encode_prompts(components.text_encoder, components.tokenizer, [params.source_prompt])
    uncond = encode_prompts(components.text_encoder, components.tokenizer, [""])
    inverse = components.ddim_inverse()
    inverse.set_timesteps(steps, device=components.device)
    with torch.no_grad():
        trajectory = ddim_invert(components.unet, inverse, clean, cond, callback=callback)
    if not uses_null_text(params):
        return Start(trajectory[-1], [uncond] * steps, "ddim")
    scheduler = components.ddim()
    scheduler.set_timesteps(steps, device=components.device)
    nulls = null_text_inversion(
        components.unet,
        scheduler,
        trajectory,
        clean,
        cond,
        uncond,
        params.guidance_scale,
        params.null_text_steps,
        lambda step, _: callback(steps + step, 2 * steps),
    )
    return Start(trajectory[-1], nulls, "null-text")


def sample_pair(
    components: Components, params: Params, start: Start, callback: ProgressCallback = no_progress
) -> MethodOutput:
    """Denoise [source, edit] from `start` in one batch under attention control, and decode.

    Call under `torch.no_grad()` (`run` does). Returns images [source, edited]; with local blend, the last
    step's mask as the extra image `local_blend_mask`."""
    steps = params.steps
    tokenizer, text_encoder = components.tokenizer, components.text_encoder
    cond = encode_prompts(text_encoder, tokenizer, [params.source_prompt, params.target_prompt])  # (2, L, D)
    scheduler = components.ddim()
    scheduler.set_timesteps(steps, device=components.device)
    latents = start.latents.expand(2, -1, -1, -1).clone()  # (2, C, h, w): [source, edit]

    blending = bool(params.local_blend_words)
    store = AttentionStore(rows=slice(-2, None)) if blending else None
    controller = EditController(
        cross_edit=cross_edit_for(components, params),
        cross_steps=int(params.cross_replace_fraction * steps),  # the paper's int(tau * T)
        self_steps=int(params.self_replace_fraction * steps),
        store=store,
    )
    weights = blend_weights(components, params)
    blend_from = math.ceil(LOCAL_BLEND_START * steps)
    mask = None
    with controlled_attention(components.unet, controller):
        for index, timestep in enumerate(scheduler.timesteps):
            controller.step = index
            if store is not None:
                store.begin_step()
            model_input = scheduler.scale_model_input(latents, timestep)
            # Batch [uncond_source, uncond_edit, cond_source, cond_edit] (see models/common/attention.py)
            uncond = start.nulls[index].expand(2, -1, -1)
            noise = guided_noise(components.unet, model_input, timestep, cond, uncond, params.guidance_scale)
            latents = scheduler.step(noise, timestep, latents).prev_sample
            if store is not None and index >= blend_from:
                maps = store.step_maps(latents.shape[2], latents.shape[3])  # (2, T, h, w)
                latents, mask = local_blend(latents, maps, weights, params.local_blend_threshold)
            callback(index + 1, steps)

    images = tensor_to_images(decode(components.vae, latents))
    metrics: dict[str, float | int | str] = {
        "mode": params.mode,
        "steps": steps,
        "cross_replace_steps": controller.cross_steps,
        "self_replace_steps": controller.self_steps,
        "inversion": start.inversion,
    }
    extra = {}
    if mask is not None:
        height, width = images[0].height, images[0].width
        pixels = F.interpolate(mask, size=(height, width), mode="nearest")[0, 0]
        extra["local_blend_mask"] = Image.fromarray((pixels * 255).to(torch.uint8).cpu().numpy())
        metrics["local_blend_area"] = round(float(mask.mean()), 4)
    return MethodOutput(images=images, extra_images=extra, metrics=metrics)


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, Image.Image] | None = None,
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Generate (or, with `inputs["image"]`, invert) the source and edit it: images [source, edited]."""
    # 1. Check inputs
    image = (inputs or {}).get("image")
    factor = components.vae_scale
    width, height = image.size if image is not None else (components.side(params.width), components.side(params.height))
    for name, value in (("width", width), ("height", height)):
        if value % factor:
            raise ValueError(f"{name} must be a multiple of {factor}, got {value}")
    check_params(components, params)
    inverting = image is not None
    before = params.steps * (inverting + (inverting and uses_null_text(params)))  # inversion's share of progress
    total = before + params.steps

    # 2. Starting latent: a seeded draw, or the inverted image (DDIM, then null-text optimisation)
    if image is None:
        start = generated_start(components, params, generator)
    else:
        start = inverted_start(components, params, image, lambda step, _: callback(step, total))

    # 3. Denoise source and edit together under attention control, then decode
    return sample_pair(components, params, start, lambda step, _: callback(before + step, total))
