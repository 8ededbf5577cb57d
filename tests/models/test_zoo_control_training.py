"""zoo/train_control.py: a ControlNet trained on the bundled base loads in the stock pipeline and resumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionGLIGENPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers.models.attention import GatedSelfAttentionDense
from PIL import Image

from models.shapes.world import parse_caption, render
from tests.conftest import ZOO_MODEL
from zoo.runs import latest_checkpoint
from zoo.train_control import ControlTrainParams, render_conditioned, train_controlnet
from zoo.train_gligen import GligenTrainParams, box_cells, gligen_variant, render_grounded, train_gligen


def test_conditions_are_the_scenes_edges_and_masks() -> None:
    images, edges, captions = render_conditioned(4, 3, "canny")
    _, masks, again = render_conditioned(4, 3, "mask")
    assert captions == again and images.shape == edges.shape == masks.shape == (4, 64, 64, 3)
    for index, text in enumerate(captions):
        rendered = render(parse_caption(text))
        np.testing.assert_array_equal(images[index], rendered.image)
        np.testing.assert_array_equal(masks[index, ..., 0] > 0, rendered.masks.any(axis=0))
        assert set(np.unique(edges[index])) <= {0, 255} and edges[index].any()
    _, sketches, _ = render_conditioned(4, 3, "sketch")
    for index, text in enumerate(captions):  # the objects' outlines only, not the background's edges
        np.testing.assert_array_equal(sketches[index, ..., 0], render(parse_caption(text)).edges)
    with pytest.raises(ValueError, match="condition must be one of"):
        render_conditioned(1, 0, "depth")


def test_trains_saves_in_diffusers_format_and_resumes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.set_num_threads(1)
    params = ControlTrainParams(steps=2, batch_size=2, n_scenes=8, checkpoint_every=1, warmup=1)
    out, work = tmp_path / "controlnet", tmp_path / "work"
    train_controlnet(ZOO_MODEL, out, work, params, resume=False)
    assert latest_checkpoint(work) is not None and latest_checkpoint(work).name == "ckpt-0000002.pt"  # type: ignore[union-attr]
    controlnet = ControlNetModel.from_pretrained(str(out))
    assert json.loads((out / "atelier.json").read_text())["condition"] == "canny"  # what GET /v1/models shows
    zero_conv = controlnet.controlnet_mid_block.weight
    assert zero_conv.abs().sum() > 0  # the zero convolution has learned
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(ZOO_MODEL), controlnet=controlnet, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", image=Image.new("RGB", (64, 64)), num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    longer = ControlTrainParams(steps=3, batch_size=2, n_scenes=8, checkpoint_every=1, warmup=1)
    with caplog.at_level(logging.INFO, logger="zoo.train_control"):
        train_controlnet(ZOO_MODEL, out, work, longer, resume=True)
    assert "ckpt-0000002.pt at step 2" in caplog.text  # it continued, it did not start again
    assert latest_checkpoint(work).name == "ckpt-0000003.pt"  # type: ignore[union-attr]


def test_a_warm_start_continues_from_a_saved_model_of_another_condition(tmp_path: Path) -> None:
    """`--init`: a run on a machine without the checkpoints starts from the bundled model (here a canny one, for a
    mask ControlNet); its first step is that model, and its notes count the steps before."""
    torch.set_num_threads(1)
    first = tmp_path / "canny"
    train_controlnet(ZOO_MODEL, first, tmp_path / "w1", ControlTrainParams(steps=2, batch_size=2, n_scenes=8), False)
    saved = ControlNetModel.from_pretrained(str(first))
    params = ControlTrainParams(condition="mask", steps=1, batch_size=2, n_scenes=8, lr=0.0)  # lr 0: unchanged
    out = tmp_path / "mask"
    train_controlnet(ZOO_MODEL, out, tmp_path / "w2", params, False, init=first)
    warm = ControlNetModel.from_pretrained(str(out))
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, warm.state_dict()[name]), name
    notes = json.loads((out / "atelier.json").read_text())
    assert notes["condition"] == "mask" and notes["steps"] == 3
    assert notes["warm_start"] == {"condition": "canny", "steps_before": 2, "steps": 1}
    assert "_name_or_path" not in json.loads((out / "config.json").read_text())  # no path of this machine


def test_trains_a_t2i_adapter_that_loads_in_the_stock_adapter_pipeline(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    params = ControlTrainParams(
        condition="sketch", kind="t2i-adapter", steps=2, batch_size=2, n_scenes=8, checkpoint_every=1, warmup=1
    )
    out = tmp_path / "adapter"
    train_controlnet(ZOO_MODEL, out, tmp_path / "work", params, resume=False)
    assert json.loads((out / "atelier.json").read_text())["kind"] == "t2i-adapter"
    adapter = T2IAdapter.from_pretrained(str(out))
    pipe = StableDiffusionAdapterPipeline.from_pretrained(str(ZOO_MODEL), adapter=adapter, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", image=Image.new("RGB", (64, 64)), num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_trains_a_gligen_variant_that_loads_in_the_stock_gligen_pipeline(tmp_path: Path) -> None:
    """Two steps: the saved folder loads in StableDiffusionGLIGENPipeline; the gates have moved off zero; the
    boxes are the scene's objects' bounds."""
    torch.set_num_threads(1)
    data = render_grounded(3, 0)
    for index, phrases in enumerate(data.phrases):
        assert data.counts[index] == len(phrases) and (data.boxes[index, len(phrases) :] == 0).all()
        x0, y0, x1, y1 = data.boxes[index, 0]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    params = GligenTrainParams(steps=2, batch_size=2, n_scenes=8, checkpoint_every=1, warmup=1)
    out = tmp_path / "gligen"
    train_gligen(ZOO_MODEL, out, tmp_path / "work", params, resume=False)
    pipe = StableDiffusionGLIGENPipeline.from_pretrained(str(out), safety_checker=None)
    gates = [m.alpha_attn.item() for m in pipe.unet.modules() if isinstance(m, GatedSelfAttentionDense)]
    assert gates and any(g != 0 for g in gates)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle",
        gligen_phrases=["a red circle"],
        gligen_boxes=[[0.1, 0.1, 0.5, 0.5]],
        gligen_scheduled_sampling_beta=0.5,
        num_inference_steps=2,
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_open_gate_init_is_the_base_model_and_its_layers_learn_at_once() -> None:
    """gligen_variant(gate > 0): gates open, output projections zero, so the variant equals the base at step 0
    while the gated layers' output projections get a gradient on the first step (gate 0: none)."""
    torch.set_num_threads(1)
    base = UNet2DConditionModel.from_pretrained(str(ZOO_MODEL / "unet"))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 8, int(base.config.cross_attention_dim), generator=generator)
    grounding = {
        "boxes": torch.tensor([[[0.1, 0.1, 0.5, 0.5]]]).repeat(2, 1, 1),
        "positive_embeddings": torch.randn(2, 1, int(base.config.cross_attention_dim), generator=generator),
        "masks": torch.ones(2, 1),
    }
    timesteps = torch.tensor([500, 900])
    with torch.no_grad():
        expected = base(latents, timesteps, context).sample
    projections = {}
    for gate in (0.0, 0.5):
        variant = gligen_variant(base, gate)
        out = variant(latents, timesteps, context, cross_attention_kwargs={"gligen": grounding}).sample
        if gate > 0:
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        out.pow(2).mean().backward()
        fusers = [m for m in variant.modules() if isinstance(m, GatedSelfAttentionDense)]
        assert fusers
        projections[gate] = max(f.attn.to_out[0].weight.grad.abs().max().item() for f in fusers)
    assert projections[0.0] == 0.0 and projections[0.5] > 0.0, projections


def test_box_cells_marks_the_latent_cells_of_present_objects_only() -> None:
    """The GLIGEN trainer's box-weighted loss (`--box-weight`) weighs these cells: a present object's box, by
    cell centres; an empty slot's box marks nothing."""
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]]])
    cells = box_cells(boxes, torch.tensor([[1.0, 0.0]]), 8)
    expected = torch.zeros(1, 1, 8, 8)
    expected[0, 0, :2, :4] = 1
    assert torch.equal(cells, expected)
    both = box_cells(boxes, torch.tensor([[1.0, 1.0]]), 8)
    assert int(both.sum()) == 8 + 16


def test_the_contrastive_term_is_zero_once_the_boxes_lower_the_error_by_the_margin() -> None:
    from zoo.train_gligen import contrastive_term

    cells = torch.zeros(2, 1, 4, 4)
    cells[0, :, :2, :2] = 1  # the second sample has no box (grounding dropped): it counts zero
    without = torch.full((2, 4, 4, 4), 1.0)
    assert float(contrastive_term(without * 0.85, without, cells, 0.1)) == 0.0
    gap = float(contrastive_term(without.clone(), without, cells, 0.1))
    assert gap == pytest.approx(-np.log(0.9) / 2, rel=1e-4)  # log(1 / 0.9), averaged over the batch of 2
    # only the cells inside the boxes count
    outside = without.clone()
    outside[0, :, 2:, 2:] = 5.0
    assert float(contrastive_term(outside, without, cells, 0.1)) == pytest.approx(gap, rel=1e-4)


def test_slower_parameters_train_at_their_share_of_the_rate(tmp_path: Path) -> None:
    from zoo.addon_training import AddonLoop, Schedule

    fast, slow = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    loop = AddonLoop(
        tmp_path, Schedule(4, 1e-2, 0, 100), [fast], 0, 1, logging.getLogger("test"), [slow], slower_scale=0.1
    )
    loop.step(1, (fast - 1).pow(2).sum() + (slow - 1).pow(2).sum(), dict)
    rates = [group["lr"] for group in loop.optimizer.param_groups]
    assert rates[1] == pytest.approx(0.1 * rates[0]) and rates[0] > 0
    assert bool((fast > 0).all()) and bool((slow > 0).all())  # both moved
