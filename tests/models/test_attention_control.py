"""Attention control through processors: installed for a block and restored, faithful to the stock math,
and the Prompt-to-Prompt map edits and token helpers on their own."""

from __future__ import annotations

import pytest
import torch

from models.common.attention import (
    AttentionStore,
    EditController,
    controlled_attention,
    maps_on_grid,
    refine_maps,
    replace_maps,
    reweight_maps,
    token_alignment,
    word_token_positions,
)
from models.common.components import Components
from models.common.latents import randn
from models.common.text import encode_prompts
from models.editing.prompt_to_prompt import local_blend

PROMPT = "a large red circle at the center"


def unet_inputs(components: Components) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator("cpu").manual_seed(0)
    latents = randn((2, 4, 16, 16), generator, components.device, components.dtype)
    cond = encode_prompts(components.text_encoder, components.tokenizer, [PROMPT, "a small blue square at the top"])
    return latents, cond


def test_processors_are_restored_after_the_block_and_after_an_exception(components: Components) -> None:
    unet = components.unet
    before = dict(unet.attn_processors)
    with controlled_attention(unet, AttentionStore()):
        inside = dict(unet.attn_processors)
        assert inside.keys() == before.keys()
        assert all(inside[name] is not before[name] for name in before)
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())

    with pytest.raises(RuntimeError, match="canceled mid-step"):
        with controlled_attention(unet, AttentionStore()):
            raise RuntimeError("canceled mid-step")
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())


@torch.no_grad()
def test_explicit_maps_reproduce_the_stock_processor(components: Components) -> None:
    """The controlled path (softmax written out, maps recorded) computes what AttnProcessor2_0 computes."""
    latents, cond = unet_inputs(components)
    stock = components.unet(latents, 500, encoder_hidden_states=cond).sample
    store = AttentionStore()
    with controlled_attention(components.unet, store):
        controlled = components.unet(latents, 500, encoder_hidden_states=cond).sample
    torch.testing.assert_close(controlled, stock, rtol=1e-5, atol=1e-5)

    cross_layers = [name for name in components.unet.attn_processors if name.endswith("attn2.processor")]
    assert sorted(store.current) == sorted(cross_layers)
    for maps in store.current.values():  # (B, Q, T): distributions over the tokens
        assert maps.shape[0] == 2 and maps.shape[2] == components.tokenizer.model_max_length
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:2]))
    grid = store.step_maps(16, 16)
    assert grid.shape == (2, components.tokenizer.model_max_length, 16, 16)


def softmaxed(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def test_edit_controller_touches_only_the_conditional_edit_row_within_its_steps() -> None:
    """Batch [uncond_src, uncond_edit, cond_src, cond_edit]: only row 3 changes, and only while step < tau."""
    controller = EditController(cross_edit=replace_maps, cross_steps=2, self_steps=1, self_max_positions=64)
    cross = softmaxed(4, 2, 64, 8)
    controller.step = 1
    out = controller(cross, "layer", is_cross=True)
    assert torch.equal(out[:3], cross[:3]) and torch.equal(out[3], cross[2])
    controller.step = 2
    assert not controller.needs_maps("layer", True, 64)
    assert torch.equal(controller(cross, "layer", is_cross=True), cross)

    self_maps = softmaxed(4, 2, 64, 64)
    controller.step = 0
    assert controller.needs_maps("layer", False, 64) and not controller.needs_maps("layer", False, 256)
    out = controller(self_maps, "layer", is_cross=False)
    assert torch.equal(out[:3], self_maps[:3]) and torch.equal(out[3], self_maps[2])
    controller.step = 1
    assert torch.equal(controller(self_maps, "layer", is_cross=False), self_maps)

    # Without guidance the batch is [cond_src, cond_edit]: the same rule, the last pair.
    pair = softmaxed(2, 2, 64, 8)
    controller.step = 0
    assert torch.equal(controller(pair, "layer", is_cross=True)[1], pair[0])


def test_refine_and_reweight_maps() -> None:
    source, edit = softmaxed(2, 16, 5, seed=1), softmaxed(2, 16, 5, seed=2)
    mapper = torch.tensor([0, 1, 0, 2, 3])
    alphas = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])  # target token 2 is new
    refined = refine_maps(source, edit, mapper, alphas)
    assert torch.equal(refined[..., 2], edit[..., 2])
    assert torch.equal(refined[..., [0, 1, 3, 4]], source[..., [0, 1, 2, 3]])
    equalizer = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0])
    weighted = reweight_maps(source, equalizer)
    torch.testing.assert_close(weighted[..., 2], 3 * source[..., 2])
    assert torch.equal(weighted[..., [0, 1, 3, 4]], source[..., [0, 1, 3, 4]])


def test_word_positions_follow_the_tokenizer(components: Components) -> None:
    tokenizer = components.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    (red,) = word_token_positions(tokenizer, PROMPT, "red")
    assert ids[red] == tokenizer("red", add_special_tokens=False)["input_ids"][0]
    assert word_token_positions(tokenizer, PROMPT, "RED") == [red]
    assert word_token_positions(tokenizer, PROMPT, "blue") == []
    # A word outside the vocabulary becomes several byte tokens; positions after it still line up.
    odd = "a zzyzx circle"
    (circle,) = word_token_positions(tokenizer, odd, "circle")
    assert tokenizer(odd)["input_ids"][circle] == tokenizer("circle", add_special_tokens=False)["input_ids"][0]
    assert len(word_token_positions(tokenizer, odd, "zzyzx")) == circle - 2


def test_token_alignment_maps_shared_tokens_and_marks_new_ones(components: Components) -> None:
    tokenizer = components.tokenizer
    length = tokenizer.model_max_length
    mapper, alphas = token_alignment(tokenizer, PROMPT, PROMPT)
    assert torch.equal(mapper, torch.arange(length)) and torch.equal(alphas, torch.ones(length))

    # "a red circle ..." -> "a large red circle ...": "large" (target position 2) is new, the rest shift by one.
    mapper, alphas = token_alignment(tokenizer, "a red circle at the center", PROMPT)
    n_target = len(tokenizer(PROMPT)["input_ids"])  # start, 7 words, end
    assert alphas[:n_target].tolist() == [1, 1, 0, 1, 1, 1, 1, 1, 1]
    assert mapper[:n_target].tolist()[:2] == [0, 1] and mapper[3:n_target].tolist() == [2, 3, 4, 5, 6, 7]
    assert mapper[n_target].item() == n_target - 1  # padding aligned from the end token on
    assert alphas[n_target:].eq(1).all()


def test_local_blend_keeps_the_source_outside_the_mask() -> None:
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = torch.zeros(2, 6, 8, 8)
    maps[1, 3, 2:4, 2:4] = 1.0  # the edited word attends to a 2x2 patch
    weights = torch.zeros(2, 6)
    weights[:, 3] = 1.0
    blended, mask = local_blend(latents, maps, weights, threshold=0.3)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 0, 1:5, 1:5].all() and mask.sum() == 16  # the patch dilated by one cell (k = 1)
    inside = mask[0, 0].bool()
    assert torch.equal(blended[0], latents[0])
    assert torch.equal(blended[1][:, ~inside], latents[0][:, ~inside])
    assert torch.equal(blended[1][:, inside], latents[1][:, inside])


def test_maps_on_grid_resizes_layers_to_one_grid() -> None:
    coarse, fine = torch.ones(2, 16, 5), torch.ones(2, 64, 5)
    assert maps_on_grid([coarse, fine], 8, 8).shape == (2, 5, 8, 8)
    assert maps_on_grid([torch.ones(1, 16, 3)], 4, 16).shape == (1, 3, 4, 16)  # a 2x8 level of a 4x16 latent
    assert maps_on_grid([torch.ones(1, 6, 3)], 3, 5).shape == (1, 3, 3, 5)  # odd sizes round up (2x3)
