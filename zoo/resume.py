"""A UNet run that spans machines: pack what a resume needs into the repository, and unpack it.

A full checkpoint (weights, EMA, AdamW moments, random states) of the tiny UNet is ~55 MB; committing
one every session would outgrow the repository. The pack keeps what cannot be recomputed cheaply:

    zoo/checkpoints/<name>/
        state.json                 step, training wall time, the run's manifest (sizes, seeds, settings)
        weights.safetensors        raw UNet and text-encoder weights, float32 (training continues from them)
        ema.safetensors            their exponential moving average, float16 (what export ships)
        vae/ tokenizer/            the run's AutoencoderKL and tokenizer (the latents are recomputed)
        text/                      the pre-trained text encoder, when the run used one
        logs/                      the UNet stage's metrics.jsonl and probe.jsonl (its curves), when present

Left out and rebuilt on unpack: the rendered data and cached latents (pure functions of the seeds and
the VAE: ``train.py data`` and ``train.py latents``), the AdamW moments (re-estimated; the UNet stage
re-warms its learning rate over ``REWARM_STEPS`` after a resume without them) and the random states
(re-seeded from the seed and the step). So a resumed run is not bit-identical to an uninterrupted one,
but it continues the same schedule from the same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from zoo.runs import latest_checkpoint, load_checkpoint, save_checkpoint

PACKS_DIR = Path(__file__).resolve().parent / "checkpoints"
COPIED = ("vae/final", "tokenizer", "text/final")
LOGS = ("metrics.jsonl", "probe.jsonl")


def pack(run: Path, unet_dir: str, name: str) -> Path:
    """Write the newest checkpoint of ``run/unet_dir`` as ``zoo/checkpoints/<name>``; returns the folder."""
    path = latest_checkpoint(run / unet_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run / unet_dir}")
    state = load_checkpoint(path)
    out = PACKS_DIR / name
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    raw = {f"unet.{k}": v for k, v in state["unet"].items()}
    raw.update({f"text_encoder.{k}": v for k, v in state["text_encoder"].items()})
    save_file({k: v.contiguous() for k, v in raw.items()}, str(partial / "weights.safetensors"))
    ema = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state["ema"].items()}
    save_file(ema, str(partial / "ema.safetensors"))
    for relative in COPIED:
        if (run / relative).exists():
            shutil.copytree(run / relative, partial / relative.split("/")[0])
    for log in LOGS:
        kept = out / "logs" / log  # a run unpacked from this pack holds these records already, then its own
        if (run / unet_dir / log).exists():
            (partial / "logs").mkdir(exist_ok=True)
            shutil.copy(run / unet_dir / log, partial / "logs" / log)
        elif kept.exists():
            (partial / "logs").mkdir(exist_ok=True)
            shutil.copy(kept, partial / "logs" / log)
    manifest = json.loads((run / "manifest.json").read_text())
    info = {"unet_dir": unet_dir, "step": state["step"], "wall_s": state["wall_s"], "manifest": manifest}
    (partial / "state.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)
    return out


def unpack(name: str, run: Path) -> dict[str, Any]:
    """Lay a pack out as run ``run``: manifest, tokenizer, VAE, text encoder and a resumable UNet checkpoint.

    Afterwards ``train.py data`` and ``train.py latents`` rebuild the data, and ``train.py unet --resume``
    with the same ``--unet-dir`` continues. Returns the pack's state.json.
    """
    source = PACKS_DIR / name
    info = json.loads((source / "state.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    (run / "manifest.json").write_text(json.dumps(info["manifest"], indent=2) + "\n")
    for relative in COPIED:
        folder = source / relative.split("/")[0]
        if folder.exists():
            shutil.rmtree(run / relative, ignore_errors=True)
            shutil.copytree(folder, run / relative)
    (run / info["unet_dir"]).mkdir(parents=True, exist_ok=True)
    for log in LOGS:
        if (source / "logs" / log).exists():
            shutil.copy(source / "logs" / log, run / info["unet_dir"] / log)
    weights = load_file(str(source / "weights.safetensors"))
    ema = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(source / "ema.safetensors")).items()}
    save_checkpoint(
        run / info["unet_dir"],
        info["step"],
        {
            "unet": {k[len("unet.") :]: v for k, v in weights.items() if k.startswith("unet.")},
            "text_encoder": {k[len("text_encoder.") :]: v for k, v in weights.items() if k.startswith("text_encoder.")},
            "ema": ema,
            "wall_s": info["wall_s"],
        },
    )
    return info


def has_moments(state: dict[str, Any]) -> bool:
    """Whether a checkpoint carries the optimizer and random states (a local one) or not (an unpacked pack)."""
    return "optimizer" in state and "rng" in state


def reseeded(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Fresh random sources for a resume without saved random states, a function of seed and step."""
    return np.random.default_rng([seed, 3, step]), torch.Generator().manual_seed(seed * 1_000_003 + step)
