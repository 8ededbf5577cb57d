"""Null-text inversion (Mokady et al., "Null-text Inversion for Editing Real Images using Guided
Diffusion Models", CVPR 2023).

Plain DDIM inversion (Song et al., ICLR 2021) with guidance w = 1 gives a pivot trajectory
z*_T ... z*_0 that the sampler retraces only without guidance; under classifier-free guidance (w = 7.5)
errors accumulate and the reconstruction drifts. Null-text inversion keeps the model and the prompt
embedding C fixed and optimises, per step t, the unconditional ("null-text") embedding phi_t so the
guided DDIM step lands on the pivot (paper, Algorithm 1):

    z_bar_T = z*_T, phi_T = phi("")
    for t = T ... 1:
        for j < N:  phi_t <- phi_t - eta * grad || z*_{t-1} - step(z_bar_t, phi_t, C) ||^2
        z_bar_{t-1} = step(z_bar_t, phi_t, C);  phi_{t-1} = phi_t

With the per-step embeddings, guided sampling from z*_T reconstructs the input (to the VAE's round
trip), and Prompt-to-Prompt edits it by sharing them between the source and the edited branch.

Implemented as in the authors' code: N = `inner_steps` Adam iterations with learning rate
1e-2 * (1 - i / 100) at step i (`learning_rate`; over more than 100 steps the same linear decay is stretched to
the run, so the rate stays positive), early stop once the loss is below 1e-5 + 2e-5 * i, the conditional
noise computed once per step. The objective is a distance between latents, so it needs nothing of the model's
parameterization: the UNet's output (eps, or v for SD 2.x 768) goes to the scheduler's `step`, which knows it
(models/common/prediction.py). Not implemented: negative-prompt inversion (a later, optimisation-free
variant). `inner_steps` is the cost knob: each inner iteration is one UNet forward and backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel

from models.common.components import ProgressCallback, no_progress
from models.common.mixed_precision import MasterWeights
from models.common.sampling import guided_noise

LEARNING_RATE = 1e-2
DECAY_STEPS = 100  # the authors' rate 1e-2 * (1 - i / 100) reaches 0 at step 100 (they run 50 steps)
EARLY_STOP = 1e-5
EARLY_STOP_PER_STEP = 2e-5


def learning_rate(index: int, steps: int) -> float:
    """Adam's rate at forward step `index` of `steps`: the authors' 1e-2 * (1 - i / 100) for runs of up to 100
    steps, 1e-2 * (1 - i / steps) for longer ones (the same linear decay over the run, positive at every step)."""
    return LEARNING_RATE * (1.0 - index / max(DECAY_STEPS, steps))


def null_text_inversion(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    trajectory: list[torch.Tensor],
    clean: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float,
    inner_steps: int = 10,
    callback: ProgressCallback = no_progress,
) -> list[torch.Tensor]:
    """Optimise one null-text embedding per step of `scheduler.timesteps` (descending, N steps).

    trajectory: the DDIM inversion of `clean` (`models.common.inversion.ddim_invert`, guidance 1, the
    same N), entries (1, C, h, w) with trajectory[-1] = z*_T; clean: z*_0 (1, C, h, w); cond: C (1, L, D);
    uncond: the initial phi (1, L, D). Returns [phi_{t_0}, ..., phi_{t_{N-1}}], each (1, L, D), for the
    forward steps in order. Runs with gradients enabled whatever the caller's mode (only phi is trained).
    """
    timesteps = scheduler.timesteps
    if len(trajectory) != len(timesteps):
        raise ValueError(f"trajectory has {len(trajectory)} latents, the scheduler {len(timesteps)} steps")
    targets = [*trajectory[-2::-1], clean]  # forward step i must land on z*_{t_{i+1}} (the last on z*_0)
    latents = trajectory[-1]
    null = uncond.detach().clone()
    embeddings = []
    for index, timestep in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, timestep)
        with torch.no_grad():
            noise_cond = unet(model_input, timestep, encoder_hidden_states=cond).sample
        # phi in the model's dtype for the UNet, with a float32 master for Adam on a half-precision model.
        phi = torch.nn.Parameter(null.detach().clone())
        master = MasterWeights({"null": phi})
        optimizer = torch.optim.Adam(list(master.params.values()), lr=learning_rate(index, len(timesteps)))
        with torch.enable_grad():
            for _ in range(inner_steps):
                noise_uncond = unet(model_input, timestep, encoder_hidden_states=phi).sample
                noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                predicted = scheduler.step(noise, timestep, latents).prev_sample
                loss = F.mse_loss(predicted.float(), targets[index].float())
                if master.step(optimizer, loss) < EARLY_STOP + EARLY_STOP_PER_STEP * index:
                    break
        null = phi.detach()
        embeddings.append(null)
        with torch.no_grad():
            noise = guided_noise(unet, model_input, timestep, cond, null, guidance_scale)
            latents = scheduler.step(noise, timestep, latents).prev_sample
        callback(index + 1, len(timesteps))
    return embeddings
