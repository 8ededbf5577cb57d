"""Train the tiny InstructPix2Pix model: ``python zoo/train_ip2p.py <stage> --run ip2p``.

Stages (each seeded; ``train`` resumes with ``--resume``):

    data    render (input, instruction, edited) triples from ShapesWorld (zoo/ip2p_data.py), cache the
            base VAE's posterior means of both images and the frozen text encoder's hidden states of
            every distinct instruction
    train   fine-tune an 8-input-channel UNet initialised from zoo/shapes-sd-tiny's UNet
    export  write zoo/shapes-ip2p-tiny/ (StableDiffusionInstructPix2PixPipeline layout) and its card

As in Brooks et al. (2023): the UNet's conv_in gets 4 extra input channels for the (unscaled) VAE latent
of the input image, zero-initialised so training starts from the base model; the text encoder and VAE
stay frozen; conditioning dropout drops the instruction for 5% of examples, the image for 5% and both
for 5%, so one model learns the three scores that the two guidance scales combine. The image latent is
the VAE posterior mean without ``scaling_factor``, exactly what ``StableDiffusionInstructPix2PixPipeline``
concatenates. Objective, timestep sampling, p2 weighting, EMA, schedule and checkpoints are the base
stage's (zoo/train_unet.py, zoo/runs.py).

Runs live in zoo/_runs/<name>/ (git-ignored); log in train.log, metrics in ip2p/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see zoo/train.py
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from contract.domains import folder_domain, mark  # noqa: E402
from zoo.configs import count_parameters  # noqa: E402
from zoo.data import encode_latents  # noqa: E402
from zoo.export import read_metrics  # noqa: E402
from zoo.ip2p_data import render_triples  # noqa: E402
from zoo.runs import (  # noqa: E402
    Ema,
    MetricsLog,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_state,
    run_dir,
    save_checkpoint,
    warmup_cosine_lr,
)
from zoo.train_unet import alphas_cumprod, loss_weights, sample_timesteps  # noqa: E402

logger = logging.getLogger("zoo.train_ip2p")
BASE_MODEL = REPO_ROOT / "zoo" / "shapes-sd-tiny"
DEFAULT_OUT = REPO_ROOT / "zoo" / "shapes-ip2p-tiny"
EVAL_SEED_OFFSET = 1_000_003
EVAL_TIMESTEPS = (200, 500, 800)
EVAL_COLUMNS = ("eval_both", "eval_no_text", "eval_no_image", "eval_wrong_text")


@dataclass(frozen=True)
class Ip2pTrainParams:
    """Optimisation settings of the InstructPix2Pix fine-tuning."""

    steps: int = 1500
    batch_size: int = 48
    lr: float = 5e-4
    conv_in_lr_mult: float = 1.0  # the zero-initialised image channels live in conv_in
    warmup: int = 100
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    dropout: float = 0.05  # each of: text only, image only, both (Brooks et al. sec. 3.2.1)
    high_t_fraction: float = 0.25
    loss_weighting: str = "p2"
    ema_decay: float = 0.998
    checkpoint_every: int = 100
    eval_every: int = 250
    log_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= 3 * self.dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1/3], got {self.dropout}")


def read_manifest(run: Path) -> dict[str, Any]:
    """The run's manifest (empty if new)."""
    path = run / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(run: Path, manifest: dict[str, Any]) -> None:
    """Persist the manifest."""
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def eight_channel_unet(base: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy of ``base`` whose conv_in takes 8 channels: the first 4 keep the base weights, the extra 4
    (the input image's latent) start at zero, so the new model initially equals the base model."""
    config = dict(base.config)
    config["in_channels"] = 2 * base.config.in_channels
    unet = UNet2DConditionModel.from_config(config)
    state = base.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)
    unet.load_state_dict(state)
    return unet


@torch.no_grad()
def embed_texts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Frozen text-encoder hidden states (T, L, D) of ``texts``, padded to the tokenizer's length."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    if ids.input_ids.shape[1] > tokenizer.model_max_length:
        raise ValueError("an instruction is longer than the tokenizer's max length")
    text_encoder.eval()
    return text_encoder(ids.input_ids)[0]


def stage_data(run: Path, args: argparse.Namespace) -> None:
    """Render triples (train and a held-out eval set), cache latents and instruction embeddings."""
    base = Path(args.base)
    vae = AutoencoderKL.from_pretrained(str(base / "vae"))
    tokenizer = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(base / "text_encoder"))
    cache: dict[str, Any] = {}
    for name, count, seed in (
        ("train", args.n_triples, args.data_seed),
        ("eval", args.n_eval, args.data_seed + EVAL_SEED_OFFSET),
    ):
        tick = time.monotonic()
        triples = render_triples(count, seed)
        texts = sorted(set(triples.instructions))
        lookup = {text: i for i, text in enumerate(texts)}
        cache[name] = {
            "source": encode_latents(vae, triples.sources),  # unscaled: the pipeline's image latent
            "target": encode_latents(vae, triples.targets) * vae.config.scaling_factor,
            "text_index": torch.tensor([lookup[text] for text in triples.instructions]),
            "texts": texts,
            "hidden": embed_texts(text_encoder, tokenizer, texts),
            "edits": triples.edits,
        }
        logger.info(
            "%s: %d triples, %d distinct instructions, %.1f s", name, count, len(texts), time.monotonic() - tick
        )
        if name == "train":
            examples = [f"{e}: {t}" for e, t in zip(triples.edits[:8], triples.instructions[:8], strict=True)]
    cache["empty_hidden"] = embed_texts(text_encoder, tokenizer, [""])[0]
    torch.save(cache, run / "triples.pt")
    manifest = read_manifest(run)
    manifest["data"] = {
        "n_triples": args.n_triples,
        "n_eval": args.n_eval,
        "seed": args.data_seed,
        "distinct_instructions": len(cache["train"]["texts"]),
        "examples": examples,
        "base": str(base.relative_to(REPO_ROOT)) if base.is_relative_to(REPO_ROOT) else str(base),
    }
    write_manifest(run, manifest)


def ip2p_loss(
    unet: UNet2DConditionModel,
    target: torch.Tensor,
    source: torch.Tensor,
    hidden: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    alpha_bar: torch.Tensor,
) -> torch.Tensor:
    """Per-sample epsilon MSE (B,): noisy target latent concatenated with the input image latent."""
    scale = alpha_bar[timesteps].view(-1, 1, 1, 1)
    noisy = scale.sqrt() * target + (1 - scale).sqrt() * noise
    prediction = unet(torch.cat([noisy, source], dim=1), timesteps, hidden).sample
    return (prediction - noise).pow(2).flatten(1).mean(1)


@torch.no_grad()
def conditioning_gaps(
    unet: UNet2DConditionModel, data: dict[str, Any], empty: torch.Tensor, alpha_bar: torch.Tensor
) -> dict[str, float]:
    """Held-out loss with both conditions, without the instruction, without the image, with a wrong one."""
    unet.eval()
    count = len(data["target"])
    generator = torch.Generator().manual_seed(1234)
    timesteps = torch.tensor(EVAL_TIMESTEPS).repeat_interleave(count)
    noise = torch.randn(len(timesteps), *data["target"].shape[1:], generator=generator)
    target = data["target"].repeat(len(EVAL_TIMESTEPS), 1, 1, 1)
    source = data["source"].repeat(len(EVAL_TIMESTEPS), 1, 1, 1)
    hidden = data["hidden"][data["text_index"]].repeat(len(EVAL_TIMESTEPS), 1, 1)
    variants = {
        "both": (source, hidden),
        "no_text": (source, empty.expand_as(hidden)),
        "no_image": (torch.zeros_like(source), hidden),
        "wrong_text": (source, hidden.roll(1, dims=0)),
    }
    result = {
        f"eval_{name}": ip2p_loss(unet, target, s, h, timesteps, noise, alpha_bar).mean().item()
        for name, (s, h) in variants.items()
    }
    unet.train()
    return result


def stage_train(run: Path, args: argparse.Namespace) -> None:
    """Fine-tune the 8-channel UNet on the cached triples (resumable)."""
    params = Ip2pTrainParams(
        seed=args.seed,
        **{
            k: v
            for k, v in vars(args).items()
            if k in Ip2pTrainParams.__dataclass_fields__ and k != "seed" and v is not None
        },
    )
    manifest = read_manifest(run)
    manifest.setdefault("train", {})[args.stage_dir] = {**asdict(params), "init_from": args.init_from}
    write_manifest(run, manifest)
    cache = torch.load(run / "triples.pt", weights_only=True)
    train, held_out, empty = cache["train"], cache["eval"], cache["empty_hidden"]
    torch.manual_seed(params.seed)
    unet = eight_channel_unet(UNet2DConditionModel.from_pretrained(str(Path(args.base) / "unet")))
    if args.init_from:  # a later phase: the raw weights of another stage's checkpoint, fresh optimizer and EMA
        unet.load_state_dict(load_checkpoint(run / args.init_from)["unet"])
        logger.info("initialised from %s", args.init_from)
    unet.train()
    logger.info("UNet %d params, %d triples", count_parameters(unet), len(train["target"]))
    conv_in = list(unet.conv_in.parameters())
    groups = [
        {"params": conv_in, "base_lr": params.lr * params.conv_in_lr_mult},
        {"params": [p for n, p in unet.named_parameters() if not n.startswith("conv_in.")], "base_lr": params.lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)
    modules = {"unet": unet}
    ema = Ema(modules, params.ema_decay)
    numpy_rng = np.random.default_rng([params.seed, 5])
    generator = torch.Generator().manual_seed(params.seed)
    alpha_bar = alphas_cumprod()
    out_dir = run / args.stage_dir
    start_step, wall_s = 0, 0.0
    checkpoint_path = latest_checkpoint(out_dir) if args.resume else None
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path)
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        restore_rng(state["rng"], numpy_rng, generator)
        start_step, wall_s = state["step"], state["wall_s"]
        logger.info("resumed from %s at step %d", checkpoint_path, start_step)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out_dir / "metrics.jsonl", "ip2p")
    n_train = len(train["target"])
    last_step = params.steps if args.stop_after is None else min(params.steps, args.stop_after)
    tick, running, counted = time.monotonic(), 0.0, 0
    for step in range(start_step, last_step):
        # 1. A batch with conditioning dropout: p < d text dropped, d <= p < 2d image, 2d <= p < 3d both.
        index = torch.from_numpy(numpy_rng.integers(0, n_train, params.batch_size))
        p = torch.from_numpy(numpy_rng.random(params.batch_size))
        drop_text = (p < params.dropout) | ((p >= 2 * params.dropout) & (p < 3 * params.dropout))
        drop_image = p >= params.dropout
        drop_image &= p < 3 * params.dropout
        hidden = torch.where(drop_text[:, None, None], empty[None], train["hidden"][train["text_index"][index]])
        source = torch.where(drop_image[:, None, None, None], 0.0, train["source"][index])
        timesteps = sample_timesteps(params.batch_size, params.high_t_fraction, generator)
        noise = torch.randn(params.batch_size, *train["target"].shape[1:], generator=generator)
        # 2. Weighted epsilon loss, clipped AdamW step, EMA.
        per_sample = ip2p_loss(unet, train["target"][index], source, hidden, timesteps, noise, alpha_bar)
        loss = (per_sample * loss_weights(timesteps, alpha_bar, params.loss_weighting)).mean()
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, group["base_lr"], params.warmup, params.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), params.grad_clip)
        optimizer.step()
        ema.update(modules, step)
        running, counted = running + loss.item(), counted + 1
        # 3. Log, evaluate, checkpoint.
        done = step + 1
        if done % params.log_every == 0 or done == last_step:
            now = time.monotonic()
            wall_s, tick = wall_s + now - tick, now
            values = {"loss": running / counted, "wall_s": wall_s}
            running, counted = 0.0, 0
            if done % params.eval_every == 0 or done == last_step:
                values.update(conditioning_gaps(unet, held_out, empty, alpha_bar))
            metrics.write(done, **values)
        if done % params.checkpoint_every == 0 or done == last_step:
            now = time.monotonic()
            wall_s, tick = wall_s + now - tick, now
            state = {
                "unet": unet.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.shadow,
                "rng": rng_state(numpy_rng, generator),
                "wall_s": wall_s,
            }
            save_checkpoint(out_dir, done, state)


def assemble_pipeline(
    run: Path, base: Path, use_ema: bool = True, stage_dir: str = "ip2p"
) -> tuple[StableDiffusionInstructPix2PixPipeline, int]:
    """The stock InstructPix2Pix pipeline from the newest checkpoint and the base model's other parts."""
    checkpoint_path = latest_checkpoint(run / stage_dir)
    if checkpoint_path is None:
        raise FileNotFoundError(f"no checkpoint in {run / stage_dir}")
    state = load_checkpoint(checkpoint_path)
    unet = eight_channel_unet(UNet2DConditionModel.from_pretrained(str(base / "unet")))
    ema = {key[len("unet.") :]: value for key, value in state["ema"].items() if key.startswith("unet.")}
    weights = ema if use_ema else state["unet"]
    unet.load_state_dict(weights)
    pipeline = StableDiffusionInstructPix2PixPipeline(
        vae=AutoencoderKL.from_pretrained(str(base / "vae")),
        text_encoder=CLIPTextModel.from_pretrained(str(base / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(str(base / "tokenizer")),
        unet=unet,
        scheduler=DDIMScheduler.from_pretrained(str(base / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipeline, int(state["step"])


def phases(manifest: dict[str, Any], stage_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """The training stages that made ``stage_dir``'s weights, first to last, following ``init_from``."""
    stages = manifest.get("train", {})
    chain: list[tuple[str, dict[str, Any]]] = []
    current: str | None = stage_dir
    while current is not None and current in stages:
        chain.insert(0, (current, stages[current]))
        init_from = stages[current].get("init_from")
        current = init_from.split("/")[0] if init_from else None
    return chain


def phase_lines(run: Path, chain: list[tuple[str, dict[str, Any]]], last_step: int) -> tuple[str, str]:
    """Model-card bullets per phase and the diagnostic table rows."""
    bullets, rows = [], []
    for index, (name, params) in enumerate(chain):
        records = read_metrics(run / name / "metrics.jsonl")
        if index + 1 < len(chain):  # an earlier phase: up to the checkpoint the next one started from
            start = str(chain[index + 1][1]["init_from"])
            stop = int(start.rsplit("-", 1)[-1].split(".")[0])
        else:
            stop = last_step
        kept = [r for r in records if r["step"] <= stop]
        losses = [r for r in kept if "loss" in r]
        wall = f"{losses[-1]['wall_s'] / 60:.1f} min" if losses else "n/a"
        loss = f"{losses[-1]['loss']:.4f}" if losses else "n/a"
        origin = (
            f" from `{params['init_from']}` (raw weights, fresh optimizer and EMA)" if params.get("init_from") else ""
        )
        if params.get("conv_in_lr_mult", 1.0) != 1.0:
            origin += (
                f", conv_in at {params['conv_in_lr_mult']}x the learning rate (its zero-initialised image channels "
                "had barely moved at the base rate)"
            )
        settings = ", ".join(f"`{k}={v}`" for k, v in params.items() if k != "init_from")
        bullets.append(
            f"- Phase {index + 1} (`{name}`){origin}: {stop} steps of a {params.get('steps')}-step schedule, "
            f"batch {params.get('batch_size')}, one CPU thread, wall {wall}, last training loss {loss} "
            f"(p2-weighted epsilon MSE). Settings: {settings}."
        )
        rows += [
            "| {} {} | {} |".format(name, r["step"], " | ".join(f"{r[k]:.4f}" for k in EVAL_COLUMNS))
            for r in kept
            if "eval_both" in r
        ]
    return "\n".join(bullets), "\n".join(rows)


def model_card(run: Path, manifest: dict[str, Any], stage_dir: str, step: int) -> str:
    """README.md of the exported model."""
    data = manifest.get("data", {})
    bullets, rows = phase_lines(run, phases(manifest, stage_dir), step)
    commands = "\n".join(manifest.get("commands", []))
    examples = "\n".join(f"- {e}" for e in data.get("examples", []))
    return f"""# shapes-ip2p-tiny

A tiny InstructPix2Pix model (Brooks et al. 2023) for ShapesWorld, fine-tuned by `zoo/train_ip2p.py` from
`zoo/shapes-sd-tiny`: its UNet takes 8 input channels (the noisy latent and the input image's VAE latent),
initialised from the base UNet with the 4 extra conv_in channels at zero. VAE, text encoder, tokenizer and
scheduler are the base model's, unchanged (frozen during training). Load it with stock diffusers:

```python
StableDiffusionInstructPix2PixPipeline.from_pretrained("zoo/shapes-ip2p-tiny", safety_checker=None)
```

## Data

{data.get("n_triples", "?")} (input, instruction, edited) triples rendered exactly from ShapesWorld
(`zoo/ip2p_data.py`, seed {data.get("seed", "?")}): recolour, reshape, resize and change background, one
attribute of a train-split scene changed, with template variety ({data.get("distinct_instructions", "?")}
distinct instructions). Held-out shapes, fills and attribute combinations never appear in input or output.
Examples:

{examples}

## Training

Commands (from the repository root, in the order run; a stopped command was resumed or followed by a
new phase):

```
{commands}
```

{bullets}
- Conditioning dropout (Brooks et al. sec. 3.2.1): instruction only, image only, both, each 5%.
- Exported: step {step} of the last phase, exponential-moving-average weights, fp32 safetensors.

### Conditioning diagnostic

Held-out epsilon MSE (raw weights, t in {EVAL_TIMESTEPS}, fixed noise) with instruction and image (both),
without the instruction, without the image (zero latent), and with another triple's instruction.

| phase, step | both | no text | no image | wrong text |
| --- | --- | --- | --- | --- |
{rows}
"""


def stage_export(run: Path, args: argparse.Namespace) -> None:
    """Write the diffusers directory and the model card."""
    out = Path(args.out)
    pipeline, step = assemble_pipeline(run, Path(args.base), use_ema=not args.no_ema, stage_dir=args.stage_dir)
    if out.exists():
        shutil.rmtree(out)
    pipeline.save_pretrained(str(out), safe_serialization=True)
    shutil.rmtree(out / "tokenizer")  # the base model's tokenizer files verbatim (vocab.json and merges.txt too)
    shutil.copytree(Path(args.base) / "tokenizer", out / "tokenizer")
    (out / "README.md").write_text(model_card(run, read_manifest(run), args.stage_dir, step))
    mark(out, folder_domain(Path(args.base)))
    logger.info("exported step %d to %s", step, out)


STAGES = {"data": stage_data, "train": stage_train, "export": stage_export}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line: one stage and its options; unset training options keep the dataclass defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--run", default="ip2p")
    parser.add_argument("--stage-dir", default="ip2p", help="subdirectory of the training stage (phases, A/B runs)")
    parser.add_argument("--init-from", default=None, help="train: start from this checkpoint (path in the run)")
    parser.add_argument("--base", default=str(BASE_MODEL))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--n-triples", type=int, default=20000)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--no-ema", action="store_true")
    for name, field in Ip2pTrainParams.__dataclass_fields__.items():
        if name != "seed":
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=None)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    """Run one stage."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    run = run_dir(args.run)
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    manifest = read_manifest(run)
    manifest.setdefault("commands", []).append("python zoo/train_ip2p.py " + shlex.join(argv))
    write_manifest(run, manifest)
    STAGES[args.stage](run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
