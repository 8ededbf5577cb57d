"""The zoo's training stages at micro sizes: text-encoder pre-training labels, a frozen pre-trained text
encoder under the UNet stage, and a run packed on one machine and resumed from the pack on another."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo.resume
import zoo.runs
from models.shapes.world import caption, parse_caption, sample_scene
from zoo import train
from zoo.runs import latest_checkpoint, load_checkpoint
from zoo.train_text import NONE, UNSPECIFIED, caption_labels, label_indices


def test_canonical_caption_labels_are_the_scene() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        scene = sample_scene(rng, split="train")
        labels = caption_labels(caption(scene))
        assert parse_caption(caption(scene)) == scene
        for slot, obj in enumerate(scene.objects):
            for attribute in ("shape", "color", "size", "position", "fill"):
                assert labels[f"{attribute}{slot}"] == getattr(obj, attribute)
        if len(scene.objects) == 1:
            assert {labels[f"{a}1"] for a in ("shape", "color", "size", "position", "fill")} == {NONE}
        assert labels["background"] == (UNSPECIFIED if scene.background == "light" else scene.background)


def test_variant_caption_labels_state_only_what_the_caption_says() -> None:
    rng, caption_rng = np.random.default_rng(6), np.random.default_rng(7)
    unspecified = 0
    for _ in range(300):
        scene = sample_scene(rng, split="train")
        text = caption(scene, rng=caption_rng)
        labels = caption_labels(text)
        for slot in range(len(scene.objects)):
            stated = {a: labels[f"{a}{slot}"] for a in ("shape", "color", "size", "position")}
            # Each slot describes one of the scene's objects (variants may name them in reverse order).
            matches = [
                obj
                for obj in scene.objects
                if all(value in (UNSPECIFIED, getattr(obj, a)) for a, value in stated.items())
            ]
            assert matches, (text, stated)
            unspecified += sum(value == UNSPECIFIED for value in stated.values())
    assert unspecified > 50  # the variants do leave attributes out


def test_empty_caption_says_nothing_and_bad_captions_are_refused() -> None:
    labels = caption_labels("")
    assert labels["background"] == UNSPECIFIED
    assert {value for key, value in labels.items() if key != "background"} == {NONE}
    assert label_indices(["", "a small red circle at the top"]).shape == (2, 11)
    with pytest.raises(ValueError, match="shape"):
        caption_labels("a small red blob at the top")


@pytest.fixture()
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(zoo.runs, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(zoo.resume, "PACKS_DIR", tmp_path / "packs")
    return tmp_path


def _stage(*argv: str) -> None:
    root = logging.getLogger()
    before, threads = list(root.handlers), torch.get_num_threads()
    try:
        train.main([*argv, "--preset", "micro", "--threads", "1"])
    finally:
        for handler in root.handlers[len(before) :]:
            root.removeHandler(handler)
            handler.close()
        torch.set_num_threads(threads)


def test_frozen_pretrained_text_encoder_and_a_resume_from_a_pack(runs: Path) -> None:
    common = ["--run", "m"]
    _stage("tokenizer", *common)
    _stage("data", *common, "--n-scenes", "24", "--n-eval", "4")
    _stage("vae", *common, "--vae-steps", "2", "--vae-batch-size", "4")
    _stage("latents", *common)
    _stage("text", *common, "--text-steps", "3")
    unet_args = [
        *common,
        "--text-init",
        "text",
        "--text-lr-mult",
        "0",
        "--batch-size",
        "4",
        "--steps",
        "6",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "2",
        "--log-every",
        "2",
    ]
    _stage("unet", *unet_args, "--stop-after", "4")
    run = runs / "runs" / "m"
    state = load_checkpoint(latest_checkpoint(run / "unet"))
    pretrained = load_checkpoint_text(run)
    assert state["step"] == 4
    for key, value in pretrained.items():
        torch.testing.assert_close(state["text_encoder"][key], value, rtol=0, atol=0)  # frozen

    # Pack, then lay the pack out as a new run on a "fresh machine" and continue the schedule.
    _stage("pack", *common, "--pack", "p")
    _stage("unpack", "--run", "fresh", "--pack", "p")
    fresh = runs / "runs" / "fresh"
    assert load_checkpoint(latest_checkpoint(fresh / "unet"))["step"] == 4
    # The curves travel with the weights: the fresh run starts from the first machine's metrics.
    assert (fresh / "unet" / "metrics.jsonl").read_text() == (run / "unet" / "metrics.jsonl").read_text()
    _stage("data", "--run", "fresh", "--n-scenes", "24", "--n-eval", "4")
    _stage("latents", "--run", "fresh")
    _stage("unet", *unet_args[2:], "--run", "fresh", "--resume")
    resumed = load_checkpoint(latest_checkpoint(fresh / "unet"))
    assert resumed["step"] == 6
    steps = [json.loads(line)["step"] for line in (fresh / "unet" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] <= 2 and steps[-1] == 6, steps
    assert "optimizer" in resumed
    changed = [not torch.equal(resumed["unet"][k], state["unet"][k]) for k in state["unet"]]
    assert any(changed)
    for key, value in pretrained.items():
        torch.testing.assert_close(resumed["text_encoder"][key], value, rtol=0, atol=0)


def load_checkpoint_text(run: Path) -> dict[str, torch.Tensor]:
    """The pre-trained text encoder's weights as the text stage saved them."""
    from safetensors.torch import load_file

    return load_file(str(run / "text" / "final" / "model.safetensors"))
