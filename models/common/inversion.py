"""DDIM inversion (Song et al., ICLR 2021, eq. 13 run backwards): a clean latent -> its noise.

The DDIM sampler with eta = 0 is a deterministic ODE discretisation, so running its update from
t_{k-1} to t_k maps x_0 to an x_T that the forward sampler maps (approximately) back to x_0. The
approximation: the noise at level t_k is predicted from the latent at t_{k-1}.
"""

from __future__ import annotations

import torch
from diffusers import DDIMInverseScheduler, UNet2DConditionModel

from models.common.components import ProgressCallback, no_progress
from models.common.sampling import guided_noise


def ddim_invert(
    unet: UNet2DConditionModel,
    inverse_scheduler: DDIMInverseScheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    n_steps: int | None = None,
    callback: ProgressCallback = no_progress,
) -> list[torch.Tensor]:
    """Invert clean latents (B, C, h, w) through `inverse_scheduler.timesteps` (ascending).

    Returns the trajectory [z_{t_1}, ..., z_{t_n}]: entry k is the latent at noise level
    inverse_scheduler.timesteps[k]. With the forward scheduler set to the same number of steps N,
    forward step i (at timestep forward.timesteps[i]) starts from entry N - 1 - i, and the last entry
    is the starting noise for a full regeneration. `n_steps` stops early (an encoding ratio < 1).
    `inverse_scheduler` must have the model's prediction_type (`Components.ddim_inverse()`): it receives the UNet's
    raw output (eps or v) and converts it, as diffusers' DDIMInverseScheduler does, at the level of the latent it
    steps from.
    """
    timesteps = inverse_scheduler.timesteps
    if n_steps is not None:
        timesteps = timesteps[:n_steps]
    trajectory = []
    total = len(timesteps)
    for index, timestep in enumerate(timesteps):
        model_input = inverse_scheduler.scale_model_input(latents, timestep)
        noise = guided_noise(unet, model_input, timestep, cond, uncond, guidance_scale)
        latents = inverse_scheduler.step(noise, timestep, latents).prev_sample
        trajectory.append(latents)
        callback(index + 1, total)
    return trajectory
