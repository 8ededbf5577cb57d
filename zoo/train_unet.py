"""Jointly train the zoo's ``UNet2DConditionModel`` and ``CLIPTextModel`` on cached VAE latents.

Objective: the DDPM epsilon-prediction loss (Ho et al. 2020, Alg. 1) on SD 1.5's scaled-linear schedule,
with the caption replaced by the empty string 10% of the time so the one model also learns the
unconditional score that classifier-free guidance needs (Ho & Salimans 2022).

Training-only choices that make a from-scratch text encoder start steering the UNet sooner on a CPU
budget (none changes the saved layout or sampling):
- timestep sampling with extra mass on high noise (``high_t_fraction`` of the batch from t >= 500),
  where composition is decided and the caption is the only source of information;
- loss weighting per timestep: ``min_snr`` (Hang et al. 2023, gamma 5) or ``p2`` (Choi et al. 2022,
  k=1, gamma=1: ``1/(1+SNR)``), both de-emphasising near-clean steps the caption cannot help with;
- a larger learning rate for the text encoder, which starts from nothing;
- the canonical, fully specified caption most of the time, template variants otherwise.

Diagnostic (DESIGN): on a fixed held-out batch with fixed timesteps and noise, the loss with the right
caption vs. with the empty caption vs. with another scene's caption, overall and at high noise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from zoo.configs import SD15_SCHEDULER
from zoo.resume import has_moments, reseeded
from zoo.runs import (
    Ema,
    MetricsLog,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
    warmup_cosine_lr,
)

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = SD15_SCHEDULER["num_train_timesteps"]
EVAL_TIMESTEPS = (50, 200, 350, 500, 650, 800, 950)
REWARM_STEPS = 100  # after a resume without AdamW moments, the learning rate ramps up again over these


@dataclass(frozen=True)
class UnetTrainParams:
    """Optimisation settings of the UNet + text encoder stage."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    text_lr_mult: float = 3.0  # 0 freezes the text encoder
    text_init: str = ""  # "" trains the text encoder from scratch; "text" starts from the text stage
    warmup: int = 200
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    canonical_fraction: float = 0.7
    high_t_fraction: float = 0.5
    loss_weighting: str = "p2"
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    eval_every: int = 250
    log_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss_weighting not in ("none", "min_snr", "p2"):
            raise ValueError(f"loss_weighting must be none, min_snr or p2, got {self.loss_weighting!r}")
        for name in ("caption_dropout", "canonical_fraction", "high_t_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def alphas_cumprod() -> torch.Tensor:
    """SD 1.5's cumulative alphas (1000,): betas linear in sqrt space from 0.00085 to 0.012."""
    betas = (
        torch.linspace(
            SD15_SCHEDULER["beta_start"] ** 0.5,
            SD15_SCHEDULER["beta_end"] ** 0.5,
            NUM_TRAIN_TIMESTEPS,
            dtype=torch.float64,
        )
        ** 2
    )
    return torch.cumprod(1.0 - betas, dim=0).float()


def loss_weights(timesteps: torch.Tensor, alpha_bar: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weight of the epsilon MSE at ``timesteps`` (B,)."""
    snr = alpha_bar[timesteps] / (1 - alpha_bar[timesteps])
    if weighting == "min_snr":
        return torch.clamp(snr, max=5.0) / snr
    if weighting == "p2":
        return 2.0 / (1.0 + snr)  # scaled so the weight is 1 where SNR = 1
    return torch.ones_like(snr)


def sample_timesteps(batch_size: int, high_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, with a ``high_fraction`` share drawn from the noisier half instead: (B,) int64."""
    uniform = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=generator)
    high = torch.randint(NUM_TRAIN_TIMESTEPS // 2, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=generator)
    use_high = torch.rand(batch_size, generator=generator) < high_fraction
    return torch.where(use_high, high, uniform)


def epsilon_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    alpha_bar: torch.Tensor,
) -> torch.Tensor:
    """Per-sample epsilon MSE (B,) for scaled latents (B, 4, h, w) and token ids (B, L)."""
    scale = alpha_bar.to(latents.device)[timesteps].view(-1, 1, 1, 1)
    noisy = scale.sqrt() * latents + (1 - scale).sqrt() * noise  # q(x_t | x_0), DDPM eq. 4
    hidden = text_encoder(token_ids)[0]
    prediction = unet(noisy, timesteps, hidden).sample
    return (prediction - noise).pow(2).flatten(1).mean(1)


@dataclass
class EvalBatch:
    """Fixed held-out batch for the conditioning diagnostic.

    latents: (E, 4, h, w) scaled. token_ids: (E, L) canonical captions. timesteps, noise: fixed.
    """

    latents: torch.Tensor
    token_ids: torch.Tensor
    empty_ids: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor

    def to(self, device: torch.device) -> EvalBatch:
        """The same batch on ``device``."""
        return EvalBatch(
            *(
                tensor.to(device)
                for tensor in (self.latents, self.token_ids, self.empty_ids, self.timesteps, self.noise)
            )
        )


def make_eval_batch(latents: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor) -> EvalBatch:
    """Pair every held-out scene with every timestep of ``EVAL_TIMESTEPS``, with noise from a fixed seed."""
    count = len(latents)
    steps = torch.tensor(EVAL_TIMESTEPS).repeat_interleave(count)
    generator = torch.Generator().manual_seed(1234)
    return EvalBatch(
        latents=latents.repeat(len(EVAL_TIMESTEPS), 1, 1, 1),
        token_ids=token_ids.repeat(len(EVAL_TIMESTEPS), 1),
        empty_ids=empty_ids.expand(count * len(EVAL_TIMESTEPS), -1),
        timesteps=steps,
        noise=torch.randn(count * len(EVAL_TIMESTEPS), *latents.shape[1:], generator=generator),
    )


@torch.no_grad()
def conditioning_gap(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    batch: EvalBatch,
    alpha_bar: torch.Tensor,
    chunk: int = 128,
) -> dict[str, float]:
    """Held-out epsilon loss with the right, the empty and a shuffled caption; gaps overall and t >= 650."""
    unet.eval()
    text_encoder.eval()
    count = len(batch.latents) // len(EVAL_TIMESTEPS)
    shuffled = batch.token_ids.view(len(EVAL_TIMESTEPS), count, -1).roll(1, dims=1).reshape(batch.token_ids.shape)
    losses: dict[str, torch.Tensor] = {}
    for name, ids in (("cond", batch.token_ids), ("uncond", batch.empty_ids), ("wrong", shuffled)):
        parts = [
            epsilon_loss(
                unet,
                text_encoder,
                batch.latents[i : i + chunk],
                ids[i : i + chunk],
                batch.timesteps[i : i + chunk],
                batch.noise[i : i + chunk],
                alpha_bar,
            )
            for i in range(0, len(batch.latents), chunk)
        ]
        losses[name] = torch.cat(parts)
    unet.train()
    text_encoder.train()
    high = batch.timesteps >= 650
    result: dict[str, float] = {}
    for name, values in losses.items():
        result[f"eval_{name}"] = values.mean().item()
        result[f"eval_{name}_high"] = values[high].mean().item()
    for suffix in ("", "_high"):
        uncond = result[f"eval_uncond{suffix}"]
        result[f"gap{suffix}"] = (uncond - result[f"eval_cond{suffix}"]) / uncond
        result[f"gap_wrong{suffix}"] = (result[f"eval_wrong{suffix}"] - result[f"eval_cond{suffix}"]) / uncond
    return result


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    params: UnetTrainParams,
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    eval_batch: EvalBatch,
    out_dir: Path,
    metrics_path: Path,
    resume: bool,
    device: torch.device,
    stop_after: int | None = None,
) -> Ema:
    """Train (or resume) UNet and text encoder in place; returns the EMA of both.

    ``stop_after`` ends this invocation early (a time box); the schedule still spans ``params.steps``,
    and ``resume`` continues it.

    latents: (N, 4, h, w) scaled cached latents. token_ids: (N, K, L), variant 0 canonical.
    empty_ids: (L,) token ids of "".
    """
    # 1. Optimizer with a separate learning rate for the text encoder; EMA; random sources.
    unet.to(device).train()
    text_encoder.to(device).train()
    groups = [{"params": list(unet.parameters()), "base_lr": params.lr}]
    if params.text_lr_mult > 0:
        groups.append({"params": list(text_encoder.parameters()), "base_lr": params.lr * params.text_lr_mult})
    else:
        text_encoder.requires_grad_(False)
    trainable = [parameter for group in groups for parameter in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)
    modules = {"unet": unet, "text_encoder": text_encoder}
    ema = Ema(modules, params.ema_decay)
    numpy_rng = np.random.default_rng([params.seed, 3])
    generator = torch.Generator().manual_seed(params.seed)
    alpha_bar = alphas_cumprod()
    start_step, wall_s, rewarm_from = 0, 0.0, None

    # 2. Resume: exactly from a local checkpoint; from the weights alone after an unpacked pack
    #    (zoo/resume.py), with fresh AdamW moments, re-seeded draws and a short learning-rate re-warmup.
    checkpoint_path = latest_checkpoint(out_dir) if resume else None
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema.shadow = state["ema"]
        start_step, wall_s = state["step"], state["wall_s"]
        if has_moments(state):
            optimizer.load_state_dict(state["optimizer"])
            restore_rng(state["rng"], numpy_rng, generator)
        else:
            numpy_rng, generator = reseeded(params.seed, start_step)
            rewarm_from = start_step
        logger.info("resumed UNet from %s at step %d", checkpoint_path, start_step)

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(metrics_path, "unet")
    logger.info("UNet stage params: %s", asdict(params))
    n_scenes, n_variants = token_ids.shape[:2]
    tick = time.monotonic()
    running = 0.0
    last_step = params.steps if stop_after is None else min(params.steps, stop_after)
    for step in range(start_step, last_step):
        # 3. A batch: scenes, caption variant (canonical mostly), 10% empty captions.
        index = numpy_rng.integers(0, n_scenes, params.batch_size)
        variant = np.where(
            numpy_rng.random(params.batch_size) < params.canonical_fraction,
            0,
            numpy_rng.integers(0, n_variants, params.batch_size),
        )
        ids = token_ids[index, variant]
        dropped = torch.from_numpy(numpy_rng.random(params.batch_size) < params.caption_dropout)
        ids = torch.where(dropped[:, None], empty_ids[None, :], ids)
        timesteps = sample_timesteps(params.batch_size, params.high_t_fraction, generator)
        noise = torch.randn(params.batch_size, *latents.shape[1:], generator=generator)

        # 4. Weighted epsilon loss, clipped AdamW step, EMA.
        per_sample = epsilon_loss(
            unet,
            text_encoder,
            latents[index].to(device),
            ids.to(device),
            timesteps.to(device),
            noise.to(device),
            alpha_bar,
        )
        loss = (per_sample * loss_weights(timesteps, alpha_bar, params.loss_weighting).to(device)).mean()
        rewarm = 1.0 if rewarm_from is None else min(1.0, (step - rewarm_from + 1) / REWARM_STEPS)
        for group in optimizer.param_groups:
            group["lr"] = rewarm * warmup_cosine_lr(step, group["base_lr"], params.warmup, params.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip)
        optimizer.step()
        ema.update(modules, step)
        running += loss.item()

        # 5. Log, evaluate the conditioning gap, checkpoint.
        done = step + 1
        if done % params.log_every == 0 or done == params.steps:
            now = time.monotonic()
            wall_s, tick = wall_s + now - tick, now
            values = {"loss": running / params.log_every, "wall_s": wall_s}
            running = 0.0
            if done % params.eval_every == 0 or done in (params.steps, last_step):
                values.update(conditioning_gap(unet, text_encoder, eval_batch, alpha_bar))
            metrics.write(done, **values)
        if done % params.checkpoint_every == 0 or done in (params.steps, last_step):
            now = time.monotonic()
            wall_s, tick = wall_s + now - tick, now
            save_checkpoint(
                out_dir,
                done,
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "ema": ema.shadow,
                    "rng": rng_state(numpy_rng, generator),
                    "wall_s": wall_s,
                },
            )
    return ema
