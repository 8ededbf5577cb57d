"""Spatially sparse UNet inference for edits (Li et al., "Efficient Spatially Sparse Inference for
Conditional GANs and Diffusion Models" -- SIGE, NeurIPS 2022).

An edit changes a small region of an image, so most of a UNet's activations for the edited input are
those of the original. SIGE runs the original once densely ("full" mode), keeps its activations, and
for the edited input recomputes each layer only on the blocks (tiles) of the feature map that the edit
touches ("sparse" mode): gather the active tiles, each with the layer's receptive-field halo, into a
batch, run the layer on the batch, scatter the results into the cached output (SIGE Sec. 3.1, Fig. 3).
Cost then follows the edited area, not the image area.

Installed on a diffusers `UNet2DConditionModel` for one job by `sparse_inference(...)`, which swaps
wrappers in and restores the model in a `finally`; inference only (the sparse pass writes in place,
so run it under `torch.no_grad()`). The engine's `mode` says which pass runs:

- `record`: the dense pass on the original's input; every wrapped layer keeps its output (convs keep
  a channels-last copy, so that a cell's channels are contiguous for gathering and scattering).
- `sparse`: the pass on the edited input, which must equal the original's outside the mask. Each layer
  writes its recomputed tiles into its kept output in place and returns it, so one record pass serves
  one sparse pass.

What a record pass kept can be handed out (`SparseEngine.share_record`, after the record pass) and stand in
for a later record pass (`replay`, on an engine over the same UNet, for any mask): the kept outputs do not
depend on the mask, the tile size or the margin. `models/editing/region_edit.py` keeps them across jobs this
way (`models/common/activation_cache.py`). A shared recording is never copied: the sparse pass writes into it
in place as always, noting each overwritten block's old values first, and `restore` puts them back after the
pass, so a recording serves any number of passes while each pass copies only the cells it recomputes.

What runs sparse, per resolution of the feature map (the latent mask max-pooled to it, grown by
`dilation` cells, rounded up to `tile` x `tile` blocks):

- every `nn.Conv2d`: tiling-based sparse convolution (SIGE Sec. 3.1), for any kernel, stride, padding
  and dilation; the output tiles are those of the conv's output resolution;
- every `nn.GroupNorm`: normalised with the original's statistics (mean and 1/std per sample and
  group, recorded in the dense pass), as SIGE does (Sec. 3.2, "normalization layers"), so a position
  outside the edit normalises exactly as in the original; this one runs dense (one fused
  multiply-add);
- attention, through an attention processor (never by replacing `forward`): queries only for the
  active tokens; keys and values of every token -- the original's cached ones with the active rows
  recomputed for self-attention (SIGE's stable-diffusion code computes them from the full, scattered
  tensor: the same values), the text's for cross-attention;
- every diffusers `FeedForward`: on the active tokens only.

Everything else (SiLU, residual additions, LayerNorm, skip concatenation, nearest upsampling, the
time embedding, and the linear in/out projections of SD 2-style transformers) runs dense on full-size
tensors; it is elementwise or per-token and cheap next to the layers above.

The approximation (SIGE's): outside the active tiles of each resolution every activation keeps the
original's value. A change spreads by one cell per 3x3 convolution and to every token through
self-attention; what spreads beyond the active tiles is dropped. The margin of `dilation` cells per
resolution (SIGE's stable-diffusion runner uses 1) and the rounding up to tiles keep most of it: on a
single UNet call with the edited cells redrawn, the sparse eps inside the mask is off the dense one by
1-8% of the edit's own effect with a margin of 1, by 20-50% without (tests/models/test_sparse.py).

Not implemented: SIGE's fused gather/scatter kernels (here: `index_select` / `index_copy_` of whole
cells on the channels-last layout, with the normalisation and activation in between run dense) and
sparse VAE encoding and decoding. Without a stored recording the dense record pass runs at every step,
so such a step costs a dense pass *plus* the sparse pass; SIGE pre-computes the original's activations
once per image, which export / import makes possible across jobs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from models.common.devices import execution_device

Mode = Literal["record", "sparse"]
Recording = list[list[Any]]
"""One record pass's kept outputs: per wrapped layer (in wrapping order), its entries in call order."""


@dataclass(frozen=True)
class ActiveRegion:
    """The active tiles of one feature-map resolution.

    rows, cols: (n,) long, tile coordinates of the active tiles (row-major order);
    tokens: (m,) long, flat indices `y * width + x` of every cell of an active tile, ascending: what the
    convolutions recompute (a tile is their unit of work);
    cells: (k,) long, flat indices of the active cells themselves (k <= m), ascending: what the per-token layers
    (attention queries, feed-forward) recompute. They share no halo, so rounding up to tiles would only add work:
    at 64x64 latents with a 10% mask, tiles of 4 hold 19% of the cells, the cells themselves 15%.
    """

    height: int
    width: int
    tile: int
    rows: torch.Tensor
    cols: torch.Tensor
    tokens: torch.Tensor
    cells: torch.Tensor

    @property
    def fraction(self) -> float:
        """Share of the feature map's cells that are recomputed."""
        return len(self.tokens) / (self.height * self.width)


SMALL_MAP = 16
"""Feature maps narrower than this (cells) get blocks of at most 2 (`region_at`)."""


def region_at(mask: torch.Tensor, height: int, width: int, tile: int, dilation: int = 0) -> ActiveRegion:
    """The tiles of a (height, width) feature map that the latent mask (h, w) bool touches.

    A cell is active when any latent cell it pools over is (adaptive max-pooling), grown by `dilation`
    cells at this resolution (SIGE dilates the reduced mask at every resolution); a tile is active
    when any of its cells is. The tile side depends on the resolution, as SIGE tunes its block sizes: `tile` on
    maps of `SMALL_MAP` cells a side or more, at most 2 below (an SD 1.5-shaped UNet at 32x32 latents and a 10%
    square: blocks of 4 on its 8x8 and 4x4 maps made them wholly active); in either case the largest common
    divisor of height, width and that side when it does not divide the map.
    """
    pooled = F.adaptive_max_pool2d(mask[None, None].float(), (height, width))
    if dilation:
        pooled = F.max_pool2d(pooled, 2 * dilation + 1, stride=1, padding=dilation)
    cells = pooled[0, 0] > 0
    tile = tile if min(height, width) >= SMALL_MAP else min(tile, 2)
    side = tile if height % tile == 0 and width % tile == 0 else math.gcd(math.gcd(height, width), tile)
    grid = cells.view(height // side, side, width // side, side).any(dim=3).any(dim=1)  # (H/t, W/t)
    rows, cols = grid.nonzero(as_tuple=True)
    covered = grid.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)  # (H, W)
    tokens = covered.flatten().nonzero().squeeze(1)
    return ActiveRegion(height, width, side, rows, cols, tokens, cells.flatten().nonzero().squeeze(1))


@dataclass(frozen=True)
class TileGather:
    """Where a conv's active blocks come from and where its output tiles go, as flat cell indices.

    source: (n * wh * ww,) long, input cells y * W + x of each block (tile-major, then row, column),
    clamped into the map; valid: the same shape, bool, False where the block reaches into the conv's
    zero padding (None when it never does); target: (n * t * t,) long, output cells of the tiles.
    """

    source: torch.Tensor
    valid: torch.Tensor | None
    target: torch.Tensor
    window: tuple[int, int]


def tile_gather(
    region: ActiveRegion,
    input_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    reach: tuple[int, int],
) -> TileGather:
    """Indices for a conv whose output map is `region`'s. Block k covers the input rows
    rows[k] * t * s - p ... + (t * s + reach - s) - 1 (the output tile times the stride plus the kernel's
    halo), so neighbouring blocks overlap by the halo (SIGE Fig. 3); likewise for columns."""
    side, (height, width) = region.tile, input_size
    window = (side * stride[0] + reach[0] - stride[0], side * stride[1] + reach[1] - stride[1])
    ys = region.rows[:, None] * side * stride[0] - padding[0] + torch.arange(window[0], device=region.rows.device)
    xs = region.cols[:, None] * side * stride[1] - padding[1] + torch.arange(window[1], device=region.cols.device)
    inside = ((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :]  # (n, wh, ww)
    source = ys.clamp(0, height - 1)[:, :, None] * width + xs.clamp(0, width - 1)[:, None, :]
    cells = torch.arange(side, device=region.rows.device)
    out_ys, out_xs = region.rows[:, None] * side + cells, region.cols[:, None] * side + cells  # (n, t)
    target = out_ys[:, :, None] * region.width + out_xs[:, None, :]
    valid = None if bool(inside.all()) else inside.flatten()
    return TileGather(source.flatten(), valid, target.flatten(), window)


def as_rows(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H * W, C), a view when `features` is channels-last, else a copy."""
    batch, channels = features.shape[:2]
    return features.permute(0, 2, 3, 1).reshape(batch, -1, channels)


def gather_tiles(features: torch.Tensor, plan: TileGather) -> torch.Tensor:
    """Active input blocks of a feature map (B, C, H, W) -> (B * n, C, wh, ww), contiguous.

    Gathers whole cells (C contiguous values each) from the channels-last layout; cells in the
    conv's zero padding are zeroed. Order: batch-major, then tile. The blocks are returned
    channels-first, where CPU convolutions are fastest (measured 2.5x faster than channels-last).
    """
    batch, channels = features.shape[:2]
    blocks = as_rows(features).index_select(1, plan.source)  # (B, n * wh * ww, C)
    if plan.valid is not None:
        blocks = blocks * plan.valid[None, :, None]
    return blocks.view(-1, plan.window[0], plan.window[1], channels).permute(0, 3, 1, 2).contiguous()


def scatter_tiles(output: torch.Tensor, tiles: torch.Tensor, plan: TileGather, engine: SparseEngine) -> None:
    """Write computed tiles (B * n, C, t, t) into the channels-last `output` (B, C, H, W) in place."""
    batch, channels = output.shape[:2]
    rows = tiles.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # (B, n * t * t, C)
    engine.write_cells(output.permute(0, 2, 3, 1).view(batch, -1, channels), 1, plan.target, rows)


class LayerCache:
    """One layer's record-pass outputs, read back in the same call order by the sparse pass."""

    def __init__(self) -> None:
        self.entries: list[Any] = []
        self.position = 0

    def put(self, entry: Any) -> None:
        self.entries.append(entry)

    def take(self) -> Any:
        """The next entry; the sparse pass updates it in place, so each entry serves one sparse pass."""
        if self.position >= len(self.entries) or self.entries[self.position] is None:
            raise RuntimeError("sparse pass without a matching record pass (record the original first, once per pass)")
        entry = self.entries[self.position]
        self.entries[self.position] = None
        self.position += 1
        return entry


class SparseEngine:
    """The mode, the latent mask and the per-resolution active regions shared by the wrapped layers.

    mask: (h, w) bool at the UNet's input (latent) resolution; True = edited.
    """

    def __init__(self, mask: torch.Tensor, tile: int, dilation: int = 1) -> None:
        if mask.dim() != 2:
            raise ValueError(f"mask must be (h, w), got shape {tuple(mask.shape)}")
        if tile < 1:
            raise ValueError(f"tile must be at least 1, got {tile}")
        if dilation < 0:
            raise ValueError(f"dilation must be at least 0, got {dilation}")
        self.mask = mask.bool()
        self.tile = tile
        self.dilation = dilation
        self.mode: Mode = "record"
        self.caches: list[LayerCache] = []
        self._regions: dict[tuple[int, int], ActiveRegion] = {}
        self._undo: list[Callable[[], Any]] | None = None  # while the kept outputs are shared: how to restore them

    def new_cache(self) -> LayerCache:
        cache = LayerCache()
        self.caches.append(cache)
        return cache

    def set_mode(self, mode: Mode) -> None:
        """`record` forgets the previous step's activations; `sparse` rewinds to read them back."""
        self.mode = mode
        for cache in self.caches:
            if mode == "record":
                cache.entries.clear()
            cache.position = 0

    def region(self, height: int, width: int) -> ActiveRegion:
        key = (height, width)
        if key not in self._regions:
            self._regions[key] = region_at(self.mask, height, width, self.tile, self.dilation)
        return self._regions[key]

    def region_for_tokens(self, count: int) -> ActiveRegion:
        """The region of the resolution with `count` cells (the UNet halves the latent size per level)."""
        height, width = self.mask.shape
        for level in range(10):
            scaled = (math.ceil(height / 2**level), math.ceil(width / 2**level))
            if scaled[0] * scaled[1] == count:
                return self.region(*scaled)
        raise ValueError(f"no UNet resolution of a {height}x{width} latent has {count} tokens")

    def share_record(self) -> Recording:
        """What the last record pass kept, per wrapped layer in call order: the tensors themselves, not copies. Call
        it after the record pass and before its sparse pass; the sparse pass then notes what it overwrites, and
        `restore` after it returns the tensors to the record pass's values. `replay` on an engine installed on the
        same UNet with the same call sequence uses them for any mask."""
        if self.mode != "record" or any(entry is None for cache in self.caches for entry in cache.entries):
            raise RuntimeError("share_record must follow a record pass, before its sparse pass")
        self._undo = []
        return [list(cache.entries) for cache in self.caches]

    def replay(self, recording: Recording) -> None:
        """Stand in for a record pass with `recording` (from `share_record`) and switch to `sparse`. The sparse pass
        writes into the recording's tensors; call `restore` after it (also when it fails), which leaves
        `recording` as it was, so that it serves any number of passes."""
        if len(recording) != len(self.caches):
            raise ValueError(
                f"recording has {len(recording)} layers, this engine wraps {len(self.caches)} (another model?)"
            )
        for cache, entries in zip(self.caches, recording, strict=True):
            cache.entries = list(entries)
        self._undo = []
        self.set_mode("sparse")

    def restore(self) -> None:
        """Undo the sparse pass's writes into a shared recording, last first; nothing when none is shared."""
        undo, self._undo = self._undo, None
        for action in reversed(undo or []):
            action()

    def write_cells(self, target: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`target.index_copy_(dim, index, values)`, the overwritten entries noted first when `target` is shared."""
        if self._undo is not None:
            kept = target.index_select(dim, index)
            self._undo.append(lambda: target.index_copy_(dim, index, kept))
        return target.index_copy_(dim, index, values)

    def write_block(self, block: torch.Tensor, values: torch.Tensor) -> None:
        """`block.copy_(values)` (a view into a kept output), its old values noted first when shared."""
        if self._undo is not None:
            kept = block.clone()
            self._undo.append(lambda: block.copy_(kept))
        block.copy_(values)

    def clear(self) -> None:
        self.restore()
        for cache in self.caches:
            cache.entries.clear()


@dataclass(frozen=True)
class BoxPlan:
    """The active tiles' bounding box as one block: output cells [top, bottom) x [left, right) of the conv's map,
    computed from the input rows [crop_top, crop_bottom) and columns [crop_left, crop_right) (the box times the
    stride plus the kernel's halo; rows or columns past the map are the conv's zero padding)."""

    top: int
    bottom: int
    left: int
    right: int
    crop: tuple[int, int, int, int]

    @property
    def cells(self) -> int:
        """Output cells the conv computes."""
        return (self.bottom - self.top) * (self.right - self.left)


def box_plan(
    region: ActiveRegion, stride: tuple[int, int], padding: tuple[int, int], reach: tuple[int, int]
) -> BoxPlan:
    """The bounding box of `region`'s active tiles and the input crop a conv needs for it."""
    side = region.tile
    top, bottom = int(region.rows.min()) * side, (int(region.rows.max()) + 1) * side
    left, right = int(region.cols.min()) * side, (int(region.cols.max()) + 1) * side
    crop = (
        top * stride[0] - padding[0],
        (bottom - 1) * stride[0] - padding[0] + reach[0],
        left * stride[1] - padding[1],
        (right - 1) * stride[1] - padding[1] + reach[1],
    )
    return BoxPlan(top, bottom, left, right, crop)


class SparseConv2d(nn.Module):
    """Tiling-based sparse convolution around an unchanged `nn.Conv2d` (SIGE Sec. 3.1).

    Of two ways to recompute the active tiles it takes the one that computes fewer output cells, the box when they
    tie: SIGE's gather of every tile with its own halo into a batch of blocks, or one block over the tiles'
    bounding box with a single halo (no gathering; it also recomputes the inactive tiles inside the box, from the
    edited input, which only brings it closer to the dense pass). A compact edit takes the box; edits far apart
    take the tiles.
    """

    def __init__(self, conv: nn.Conv2d, engine: SparseEngine) -> None:
        super().__init__()
        self.conv = conv
        self.engine = engine
        self.cache = engine.new_cache()
        self.supported = conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)  # not "same"/"valid"
        self.padding: tuple[int, ...] = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
        self._plans: dict[tuple[int, int, tuple[int, int]], TileGather | BoxPlan] = {}

    def plan(self, region: ActiveRegion, size: tuple[int, int]) -> TileGather | BoxPlan:
        """How this conv recomputes `region` (its output map's) from an input map of `size`: the cheaper plan."""
        key = (region.height, region.width, size)
        if key not in self._plans:
            conv = self.conv
            reach = tuple(d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
            tiles = tile_gather(region, size, conv.stride, self.padding, reach)  # type: ignore[arg-type]
            box = box_plan(region, conv.stride, self.padding, reach)  # type: ignore[arg-type]
            self._plans[key] = box if box.cells <= len(tiles.target) else tiles
        return self._plans[key]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: (B, C, H, W) -> (B, C', H', W'). Record: the dense conv; a channels-last copy is kept.
        Sparse: the kept output with its active tiles recomputed from `inputs` in place (gather, conv,
        scatter, or the bounding box's block); when every tile is active, the dense conv (the same work, without
        the gathering)."""
        if not self.supported:
            return self.conv(inputs)  # type: ignore[no-any-return]
        if self.engine.mode == "record":
            output = self.conv(inputs)
            self.cache.put(output.contiguous(memory_format=torch.channels_last))
            return output  # type: ignore[no-any-return]
        output = self.cache.take()
        if output.shape[0] != inputs.shape[0]:
            raise RuntimeError(f"sparse pass has batch {inputs.shape[0]}, the record pass had {output.shape[0]}")
        region = self.engine.region(output.shape[2], output.shape[3])
        if len(region.rows) == 0:
            return output  # type: ignore[no-any-return]
        conv = self.conv
        if len(region.tokens) == region.height * region.width:
            return conv(inputs.contiguous())  # type: ignore[no-any-return]
        plan = self.plan(region, (inputs.shape[2], inputs.shape[3]))
        if isinstance(plan, BoxPlan):
            block = F.conv2d(
                crop(inputs, plan.crop), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups
            )
            self.engine.write_block(output[:, :, plan.top : plan.bottom, plan.left : plan.right], block)
            return output  # type: ignore[no-any-return]
        blocks = gather_tiles(inputs, plan)
        tiles = F.conv2d(blocks, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
        scatter_tiles(output, tiles, plan, self.engine)
        return output  # type: ignore[no-any-return]


def crop(features: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Rows [top, bottom) and columns [left, right) of (B, C, H, W), zeros where they lie past the map; contiguous
    channels-first (where CPU convolutions are fastest)."""
    top, bottom, left, right = box
    height, width = features.shape[2], features.shape[3]
    inside = features[:, :, max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
    pads = (max(-left, 0), max(right - width, 0), max(-top, 0), max(bottom - height, 0))
    return F.pad(inside, pads).contiguous() if any(pads) else inside.contiguous()


class CachedStatsGroupNorm(nn.Module):
    """GroupNorm with the original's statistics in the sparse pass (SIGE Sec. 3.2).

    Both passes compute y = x * scale + shift with scale = weight / std and shift = bias - mean * scale
    per (sample, channel); the record pass takes mean and std from its input, the sparse pass reuses
    them, so an unedited position gets exactly the original's value.
    """

    def __init__(self, norm: nn.GroupNorm, engine: SparseEngine) -> None:
        super().__init__()
        self.norm = norm
        self.engine = engine
        self.cache = engine.new_cache()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: (B, C, *spatial) -> the same shape."""
        batch, channels = inputs.shape[:2]
        groups = self.norm.num_groups
        if self.engine.mode == "record":
            variance, mean = torch.var_mean(inputs.reshape(batch, groups, -1), dim=-1, correction=0)
            inv_std = torch.rsqrt(variance + self.norm.eps)  # (B, G)
            scale = inv_std.repeat_interleave(channels // groups, dim=1)  # (B, C)
            shift = -mean.repeat_interleave(channels // groups, dim=1) * scale
            if self.norm.affine:
                scale = scale * self.norm.weight
                shift = shift * self.norm.weight + self.norm.bias
            self.cache.put((scale, shift))
        else:
            scale, shift = self.cache.take()
        extra = (1,) * (inputs.dim() - 2)
        return torch.addcmul(shift.view(batch, channels, *extra), inputs, scale.view(batch, channels, *extra))


class SparseTokens(nn.Module):
    """A per-token module (B, N, C) -> (B, N, C') (a FeedForward) run on the active tokens only."""

    def __init__(self, module: nn.Module, engine: SparseEngine) -> None:
        super().__init__()
        self.module = module
        self.engine = engine
        self.cache = engine.new_cache()

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """hidden_states: (B, N, C) -> (B, N, C'); sparse mode: the kept output with active tokens redone."""
        output: torch.Tensor
        if self.engine.mode == "record":
            output = self.module(hidden_states, *args, **kwargs)
            self.cache.put(output)
            return output
        output = self.cache.take()
        tokens = self.engine.region_for_tokens(hidden_states.shape[1]).cells
        recomputed = self.module(hidden_states.index_select(1, tokens), *args, **kwargs)
        return self.engine.write_cells(output, 1, tokens, recomputed)


def _attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt d) V over heads, then the output projection.

    query: (B, n, inner); key, value: (B, L, inner) -> (B, n, query_dim).
    """
    batch, inner = query.shape[0], key.shape[-1]
    head_dim = inner // attn.heads

    def heads(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    mixed = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), scale=attn.scale)
    mixed = mixed.transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](mixed))  # type: ignore[no-any-return]


class SparseAttnProcessor:
    """Attention whose queries are only the active tokens in the sparse pass (SIGE, stable-diffusion code).

    Supports plain self- and cross-attention on (B, N, C) tokens (what SD-style UNets use); anything
    else (spatial norm, group norm, q/k norms, masks, residual connection) runs the original processor
    densely in both passes.
    """

    def __init__(self, engine: SparseEngine, original: Any) -> None:
        self.engine = engine
        self.original = original
        self.cache = engine.new_cache()

    @staticmethod
    def supports(attn: Attention, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        plain = attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
        return (
            plain
            and not attn.norm_cross
            and not attn.residual_connection
            and attn.rescale_output_factor == 1.0
            and hidden_states.dim() == 3
            and attention_mask is None
        )

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """hidden_states: (B, N, C); encoder_hidden_states: (B, L, D) or None -> (B, N, C)."""
        if not self.supports(attn, hidden_states, attention_mask):
            output: torch.Tensor = self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
            return output
        self_attention = encoder_hidden_states is None
        if self.engine.mode == "record":
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            key, value = attn.to_k(context), attn.to_v(context)
            output = _attend(attn, attn.to_q(hidden_states), key, value)
            self.cache.put((key, value, output))
            return output
        key, value, output = self.cache.take()
        tokens = self.engine.region_for_tokens(hidden_states.shape[1]).cells
        active = hidden_states.index_select(1, tokens)  # (B, m, C)
        if self_attention:  # the edited tokens' keys and values changed; the others are the original's
            self.engine.write_cells(key, 1, tokens, attn.to_k(active))
            self.engine.write_cells(value, 1, tokens, attn.to_v(active))
        return self.engine.write_cells(output, 1, tokens, _attend(attn, attn.to_q(active), key, value))


def _wrap(module: nn.Module, engine: SparseEngine) -> nn.Module | None:
    if isinstance(module, nn.Conv2d):
        return SparseConv2d(module, engine)
    if isinstance(module, nn.GroupNorm):
        return CachedStatsGroupNorm(module, engine)
    if isinstance(module, FeedForward):
        return SparseTokens(module, engine)
    return None


@contextmanager
def sparse_inference(
    unet: UNet2DConditionModel, mask: torch.Tensor, tile: int = 4, dilation: int = 1
) -> Iterator[SparseEngine]:
    """Install the sparse engine on `unet` for the duration of the block; the model is restored after.

    mask: (h, w) bool at the latent resolution (True = edited); tile: block side in feature-map cells (see
    `region_edit.Params.tile`);
    dilation: cells added around the mask at every resolution before rounding up to tiles.
    Usage per denoising step: `engine.set_mode("record")`, the UNet on the original's latent, then
    `engine.set_mode("sparse")`, the UNet on the edited latent (same batch, timestep and text).
    """
    engine = SparseEngine(mask.to(execution_device(unet)), tile, dilation)
    saved_processors = unet.attn_processors
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        # 1. Attention through processors, one per Attention module (each keeps its own cache).
        unet.set_attn_processor({name: SparseAttnProcessor(engine, proc) for name, proc in saved_processors.items()})
        # 2. Conv2d, GroupNorm and FeedForward wrapped in place; a module registered under two names
        #    (diffusers' Downsample2D: `conv` and `Conv2d_0`) gets one wrapper under both.
        wrappers: dict[int, nn.Module] = {}
        for parent in list(unet.modules()):
            for name, child in list(parent._modules.items()):
                if child is None:
                    continue
                wrapper = wrappers.get(id(child)) or _wrap(child, engine)
                if wrapper is not None:
                    wrappers[id(child)] = wrapper
                    setattr(parent, name, wrapper)
                    swapped.append((parent, name, child))
        yield engine
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
        unet.set_attn_processor(dict(saved_processors))
        engine.clear()
