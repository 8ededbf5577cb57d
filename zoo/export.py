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

from contract.domains import mark
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


def assemble_pipeline(
    run: Path, unet_dir: str = "unet", use_ema: bool = True
) -> tuple[StableDiffusionPipeline, int, float]:
    """Build the pipeline from ``run``'s trained VAE and newest UNet checkpoint; returns it, its step and the
    UNet stage's training wall time in seconds."""
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
    return pipeline, int(state["step"]), float(state.get("wall_s", 0.0))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (empty if missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_commands(commands: list[str], unet_dir: str, manifest_keys: set[str]) -> list[str]:
    """The recorded commands that made this export: data and VAE stages, and the UNet stage of ``unet_dir``."""
    kept: list[str] = []
    for command in commands:
        words = shlex.split(command)
        stage = words[2] if len(words) > 2 else ""
        chosen_dir = words[words.index("--unet-dir") + 1] if "--unet-dir" in words else "unet"
        vae_dir = words[words.index("--vae-dir") + 1] if "--vae-dir" in words else "vae"
        if stage == "vae" and vae_dir not in manifest_keys:
            continue  # a VAE stage that was stopped and not kept
        wanted = stage in ("tokenizer", "data", "vae", "latents", "text", "all") or (
            stage == "unet" and chosen_dir == unet_dir
        )
        # A run continued on a fresh machine repeats data, latents and the resumed command: list each once.
        if wanted and command not in kept:
            kept.append(command)
    return kept


def model_card(
    unet_dir: str,
    pipeline: StableDiffusionPipeline,
    manifest: dict[str, Any],
    unet_step: int,
    unet_wall_s: float,
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
    commands = "\n".join(training_commands(manifest.get("commands", []), unet_dir, {"vae", *manifest}))
    loss_text = f", final training loss {last_loss['loss']:.4f}" if "loss" in last_loss else ""
    settings = manifest.get(unet_dir, {})
    settings_text = ", ".join(f"`{key}={value}`" for key, value in settings.items())
    data = manifest.get("data", {})
    fine_tunes = [
        f"`{key}` ({value['steps']} steps of batch {value['batch_size']}, lr {value['lr']:g}, "
        f"{'decoder only' if value.get('decoder_only') else 'whole VAE'}, from `{value['init']}`)"
        for key, value in manifest.items()
        if isinstance(value, dict) and value.get("init") and "kl_weight" in value
    ]
    if last_vae:
        vae_text = (
            f"{last_vae.get('step', '?')} steps of batch {manifest.get('vae', {}).get('batch_size', '?')}, "
            f"wall {last_vae.get('wall_s', 0) / 60:.1f} min, final loss {last_vae.get('loss', float('nan')):.4f}, "
            f"held-out PSNR {vae_psnr[-1] if vae_psnr else float('nan'):.1f} dB."
        )
    else:
        vae_text = "the previous model's VAE, its encoder (so the latent space) unchanged."
    if fine_tunes:
        vae_text += " Fine-tuned in turn, each result becoming the run's VAE: " + "; then ".join(fine_tunes) + "."
    frozen_text = bool(settings.get("text_init")) and settings.get("text_lr_mult") == 0
    if frozen_text:
        text_training = (
            "the text encoder was first trained alone (the `text` stage) to read every attribute the caption "
            "states from its EOS state, then kept frozen while the UNet learned"
        )
    else:
        text_training = (
            f"the text encoder, which starts from nothing, learns {settings.get('text_lr_mult', '?')}x faster"
        )

    def final_gap(key: str) -> str:
        return f"{100 * last_eval[key]:.1f}%" if key in last_eval else "n/a"

    if evals:
        diagnostic = f"""### Conditioning diagnostic

Held-out epsilon-MSE with the right caption (cond), the empty caption (uncond) and another scene's
caption (wrong), at fixed timesteps 50..950 and fixed noise, raw (not EMA) weights. gap is
(uncond - cond) / uncond, gap wrong (wrong - cond) / uncond; "high" restricts to t >= 650.

| step | cond | uncond | wrong | gap | gap wrong | gap high | gap wrong high |
| --- | --- | --- | --- | --- | --- | --- | --- |
{gap_rows}

Final: gap {final_gap("gap")} overall, {final_gap("gap_high")} at high noise; against a wrong caption \
{final_gap("gap_wrong_high")} at high noise.
"""
    else:
        diagnostic = "(The run's metrics up to this step were not carried to the machine that exported it.)\n"
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

(As the run recorded them. Steps taken by hand between them, such as which checkpoint a stage started from, are in
the Atelier repository's `docs/zoo-v2.md`.)

- Data: {data.get("n_scenes", "?")} training scenes (seed {data.get("seed", "?")}), {data.get("n_variants", "?")} \
captions each (the canonical one first, then template variants); held-out concepts excluded; a
separate held-out set of {data.get("n_eval", "?")} scenes for the diagnostic below.
- VAE: {vae_text}
- {"UNet" if frozen_text else "UNet + text encoder"}: {unet_step} of {settings.get("steps", "?")} steps of batch \
{settings.get("batch_size", "?")}, wall {unet_wall_s / 60:.0f} min{loss_text}.
- Settings: {settings_text}.
- Training-only choices (none changes the layout or how the model samples): the UNet trains on cached
VAE posterior means; the canonical caption is used {settings.get("canonical_fraction", "?")} of the time and
the empty one {settings.get("caption_dropout", "?")} of the time (classifier-free guidance); \
{settings.get("high_t_fraction", "?")} of each batch draws t from the noisier half, where the caption decides the
composition; loss weighting `{settings.get("loss_weighting", "?")}`; {text_training}; AdamW with warmup and cosine
decay, gradient clipping, EMA.

{diagnostic}
## Quality

Measured by `make bench-quality` (its `zoo` group) against the ShapesWorld oracle: the figures are in the Atelier
README's benchmark tables and `bench/results/quality-zoo.md`; how this recipe was chosen (ablations, learning curve)
is in `docs/zoo-v2.md`.
"""


def export_run(run: Path, out_dir: Path, unet_dir: str = "unet", use_ema: bool = True) -> Path:
    """Write the diffusers directory and README.md for run ``run`` into ``out_dir`` (replaced atomically)."""
    pipeline, unet_step, unet_wall_s = assemble_pipeline(run, unet_dir, use_ema)
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
        unet_wall_s,
        read_metrics(run / "vae" / "metrics.jsonl"),
        read_metrics(run / unet_dir / "metrics.jsonl"),
        use_ema,
    )
    (staging / "README.md").write_text(card, encoding="utf-8")
    mark(staging, "shapesworld")  # its method defaults and training captions are ShapesWorld's
    # Check the stock loader accepts what we wrote before replacing the old export.
    StableDiffusionPipeline.from_pretrained(str(staging), safety_checker=None)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.replace(out_dir)
    logger.info("exported %s (UNet step %d) to %s", run, unet_step, out_dir)
    return out_dir
