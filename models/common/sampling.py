"""Classifier-free guidance, the DDIM sampling loop (Song et al., ICLR 2021), and the schedule tail that
SDEdit-style methods start from."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from models.common.components import ProgressCallback, no_progress
from models.control.inputs import ControlInputs

# The UNet's extra keyword arguments at one step, from its input: (latents, timestep, embeds, guided) -> kwargs,
# where guided says the batch is [unconditional, conditional] halves.
UnetExtras = Callable[[torch.Tensor, torch.Tensor | int, torch.Tensor, bool], dict[str, Any]]


def combined(*extras: UnetExtras | None) -> UnetExtras | None:
    """One `UnetExtras` giving every given one's keyword arguments (SDXL's added conditioning beside a control's
    residuals); None when none is given. Two that give the same argument are an error, never a silent override."""
    given = [item for item in extras if item is not None]
    if len(given) < 2:
        return given[0] if given else None

    def merged(
        latents: torch.Tensor, timestep: torch.Tensor | int, embeds: torch.Tensor, guided: bool
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for item in given:
            part = item(latents, timestep, embeds, guided)
            if kwargs.keys() & part.keys():
                raise ValueError(f"two UNet inputs both set {sorted(kwargs.keys() & part.keys())}")
            kwargs |= part
        return kwargs

    return merged


def guided_noise(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timestep: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    extras: UnetExtras | None = None,
) -> torch.Tensor:
    """eps = eps(z, c_empty) + w * (eps(z, c) - eps(z, c_empty)) (Ho & Salimans, 2022).

    latents: (B, C, h, w); cond, uncond: (B, L, D). With w == 1 or no uncond, one UNet pass. `extras` adds keyword
    arguments to that pass computed from its own batch (ControlNet residuals, SDXL's added conditioning; `combined`
    joins several).
    The result is in the model's own parameterization: eps, or v for a v-prediction model (guidance is linear, so
    guiding v is guiding eps); hand it to a scheduler from `Components.ddim()`, which converts it inside `step`,
    or to `models.common.prediction.to_epsilon` (see that module).
    """
    if uncond is None or guidance_scale == 1.0:
        kwargs = extras(latents, timestep, cond, False) if extras else {}
        return unet(latents, timestep, encoder_hidden_states=cond, **kwargs).sample
    latents, embeds = torch.cat([latents, latents]), torch.cat([uncond, cond])
    kwargs = extras(latents, timestep, embeds, True) if extras else {}
    both = unet(latents, timestep, encoder_hidden_states=embeds, **kwargs).sample
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def ddim_sample(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    callback: ProgressCallback = no_progress,
    control: ControlInputs | None = None,
    added: UnetExtras | None = None,
) -> torch.Tensor:
    """Denoise `latents` (B, C, h, w) through `timesteps` with deterministic DDIM (eta = 0), with `control`
    (ControlNets, T2I-Adapters, GLIGEN grounding) adding its UNet arguments at the steps each covers, and `added`
    (SDXL's added conditioning, `models.common.conditioning`) at every step, to the UNet and to `control`'s
    ControlNets.
    `scheduler` must have the model's prediction_type (`Components.ddim()`): it receives the UNet's raw output."""
    total = len(timesteps)
    for index, timestep in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, timestep)
        extras = None
        if control:
            control.step(index, total)
            extras = partial(control.extras, index, total, added=added)  # an SDXL ControlNet's too
        noise = guided_noise(unet, model_input, timestep, cond, uncond, guidance_scale, combined(added, extras))
        latents = scheduler.step(noise, timestep, latents).prev_sample
        callback(index + 1, total)
    return latents


def start_timesteps(scheduler_timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of the schedule that starts at t0 = strength * T (at least one step)."""
    steps = len(scheduler_timesteps)
    n_denoise = max(1, min(steps, round(steps * strength)))
    return scheduler_timesteps[steps - n_denoise :]
