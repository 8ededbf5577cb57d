"""What the zoo's add-on trainers share (`train_control.py`: ControlNet, T2I-Adapter; `train_gligen.py`): a frozen
base model with its captions encoded once, noised latents, and the loop's bookkeeping (learning-rate schedule,
clipped step, an optional exponential moving average of the weights, log lines, checkpoints with the random state,
resume)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from zoo.data import encode_latents
from zoo.runs import latest_checkpoint, load_checkpoint, restore_rng, rng_state, save_checkpoint, warmup_cosine_lr
from zoo.train_unet import alphas_cumprod, sample_timesteps


@dataclass
class FrozenBase:
    """A base model's parts, frozen."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer

    @classmethod
    def load(cls, base: Path) -> FrozenBase:
        return cls(
            UNet2DConditionModel.from_pretrained(str(base / "unet")).requires_grad_(False),
            AutoencoderKL.from_pretrained(str(base / "vae")).requires_grad_(False),
            CLIPTextModel.from_pretrained(str(base / "text_encoder")).requires_grad_(False),
            CLIPTokenizer.from_pretrained(str(base / "tokenizer")),
        )

    def latents(self, images: np.ndarray) -> torch.Tensor:
        """Scaled latents of uint8 images (N, H, W, 3)."""
        return encode_latents(self.vae, images) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (N, L, D), pooled (N, D)) of `texts`, padded to the tokenizer's length."""
        hidden, pooled = [], []
        for start in range(0, len(texts), 256):
            ids = self.tokenizer(
                list(texts[start : start + 256]),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = self.text_encoder(ids)
            hidden.append(out[0])
            pooled.append(out.pooler_output)
        return torch.cat(hidden), torch.cat(pooled)


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    warmup: int
    checkpoint_every: int
    ema_decay: float = 0.0  # 0: no moving average; else the saved model is the average (see AddonLoop)


class AddonLoop:
    """One trainer's loop state: the optimizer over `trainable`, the random streams, the schedule; `resume` restores
    them from the last checkpoint in `work`, `step` takes one optimizer step and logs and checkpoints.

    With `schedule.ema_decay` d > 0 it also keeps an exponential moving average of the trainable weights
    (ema <- d * ema + (1 - d) * weights after every step, checkpointed with the rest); `use_average` copies it into
    the weights before the model is saved. The average smooths the last steps' noise out of the weights, as the
    base models' training does (Stable Diffusion keeps an EMA of its UNet)."""

    def __init__(
        self,
        work: Path,
        schedule: Schedule,
        trainable: Sequence[torch.nn.Parameter],
        seed: int,
        stream: int,
        logger: logging.Logger,
        slower: Sequence[torch.nn.Parameter] = (),
        slower_scale: float = 1.0,
    ) -> None:
        """`slower`: more parameters to train at `slower_scale` times the schedule's rate (a frozen base's own
        layers, fine-tuned gently beside new ones)."""
        self.work, self.schedule, self.logger = work, schedule, logger
        self.trainable = [*trainable, *slower]
        groups: list[dict[str, object]] = [{"params": list(trainable), "scale": 1.0}]
        if slower:
            groups.append({"params": list(slower), "scale": slower_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=schedule.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(seed)
        self.numpy_rng = np.random.default_rng([seed, stream])
        self.alpha_bar = alphas_cumprod()
        self.start = 0
        self.average = [p.detach().clone() for p in self.trainable] if schedule.ema_decay > 0 else None
        self._tick, self._running = time.monotonic(), 0.0

    def resume(self, model: torch.nn.Module, key: str) -> None:
        """Continue from the last checkpoint in `work`, if there is one (`key`: the model's state in it)."""
        checkpoint = latest_checkpoint(self.work)
        if checkpoint is None:
            return
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.average is not None:
            if "ema" not in state:
                raise RuntimeError(f"{checkpoint} has no moving average; resume without --ema or start a new run")
            for average, saved in zip(self.average, state["ema"], strict=True):
                average.copy_(saved)
        restore_rng(state["rng"], self.numpy_rng, self.generator)
        self.start = state["step"]
        self.logger.info("resumed from %s at step %d", checkpoint, self.start)

    def noised(
        self, latents: torch.Tensor, high_fraction: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, noise) for a batch of clean `latents`, t uniform (a `high_fraction` share
        drawn from the noisier half instead)."""
        timesteps = sample_timesteps(len(latents), high_fraction, self.generator)
        noise = torch.randn(latents.shape, generator=self.generator)
        scale = self.alpha_bar[timesteps].view(-1, 1, 1, 1)
        return scale.sqrt() * latents + (1 - scale).sqrt() * noise, timesteps, noise

    def step(self, step: int, loss: torch.Tensor, state: Callable[[], dict[str, object]]) -> None:
        """One clipped AdamW step at the schedule's rate for `step`; logs every 50 steps and checkpoints
        `state()` (with the optimizer and random state) every `checkpoint_every` and at the end."""
        schedule = self.schedule
        for group in self.optimizer.param_groups:
            # a checkpoint from before the slower group resumes with groups without "scale": the full rate
            group["lr"] = warmup_cosine_lr(step, schedule.lr, schedule.warmup, schedule.steps) * group.get("scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        if self.average is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.average, [p.detach() for p in self.trainable], 1.0 - schedule.ema_decay)
        self._running += loss.item()
        done = step + 1
        if done % 50 == 0:
            self.logger.info("step %d loss %.5f (%.1f s)", done, self._running / 50, time.monotonic() - self._tick)
            self._running = 0.0
        if done % schedule.checkpoint_every == 0 or done == schedule.steps:
            rng = rng_state(self.numpy_rng, self.generator)
            extra = {} if self.average is None else {"ema": self.average}
            save_checkpoint(self.work, done, {**state(), "optimizer": self.optimizer.state_dict(), "rng": rng, **extra})

    def use_average(self) -> None:
        """Copy the moving average into the trainable weights (no-op without one); call it once, before saving."""
        if self.average is not None:
            with torch.no_grad():
                for parameter, average in zip(self.trainable, self.average, strict=True):
                    parameter.copy_(average)
