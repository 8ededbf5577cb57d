"""What the UNet predicts, and the two conversions every method needs: its training target and the noise.

A model's scheduler config names its parameterization (`prediction_type`): SD 1.x and the zoo predict the noise
eps ("epsilon"); Stable Diffusion 2.x's 768 models predict the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
("v_prediction", Salimans & Ho, ICLR 2022, appendix D), with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

How the methods stay correct for either, in one convention:
- Sampling, inversion and editing take the UNet's output as it comes (eps or v) and hand it to a DDIM scheduler
  built by `Components.ddim()` / `ddim_inverse()` from the model's own config, so the scheduler knows the
  parameterization and turns the output into eps and x_0 inside `step`, exactly as diffusers' pipelines do.
  Classifier-free guidance (and InstructPix2Pix's two-scale guidance) is linear in the output, and the map
  output -> eps is affine in it at a fixed x_t and t, so guiding v and then converting gives the guided eps.
- Code that does its own arithmetic on the noise (DiffEdit's mask) converts with `to_epsilon`.
- Losses and the Diffusion Classifier's error compare the UNet's output with the model's own regression target
  (`training_target`: eps, or v through the scheduler's `get_velocity`), the objective the model was trained on.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

Scheduler: TypeAlias = DDIMScheduler | DDIMInverseScheduler  # both carry alphas_cumprod and the config
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler: Scheduler) -> str:
    """The scheduler's (so the model's) parameterization; ValueError for one diffusers' DDIM does not know."""
    kind = str(scheduler.config.prediction_type)
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")
    return kind


def _alphas(scheduler: Scheduler, timesteps: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) at `timesteps` (scalar or (B,)), shaped to broadcast over `like` (B, ...)."""
    steps = torch.as_tensor(timesteps, device=scheduler.alphas_cumprod.device).long().reshape(-1)
    abar = scheduler.alphas_cumprod[steps].to(device=like.device, dtype=torch.float32)
    abar = abar.reshape(-1, *([1] * (like.dim() - 1)))
    return abar.sqrt(), (1.0 - abar).sqrt()


def training_target(
    scheduler: DDIMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet regresses on at x_t = add_noise(clean, noise, t): eps, v (`get_velocity`) or x_0.

    clean: (B or 1, C, h, w); noise: (B, C, h, w); timesteps: (B,). Returns (B, C, h, w) in the dtype of `noise`.
    """
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean.expand_as(noise).to(noise.dtype)
    return scheduler.get_velocity(clean, noise, timesteps).to(noise.dtype)


def to_epsilon(
    scheduler: Scheduler, output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor | int
) -> torch.Tensor:
    """The noise eps the UNet's `output` at (x_t = `sample`, t) stands for.

    v: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t; x_0: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t).
    output, sample: (B, C, h, w); timesteps: a scalar or (B,). Computed in float32, returned in output's dtype.
    """
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return output
    root_abar, root_one_minus = _alphas(scheduler, timesteps, output)
    if kind == "v_prediction":
        eps = root_abar * output.float() + root_one_minus * sample.float()
    else:
        eps = (sample.float() - root_abar * output.float()) / root_one_minus
    return eps.to(output.dtype)


def epsilon_error_scale(scheduler: Scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """(N,) float64 s_t with || eps - eps_hat ||^2 = s_t || target - prediction ||^2 at the same x_t and t.

    1 for eps, abar_t for v (eps - eps_hat = sqrt(abar_t) (v - v_hat)), abar_t / (1 - abar_t) for x_0: weights
    written for the noise's error (the DDPM bound's) apply to the model's own target's error times s_t.
    """
    kind = prediction_type(scheduler)
    abar = scheduler.alphas_cumprod.double()[timesteps.long().cpu()]
    if kind == "epsilon":
        return torch.ones_like(abar)
    return abar if kind == "v_prediction" else abar / (1.0 - abar)
