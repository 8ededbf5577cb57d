"""Export a zoo run as a stock diffusers ``StableDiffusionPipeline`` directory plus a model card."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, StableDiffusionPipeline
from transformers import CLIPTokenizer

from zoo.configs import (
    ZooConfig,
    build_scheduler,
    build_text_encoder,
    build_unet,
    count_parameters,
    latent_size,
)
from zoo.runs import latest_checkpoint, load_checkpoint

logger = logging.getLogger(__name__)


def assemble_pipeline(run: Path, unet_dir: str = "unet", use_ema: bool = True) -> tuple[StableDiffusionPipeline, int]:
    """Build the pipeline from ``run``'s trained VAE and newest UNet checkpoint; returns it and its step."""
    manifest = json.loads((run / "manifest.json").read_text())
    config = ZooConfig.from_dict(manifest["config"])
    tokenizer = CLIPTokenizer.from_pretrained(str(run / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(run / "vae" / "final"))
    text_encoder = build_text_encoder(
        config.text, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    unet = build_unet(config.unet, config.text.hidden_size, latent_size(config.vae))
    checkpoint_path = latest_checkpoint(run / unet_dir)
    if checkpoint_path is None:
        raise FileNotFoundError(f"no UNet checkpoint in {run / unet_dir}")
    state = load_checkpoint(checkpoint_path)
    if use_ema:
        ema = state["ema"]
        unet.load_state_dict({key[5:]: value for key, value in ema.items() if key.startswith("unet.")})
        text_encoder.load_state_dict({key[13:]: value for key, value in ema.items() if key.startswith("text_encoder.")})
    else:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipeline, int(state["step"])


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (empty if missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_commands(commands: list[str], unet_dir: str) -> list[str]:
    """The recorded commands that made this export: data and VAE stages, and the UNet stage of ``unet_dir``."""
    kept = []
    for command in commands:
        words = shlex.split(command)
        stage = words[2] if len(words) > 2 else ""
        chosen_dir = words[words.index("--unet-dir") + 1] if "--unet-dir" in words else "unet"
        if stage in ("tokenizer", "data", "vae", "latents", "all") or (stage == "unet" and chosen_dir == unet_dir):
            kept.append(command)
    return kept


def model_card(
    unet_dir: str,
    pipeline: StableDiffusionPipeline,
    manifest: dict[str, Any],
    unet_step: int,
    vae_metrics: list[dict[str, Any]],
    unet_metrics: list[dict[str, Any]],
    use_ema: bool,
) -> str:
    """Markdown model card: architecture, data, training commands, steps, wall time, losses."""
    unet_metrics = [record for record in unet_metrics if record["step"] <= unet_step]
    last_vae = vae_metrics[-1] if vae_metrics else {}
    evals = [record for record in unet_metrics if "gap" in record]
    last_eval = evals[-1] if evals else {}
    last_loss = unet_metrics[-1] if unet_metrics else {}
    vae_psnr = [record["eval_psnr"] for record in vae_metrics if "eval_psnr" in record]
    components = {
        "unet": pipeline.unet,
        "text_encoder": pipeline.text_encoder,
        "vae": pipeline.vae,
    }
    rows = "\n".join(
        f"| {name} | {type(module).__name__} | {count_parameters(module):,} |" for name, module in components.items()
    )
    shown = {r["step"]: r for r in evals[:: max(1, len(evals) // 8)] + evals[-1:]}
    gap_rows = "\n".join(
        f"| {r['step']} | {r['eval_cond']:.4f} | {r['eval_uncond']:.4f} | {r['eval_wrong']:.4f} "
        f"| {100 * r['gap']:.1f}% | {100 * r['gap_wrong']:.1f}% | {100 * r['gap_high']:.1f}% "
        f"| {100 * r['gap_wrong_high']:.1f}% |"
        for r in shown.values()
    )
    commands = "\n".join(training_commands(manifest.get("commands", []), unet_dir))
    final_loss = last_loss.get("loss", float("nan"))
    settings = manifest.get(unet_dir, {})
    settings_text = ", ".join(f"`{key}={value}`" for key, value in settings.items())
    data = manifest.get("data", {})

    def final_gap(key: str) -> str:
        return f"{100 * last_eval[key]:.1f}%" if key in last_eval else "n/a"

    text_config, unet_config = pipeline.text_encoder.config, pipeline.unet.config
    return f"""# shapes-sd-tiny

A tiny text-to-image latent diffusion model in the exact Stable Diffusion 1.5 layout, trained from
scratch by `zoo/train.py` on ShapesWorld (`models/shapes/world.py`): 64x64 images of one or two
coloured shapes with captions. It exists so every Atelier method can run and be measured on a CPU.
Load it with stock diffusers:

```python
StableDiffusionPipeline.from_pretrained("zoo/shapes-sd-tiny", safety_checker=None)
```

## Architecture

| component | class | parameters |
| --- | --- | --- |
{rows}

- VAE: 64x64x3 -> 16x16x4 latents (block_out_channels {list(pipeline.vae.config.block_out_channels)}),
  `scaling_factor` {pipeline.vae.config.scaling_factor:.5f} (1 / std of the training latents).
- Tokenizer: CLIP-format byte-level BPE built from the world's vocabulary; every world word is one
  token ("two-tone" is `two - tone`, as CLIP splits hyphens), other words fall back to byte tokens;
  `model_max_length` {pipeline.tokenizer.model_max_length}.
- Text encoder: CLIPTextModel, hidden {text_config.hidden_size}, {text_config.num_hidden_layers} layers, \
{text_config.num_attention_heads} heads.
- UNet: block_out_channels {list(unet_config.block_out_channels)}, {", ".join(unet_config.down_block_types)} \
(cross-attention at 16x16, 8x8 and in the 4x4 mid block), cross-attention dim {unet_config.cross_attention_dim}.
- Scheduler: SD 1.5's DDIM configuration (scaled_linear 0.00085..0.012, 1000 steps, epsilon).
- Weights: fp32 safetensors{", exponential moving average" if use_ema else ""}.

## Training

Commands (in order, from the repository root):

```
{commands}
```

- Data: {data.get("n_scenes", "?")} training scenes (seed {data.get("seed", "?")}), {data.get("n_variants", "?")} \
captions each (the canonical one first, then template variants); held-out concepts excluded; a
separate held-out set of {data.get("n_eval", "?")} scenes for the diagnostic below.
- VAE: {last_vae.get("step", "?")} steps of batch {manifest.get("vae", {}).get("batch_size", "?")}, \
wall {last_vae.get("wall_s", 0) / 60:.1f} min, final loss {last_vae.get("loss", float("nan")):.4f}, \
held-out PSNR {vae_psnr[-1] if vae_psnr else float("nan"):.1f} dB.
- UNet + text encoder: {unet_step} of {settings.get("steps", "?")} steps of batch {settings.get("batch_size", "?")}, \
wall {last_loss.get("wall_s", 0) / 60:.1f} min, final training loss {final_loss:.4f}.
- Settings: {settings_text}.
- Training-only choices (none changes the layout or how the model samples): the UNet trains on cached
VAE posterior means; the canonical caption is used {settings.get("canonical_fraction", "?")} of the time and
the empty one {settings.get("caption_dropout", "?")} of the time (classifier-free guidance); \
{settings.get("high_t_fraction", "?")} of each batch draws t from the noisier half, where the caption decides the
composition; loss weighting `{settings.get("loss_weighting", "?")}`; the text encoder, which starts from nothing, \
learns {settings.get("text_lr_mult", "?")}x faster; AdamW with warmup and cosine decay, gradient clipping, EMA.

### Conditioning diagnostic

Held-out epsilon-MSE with the right caption (cond), the empty caption (uncond) and another scene's
caption (wrong), at fixed timesteps 50..950 and fixed noise, raw (not EMA) weights. gap is
(uncond - cond) / uncond, gap wrong (wrong - cond) / uncond; "high" restricts to t >= 650.

| step | cond | uncond | wrong | gap | gap wrong | gap high | gap wrong high |
| --- | --- | --- | --- | --- | --- | --- | --- |
{gap_rows}

Final: gap {final_gap("gap")} overall, {final_gap("gap_high")} at high noise; against a wrong caption \
{final_gap("gap_wrong_high")} at high noise.

## Quality

Measured by `bench/` against the ShapesWorld oracle (to be filled in from the bench results).
"""


def export_run(run: Path, out_dir: Path, unet_dir: str = "unet", use_ema: bool = True) -> Path:
    """Write the diffusers directory and README.md for run ``run`` into ``out_dir`` (replaced atomically)."""
    pipeline, unet_step = assemble_pipeline(run, unet_dir, use_ema)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    pipeline.save_pretrained(str(staging), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep CLIP's own files too, as SD 1.5 ships them.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(run / "tokenizer" / name, staging / "tokenizer" / name)
    manifest = json.loads((run / "manifest.json").read_text())
    card = model_card(
        unet_dir,
        pipeline,
        manifest,
        unet_step,
        read_metrics(run / "vae" / "metrics.jsonl"),
        read_metrics(run / unet_dir / "metrics.jsonl"),
        use_ema,
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
    # Check the stock loader accepts what we wrote before replacing the old export.
    StableDiffusionPipeline.from_pretrained(str(staging), safety_checker=None)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.replace(out_dir)
    logger.info("exported %s (UNet step %d) to %s", run, unet_step, out_dir)
    return out_dir
