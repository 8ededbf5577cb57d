"""Attention control through diffusers attention processors (Hertz et al., Prompt-to-Prompt, ICLR 2023).

Cross-attention maps M = softmax(Q K^T / sqrt(d)) (paper, eq. 1) decide which pixels each text token
shapes. Prompt-to-Prompt edits an image by injecting the maps of a source generation into an edited
generation that runs beside it. Everything here reads or changes those maps *only* through attention
processors: `controlled_attention(unet, controller)` installs a `ControlledAttnProcessor` on every
attention module for the duration of a job and restores the model's own processors in a `finally`.
A module's `forward` is never replaced.

Batch layout. A controlled UNet call runs the source and the edited branch in one batch, so the edited
branch reads the source's maps at the same layer and the same step:

    with guidance:    [uncond_source, uncond_edit, cond_source, cond_edit]   (B = 4)
    without guidance: [cond_source, cond_edit]                               (B = 2)

This is exactly what `models.common.sampling.guided_noise` builds from latents (2, C, h, w) =
[source, edit], cond (2, L, D) and uncond (2, L, D). Edits touch only the last two rows, the conditional
pair, as in the paper's code; the unconditional rows keep their own maps.

What is here:
- the processor and the context manager;
- `cross_attention_layers` (the attn2 modules, which read the text) and `installed` (some processors replaced for
  a block, e.g. Custom Diffusion's and Perfusion's on the attn2 layers);
- `AttentionStore`: records cross-attention maps (head-averaged) per layer, for local blend and analysis;
- pure edits of one branch's maps (heads, Q, T): `replace_maps` (word swap, paper sec. 3.2),
  `refine_maps` (added words: aligned source maps, new tokens keep their own), `reweight_maps`
  (scale a token's column);
- token helpers: where a word's tokens sit in a prompt, and the source-target token alignment;
- `EditController`: applies one cross-attention edit for the first `cross_steps` steps and injects the
  source's self-attention maps for the first `self_steps` steps (paper, sec. 3.2 and appendix).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from transformers import CLIPTokenizer

SELF_ATTENTION_MAX_POSITIONS = 16**2
"""Self-attention maps are injected only in layers with at most this many query positions (the paper's
code: 16x16, i.e. SD 1.5's coarser layers at 64x64 latents; every layer of the 16x16-latent zoo model)."""

CrossEdit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(source maps, edit maps) -> new edit maps; each (heads, Q, T)."""


class AttentionController(Protocol):
    """What a `ControlledAttnProcessor` consults on every attention call."""

    def needs_maps(self, layer: str, is_cross: bool, positions: int) -> bool:
        """Whether this call needs the explicit maps (otherwise the original processor runs)."""
        ...

    def __call__(self, probs: torch.Tensor, layer: str, is_cross: bool) -> torch.Tensor:
        """probs: (B, heads, Q, K) attention maps; returns the maps to use, same shape."""
        ...


@dataclass(frozen=True)
class AttentionInput:
    """What the opening steps of diffusers' AttnProcessor2_0 give: the normalised (B, Q, C) hidden states, the
    residual, the mask shaped (B, heads, Q, K), and the input's 4-D shape to restore (None for 3-D input)."""

    hidden_states: torch.Tensor
    residual: torch.Tensor
    attention_mask: torch.Tensor | None
    spatial_shape: tuple[int, int, int, int] | None


def attention_input(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> AttentionInput:
    """AttnProcessor2_0's steps before Q, K, V: spatial norm, (B, C, H, W) -> (B, HW, C), mask, group norm."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial_shape = None
    if hidden_states.ndim == 4:
        batch, channel, height, width = hidden_states.shape
        spatial_shape = (batch, channel, height, width)
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, sequence_length, _ = context.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return AttentionInput(hidden_states, residual, attention_mask, spatial_shape)


def split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    batch = tensor.shape[0]
    return tensor.view(batch, -1, heads, tensor.shape[-1] // heads).transpose(1, 2)


def attention_output(attn: Any, hidden_states: torch.Tensor, prepared: AttentionInput) -> torch.Tensor:
    """AttnProcessor2_0's steps after the attention: (B, Q, heads * d) through to_out, back to the input's shape,
    plus the residual, over the output rescale factor."""
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if prepared.spatial_shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*prepared.spatial_shape)
    if attn.residual_connection:
        hidden_states = hidden_states + prepared.residual
    return hidden_states / attn.rescale_output_factor


class ControlledAttnProcessor:
    """The stock scaled-dot-product attention (AttnProcessor2_0) with the softmax computed explicitly, so a
    controller can read and replace the maps. Where the controller needs no maps, the module's original
    processor runs unchanged (SDPA, xformers), so results and memory match the uncontrolled model."""

    def __init__(self, controller: AttentionController, layer: str, original: Any) -> None:
        self.controller = controller
        self.layer = layer
        self.original = original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """hidden_states: (B, Q, C) or (B, C, H, W); encoder_hidden_states: (B, T, D) for cross-attention."""
        is_cross = encoder_hidden_states is not None
        positions = (
            hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        )
        if not self.controller.needs_maps(self.layer, is_cross, positions):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        # The steps of diffusers' AttnProcessor2_0, with F.scaled_dot_product_attention written out.
        prepared = attention_input(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query = attn.to_q(prepared.hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = prepared.hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = split_heads(query, attn.heads)  # (B, heads, Q, d)
        key = split_heads(attn.to_k(encoder_hidden_states), attn.heads)  # (B, heads, K, d)
        value = split_heads(attn.to_v(encoder_hidden_states), attn.heads)  # (B, heads, K, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Paper, eq. 1: M = softmax(Q K^T / sqrt(d)); the controller may replace M before M V.
        upcast = attn.upcast_attention or attn.upcast_softmax
        scores = (query.float() if upcast else query) @ (key.float() if upcast else key).transpose(-1, -2)
        scores = scores * attn.scale
        if prepared.attention_mask is not None:
            scores = scores + prepared.attention_mask
        probs = scores.softmax(dim=-1).to(value.dtype)  # (B, heads, Q, K)
        probs = self.controller(probs, self.layer, is_cross)
        hidden_states = (probs @ value).transpose(1, 2).flatten(2)  # (B, Q, heads * d)
        return attention_output(attn, hidden_states, prepared)


@contextmanager
def controlled_attention(unet: UNet2DConditionModel, controller: AttentionController) -> Iterator[None]:
    """Install a `ControlledAttnProcessor` on every attention module of `unet` for the block; the original
    processor objects are put back afterwards, also when the block raises (a cancel, a bad input)."""
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: ControlledAttnProcessor(controller, name, proc) for name, proc in original.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """Processor name ("...attn2.processor") -> the cross-attention module, for every layer that reads the text."""
    layers = {}
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if isinstance(module, Attention) and module.is_cross_attention:
            layers[name] = module
    return layers


@contextmanager
def installed(unet: UNet2DConditionModel, processors: dict[str, Any]) -> Iterator[None]:
    """Replace the named attention processors for the block; the original objects come back in a finally."""
    original = dict(unet.attn_processors)
    unknown = set(processors) - set(original)
    if unknown:
        raise ValueError(f"attention layers not in this model: {sorted(unknown)[:3]}")
    unet.set_attn_processor({**original, **processors})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


# ----------------------------------------------------------------------------------------------
# Recording maps


@dataclass
class AttentionStore:
    """Cross-attention maps of chosen batch rows, averaged over heads.

    `current[layer]`: (R, Q, T) from the latest call of that layer (cleared by `begin_step`);
    `totals[layer]` / `counts[layer]`: the sum over every recorded call, for the average over steps.
    """

    rows: slice = field(default_factory=lambda: slice(None))
    current: dict[str, torch.Tensor] = field(default_factory=dict)
    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def needs_maps(self, layer: str, is_cross: bool, positions: int) -> bool:
        return is_cross

    def __call__(self, probs: torch.Tensor, layer: str, is_cross: bool) -> torch.Tensor:
        if is_cross:
            self.record(layer, probs)
        return probs

    def record(self, layer: str, probs: torch.Tensor) -> None:
        """probs: (B, heads, Q, T); keeps rows `self.rows`, averaged over heads."""
        maps = probs[self.rows].detach().float().mean(dim=1)
        self.current[layer] = maps
        self.totals[layer] = self.totals[layer] + maps if layer in self.totals else maps.clone()
        self.counts[layer] = self.counts.get(layer, 0) + 1

    def begin_step(self) -> None:
        self.current = {}

    def step_maps(self, height: int, width: int) -> torch.Tensor:
        """This step's maps, every layer resized to (height, width) and averaged: (R, T, height, width)."""
        if not self.current:
            raise ValueError("no cross-attention maps were recorded in this step")
        return maps_on_grid(list(self.current.values()), height, width)

    def average_maps(self, height: int, width: int) -> torch.Tensor:
        """Maps averaged over every recorded step and layer: (R, T, height, width)."""
        if not self.totals:
            raise ValueError("no cross-attention maps were recorded")
        return maps_on_grid([self.totals[k] / self.counts[k] for k in self.totals], height, width)


def maps_on_grid(maps: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Maps (R, Q, T) of layers at several resolutions -> their mean on one grid: (R, T, height, width).

    A layer's Q positions are the latent grid downsampled by a power of two (the UNet's levels), so
    Q = ceil(height / s) * ceil(width / s) for its level s."""
    resized = []
    for layer_maps in maps:
        rows, positions, tokens = layer_maps.shape
        layer_h, layer_w = _level_shape(height, width, positions)
        grid = layer_maps.transpose(1, 2).reshape(rows, tokens, layer_h, layer_w)
        resized.append(F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False))
    return torch.stack(resized).mean(dim=0)


def _level_shape(height: int, width: int, positions: int) -> tuple[int, int]:
    scale = 1
    while scale <= max(height, width):
        shape = (-(-height // scale), -(-width // scale))
        if shape[0] * shape[1] == positions:
            return shape
        scale *= 2
    raise ValueError(f"{positions} attention positions are no downsampling of a {height}x{width} latent")


# ----------------------------------------------------------------------------------------------
# Edits of one branch's cross-attention maps: each takes and returns (heads, Q, T)


def replace_maps(source: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
    """Word swap (paper, sec. 3.2): the edited branch uses the source's maps M_t for every token.
    The prompts have the same number of tokens, so token i of one is token i of the other."""
    return source


def refine_maps(source: torch.Tensor, edit: torch.Tensor, mapper: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Adding a phrase (paper, sec. 3.2): (M_t^*)_{i,j} = (M_t)_{i,A(j)} where target token j has a source
    token A(j), and the edit's own map otherwise. mapper: (T,) long, A; alphas: (T,) 1 where aligned, else 0."""
    return source[..., mapper] * alphas + edit * (1 - alphas)


def reweight_maps(maps: torch.Tensor, equalizer: torch.Tensor) -> torch.Tensor:
    """Attention re-weighting (paper, sec. 3.2): scale token j's column by c_j, without renormalising.
    equalizer: (T,), 1 for tokens left alone."""
    return maps * equalizer


# ----------------------------------------------------------------------------------------------
# Tokens


def word_token_positions(tokenizer: CLIPTokenizer, prompt: str, word: str) -> list[int]:
    """Positions in the encoded prompt (start token at 0) of the tokens of every occurrence of `word`
    (a whitespace-separated word of the prompt, compared case-insensitively, trailing punctuation
    ignored). Empty if the word does not occur."""
    positions: list[int] = []
    cursor = 1
    wanted = word.strip().lower().strip(".,;:!?")
    for piece in prompt.split():
        n_tokens = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if piece.lower().strip(".,;:!?") == wanted:
            positions += range(cursor, cursor + n_tokens)
        cursor += n_tokens
    return positions


def token_alignment(tokenizer: CLIPTokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Align target tokens to source tokens (the paper's refinement mapper): a global alignment
    (Needleman-Wunsch, match 1, mismatch -1, gap 0) of the two token sequences with start and end tokens.

    Returns mapper (L,) long and alphas (L,) float over the padded length L = model_max_length: for
    target token j, mapper[j] is its source token and alphas[j] is 1, or alphas[j] is 0 for a new token.
    Padding after the end token is aligned from the end token on, so both sequences' padding match.
    """
    length = tokenizer.model_max_length
    src = tokenizer(source, truncation=True, max_length=length)["input_ids"]
    tgt = tokenizer(target, truncation=True, max_length=length)["input_ids"]
    # Needleman-Wunsch score table; a diagonal move is allowed only on equal tokens ("shared tokens").
    score = [[0] * (len(tgt) + 1) for _ in range(len(src) + 1)]
    for i in range(1, len(src) + 1):
        for j in range(1, len(tgt) + 1):
            diagonal = score[i - 1][j - 1] + (1 if src[i - 1] == tgt[j - 1] else -1)
            score[i][j] = max(score[i - 1][j], score[i][j - 1], diagonal)
    mapper = torch.zeros(length, dtype=torch.long)
    alphas = torch.zeros(length)
    i, j = len(src), len(tgt)
    while i > 0 and j > 0:
        if src[i - 1] == tgt[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            mapper[j - 1], alphas[j - 1] = i - 1, 1.0
            i, j = i - 1, j - 1
        elif score[i][j] == score[i][j - 1]:
            j -= 1  # target token j-1 is new
        else:
            i -= 1  # source token i-1 was dropped
    for offset in range(length - len(tgt)):
        mapper[len(tgt) + offset] = min(len(src) + offset, length - 1)
        alphas[len(tgt) + offset] = 1.0
    return mapper, alphas


# ----------------------------------------------------------------------------------------------
# The Prompt-to-Prompt controller


@dataclass
class EditController:
    """Injects the source branch's maps into the edited branch (paper, sec. 3.2, Algorithm 1).

    Per step `step` (set by the sampling loop before each UNet call), on the conditional pair (the last
    two batch rows, [cond_source, cond_edit]):
    - cross-attention, while step < cross_steps: edit maps <- `cross_edit(source maps, edit maps)`;
    - self-attention, while step < self_steps, in layers with at most `self_max_positions` queries:
      edit maps <- source maps (keeps the source's geometry, the paper's appendix);
    - `store`, if given, records the pair's cross-attention maps before the edit (for local blend).
    """

    cross_edit: CrossEdit
    cross_steps: int
    self_steps: int
    self_max_positions: int = SELF_ATTENTION_MAX_POSITIONS
    store: AttentionStore | None = None
    step: int = 0

    def needs_maps(self, layer: str, is_cross: bool, positions: int) -> bool:
        if is_cross:
            return self.step < self.cross_steps or self.store is not None
        return self.step < self.self_steps and positions <= self.self_max_positions

    def __call__(self, probs: torch.Tensor, layer: str, is_cross: bool) -> torch.Tensor:
        """probs: (B, heads, Q, K) with B = 2 or 4; rows -2, -1 are [cond_source, cond_edit]."""
        if is_cross and self.store is not None:
            self.store.record(layer, probs)
        source, edit = probs[-2], probs[-1]
        if is_cross and self.step < self.cross_steps:
            edited = self.cross_edit(source, edit)
        elif not is_cross and self.step < self.self_steps and probs.shape[2] <= self.self_max_positions:
            edited = source
        else:
            return probs
        return torch.cat([probs[:-1], edited[None].to(probs.dtype)])
