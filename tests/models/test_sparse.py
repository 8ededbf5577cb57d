"""The SIGE engine (models/common/sparse.py): tiles, exact sparse layers, the UNet approximation, cleanup."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from models.common.components import Components
from models.common.sparse import (
    ActiveRegion,
    BoxPlan,
    CachedStatsGroupNorm,
    SparseConv2d,
    SparseEngine,
    region_at,
    sparse_inference,
)


def block_mask(size: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + height, left : left + width] = True
    return mask


def test_region_rounds_the_mask_up_to_tiles_at_every_resolution() -> None:
    mask = block_mask(16, 5, 9, 3, 3)  # rows 5-7, cols 9-11
    full = region_at(mask, 16, 16, tile=4)
    assert (full.rows.tolist(), full.cols.tolist()) == ([1], [2])
    assert full.tokens.tolist() == [y * 16 + x for y in range(4, 8) for x in range(8, 12)]
    half = region_at(mask, 8, 8, tile=4)  # pooled: rows 2-3, cols 4-5; a map under SMALL_MAP: blocks of 2
    assert half.tile == 2 and (half.rows.tolist(), half.cols.tolist()) == ([1], [2]) and half.fraction == 4 / 64
    odd = region_at(mask, 6, 6, tile=4)  # 4 does not divide 6: tiles of gcd(6, 4) = 2
    assert odd.tile == 2


CONVS = {
    "3x3": nn.Conv2d(3, 5, 3, padding=1),
    "3x3 stride 2": nn.Conv2d(3, 5, 3, stride=2, padding=1),
    "1x1": nn.Conv2d(3, 5, 1),
    "5x5": nn.Conv2d(3, 5, 5, padding=2),
    "3x3 dilation 2": nn.Conv2d(3, 5, 3, padding=2, dilation=2),
    "2x2 stride 2 no padding": nn.Conv2d(3, 5, 2, stride=2),
}


def recomputed(layer: SparseConv2d, region: ActiveRegion, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool: the output cells the layer's plan recomputes (the box, or the active tiles)."""
    plan = layer.plan(region, size)
    cells = torch.zeros(region.height, region.width, dtype=torch.bool)
    if isinstance(plan, BoxPlan):
        cells[plan.top : plan.bottom, plan.left : plan.right] = True
    else:
        cells.view(-1)[plan.target] = True
    return cells


MASKS = {
    "compact (one box)": block_mask(32, 3, 6, 4, 2),
    "two far apart (tiles)": block_mask(32, 2, 2, 3, 3) | block_mask(32, 25, 26, 3, 3),
}


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("name", list(CONVS))
def test_sparse_conv_is_exact_on_what_it_recomputes_and_the_original_elsewhere(name: str, mask_name: str) -> None:
    """SIGE Sec. 3.1 for one layer: gather with halo, conv, scatter (or the active tiles' bounding box as one
    block) == the dense conv on the cells recomputed, which hold every active tile; the original elsewhere."""
    torch.manual_seed(0)
    conv = CONVS[name]
    original = torch.randn(2, 3, 32, 32)
    mask = MASKS[mask_name]
    edited = torch.where(mask, torch.randn(2, 3, 32, 32), original)
    engine = SparseEngine(mask, tile=4)
    layer = SparseConv2d(conv, engine)
    with torch.no_grad():
        engine.set_mode("record")
        recorded = layer(original).clone()  # the sparse pass updates the kept output in place
        engine.set_mode("sparse")
        sparse = layer(edited)
        dense = conv(edited)
    region = engine.region(*dense.shape[-2:])
    tiles = torch.zeros(dense.shape[-2:], dtype=torch.bool).flatten()
    tiles[region.tokens] = True
    active = recomputed(layer, region, (32, 32))
    assert active.any() and not active.all()
    assert bool(active.flatten()[tiles].all())
    plan = layer.plan(region, (32, 32))
    assert isinstance(plan, BoxPlan) == (mask_name == "compact (one box)"), type(plan)
    assert torch.allclose(sparse[:, :, active], dense[:, :, active], atol=1e-5)
    assert torch.equal(sparse[:, :, ~active], recorded[:, :, ~active])


def test_group_norm_reuses_the_originals_statistics() -> None:
    """SIGE Sec. 3.2: the sparse pass normalises with the record pass's mean and std."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(2, 4)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    original, edited = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    engine = SparseEngine(torch.ones(8, 8, dtype=torch.bool), tile=4)
    layer = CachedStatsGroupNorm(norm, engine)
    with torch.no_grad():
        engine.set_mode("record")
        assert torch.allclose(layer(original), norm(original), atol=1e-5)
        engine.set_mode("sparse")
        grouped = original.view(2, 2, -1)  # 2 groups of 2 channels
        mean = grouped.mean(-1).repeat_interleave(2, 1)[..., None, None]
        std = grouped.var(-1, unbiased=False).add(norm.eps).sqrt().repeat_interleave(2, 1)[..., None, None]
        expected = (edited - mean) / std
        expected = expected * norm.weight[:, None, None] + norm.bias[:, None, None]
        assert torch.allclose(layer(edited), expected, atol=1e-5)


def sd_like_unet() -> UNet2DConditionModel:
    """SD 1.5's block layout at a tiny width: a plain DownBlock2D/UpBlock2D level, 2 layers per block."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


@pytest.fixture(params=["zoo", "sd-like"])
def unet(request: pytest.FixtureRequest, components: Components) -> UNet2DConditionModel:
    return components.unet if request.param == "zoo" else sd_like_unet()


def inputs(
    unet: UNet2DConditionModel, size: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original latents, edited latents, text, mask): the edit redraws a 4x6 block of the latent."""
    generator = torch.Generator().manual_seed(seed)
    original = torch.randn(2, 4, size, size, generator=generator)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)
    mask = block_mask(size, 4, 4, 4, 6)
    edited = torch.where(mask, torch.randn(2, 4, size, size, generator=generator), original)
    return original, edited, text, mask


def test_sparse_pass_on_the_original_reproduces_the_dense_pass(unet: UNet2DConditionModel) -> None:
    original, _, text, mask = inputs(unet)
    with torch.no_grad():
        dense = unet(original, 500, encoder_hidden_states=text).sample
        with sparse_inference(unet, mask) as engine:
            engine.set_mode("record")
            recorded = unet(original, 500, encoder_hidden_states=text).sample.clone()
            engine.set_mode("sparse")
            again = unet(original, 500, encoder_hidden_states=text).sample
    assert torch.allclose(recorded, dense, atol=1e-5)
    assert torch.allclose(again, dense, atol=1e-5)


def test_sparse_unet_approximates_the_dense_edit(unet: UNet2DConditionModel) -> None:
    """Inside the mask the sparse eps is within a fifth of the edit's own effect of the dense eps (measured at
    16x16 with one cell of margin per resolution and the default blocks of 4: 0.02-0.06 of it for the zoo UNet,
    0.07-0.09 for the SD-like one; with blocks of 2 0.02-0.06 and 0.11-0.15; without the margin 0.3-0.5); outside
    the active tiles it is the original's eps exactly (SIGE's approximation keeps every inactive activation)."""
    for seed in range(2):
        original, edited, text, mask = inputs(unet, seed=seed)
        with torch.no_grad():
            dense_original = unet(original, 500, encoder_hidden_states=text).sample
            dense = unet(edited, 500, encoder_hidden_states=text).sample
            with sparse_inference(unet, mask) as engine:
                engine.set_mode("record")
                recorded = unet(original, 500, encoder_hidden_states=text).sample.clone()
                engine.set_mode("sparse")
                sparse = unet(edited, 500, encoder_hidden_states=text).sample
                outside = torch.ones(16 * 16, dtype=torch.bool)
                outside[engine.region(16, 16).tokens] = False
        error = (sparse - dense)[:, :, mask].abs().mean()
        effect = (dense - dense_original)[:, :, mask].abs().mean()
        assert error < 0.2 * effect, (float(error), float(effect))
        assert torch.equal(sparse.flatten(2)[:, :, outside], recorded.flatten(2)[:, :, outside])


def snapshot(unet: UNet2DConditionModel) -> tuple[list[tuple[str, type]], dict[str, object], list[int], int]:
    modules = [(name, type(module)) for name, module in unet.named_modules()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    return modules, dict(unet.attn_processors), [p.data_ptr() for p in unet.parameters()], hooks


def test_the_model_is_restored_after_use_and_after_an_error(unet: UNet2DConditionModel) -> None:
    original, edited, text, mask = inputs(unet)
    before = snapshot(unet)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad(), sparse_inference(unet, mask) as engine:
        assert any(isinstance(m, SparseConv2d) for m in unet.modules())
        engine.set_mode("record")
        unet(original, 500, encoder_hidden_states=text)
        engine.set_mode("sparse")
        unet(edited, 500, encoder_hidden_states=text)
    assert snapshot(unet) == before
    with pytest.raises(KeyError), torch.no_grad(), sparse_inference(unet, mask):
        raise KeyError("a job failing half way")
    assert snapshot(unet) == before
    assert all(torch.equal(weights[k], v) for k, v in unet.state_dict().items())
    assert list(weights) == list(unet.state_dict())


def test_each_sparse_pass_needs_its_own_record_pass(components: Components) -> None:
    original, edited, text, mask = inputs(components.unet)
    with torch.no_grad(), sparse_inference(components.unet, mask) as engine:
        engine.set_mode("sparse")
        with pytest.raises(RuntimeError, match="record"):
            components.unet(edited, 500, encoder_hidden_states=text)
        engine.set_mode("record")
        components.unet(original, 500, encoder_hidden_states=text)
        engine.set_mode("sparse")
        components.unet(edited, 500, encoder_hidden_states=text)
        engine.set_mode("sparse")  # the kept outputs now hold the previous sparse pass
        with pytest.raises(RuntimeError, match="once per pass"):
            components.unet(edited, 500, encoder_hidden_states=text)


def kept_tensors(recording: list[list[object]]) -> list[torch.Tensor]:
    """Every tensor of a recording, in order (entries are tensors or tuples of them)."""
    flat: list[torch.Tensor] = []
    for entries in recording:
        for entry in entries:
            flat.extend(entry if isinstance(entry, tuple) else (entry,))  # type: ignore[arg-type]
    return flat


def test_a_shared_recording_is_written_in_place_and_restored_after_each_pass(unet: UNet2DConditionModel) -> None:
    """A hit replays the stored tensors themselves: the sparse pass writes into them, `restore` puts back exactly
    what it overwrote (also after a pass that failed half way), so one recording serves any mask, any number of
    times, with the same result each time."""
    original, edited, text, mask = inputs(unet)
    with torch.no_grad(), sparse_inference(unet, mask) as engine:
        engine.set_mode("record")
        unet(original, 500, encoder_hidden_states=text)
        recording = engine.share_record()
        before = [tensor.clone() for tensor in kept_tensors(recording)]
        engine.set_mode("sparse")
        first = unet(edited, 500, encoder_hidden_states=text).sample
        changed = [not torch.equal(a, b) for a, b in zip(kept_tensors(recording), before, strict=True)]
        assert any(changed)  # written in place, not copied
        engine.restore()
        assert all(torch.equal(a, b) for a, b in zip(kept_tensors(recording), before, strict=True))
        engine.replay(recording)
        again = unet(edited, 500, encoder_hidden_states=text).sample
        engine.restore()
    assert torch.equal(first, again)
    other_mask = block_mask(16, 8, 2, 6, 6)
    with torch.no_grad(), sparse_inference(unet, other_mask) as engine:
        engine.replay(recording)
        failing = unet.mid_block.register_forward_hook(lambda *_: (_ for _ in ()).throw(KeyError("half way")))
        try:
            with pytest.raises(KeyError):
                unet(torch.where(other_mask, edited, original), 500, encoder_hidden_states=text)
        finally:
            failing.remove()
        engine.restore()
    assert all(torch.equal(a, b) for a, b in zip(kept_tensors(recording), before, strict=True))
