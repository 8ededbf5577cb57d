"""Imagic: text-based real image editing with diffusion models (Kawar et al., CVPR 2023).

One input image x and a target text. Three stages (sec. 3, fig. 3), all with the ordinary denoising loss
L(x, e, theta) = E_{t, eps} || eps - f_theta(x_t, t, e) ||^2 on the image's VAE latent (for a v-prediction model,
SD 2.x 768, the target is v instead of eps: the loss the model was trained with):
  A. Text embedding optimisation: e_tgt = the target text's embedding; starting from e_opt = e_tgt, optimise
     e_opt with the model frozen so that it reconstructs x (the paper: 100 Adam steps, lr 2e-3).
  B. Model fine-tuning: freeze e_opt and fine-tune the diffusion model's weights theta on the same loss, so
     that e_opt reconstructs x exactly (the paper: 1,500 steps, lr 5e-7 for Imagen).
  C. Interpolation: generate with the fine-tuned model from e = eta * e_tgt + (1 - eta) * e_opt (eq. 3).
     eta = 0 gives back (about) the input, eta = 1 follows the target text most; the paper finds good edits
     around eta = 0.6 to 0.8. Sampling is DDIM with classifier-free guidance from seeded noise; every eta of
     one job starts from the same noise, so the outputs differ only through eta.

The fine-tuned weights never touch the worker's cached model: stage B trains a `copy.deepcopy` of the UNet,
made in float32 (Adam on fp16 weights is unstable) and dropped when the job returns or raises. The text
encoder and the VAE are not trained (the paper fine-tunes only the diffusion model; e is the encoder's
output sequence (1, L, D), optimised as a whole).
Choices for our scale: a few noise draws per step (`TRAIN_BATCH`), uniformly random timesteps, and default
step counts and learning rates sized for the tiny ShapesWorld model on a CPU (SD 1.5 wants more steps and
smaller learning rates, e.g. 500 embedding steps at 1e-3 and 1,000 fine-tuning steps at 2e-6 as in the
community pipeline). Not implemented: the paper's auxiliary super-resolution models (Imagen only) and the
fine-tuning of the text encoder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image

from contract.domains import defaults
from models.common.checks import check_guidance, check_image, check_steps
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.latents import decode, encode, images_to_tensor, randn, tensor_to_images
from models.common.prediction import training_target
from models.common.progress import offset_progress
from models.common.sampling import ddim_sample
from models.common.text import check_prompt, encode_prompts

TRAIN_BATCH = 4  # noise draws (each with its own timestep) per optimisation step; one UNet pass on a batch
MAX_ETAS = 8


# Params' defaults are the zoo's; the service fills a job's from its model's domain (contract/domains.py).
ZOO = defaults("imagic", "shapesworld")


@dataclass(frozen=True)
class Params:
    target_prompt: str
    etas: tuple[float, ...] | list[float] = (0.7,)
    embedding_steps: int = ZOO["embedding_steps"]
    embedding_lr: float = ZOO["embedding_lr"]
    finetune_steps: int = ZOO["finetune_steps"]
    finetune_lr: float = ZOO["finetune_lr"]
    steps: int = 50
    guidance_scale: float = 7.5


def denoising_loss(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    clean: torch.Tensor,
    embedding: torch.Tensor,
    generator: torch.Generator,
    batch: int = TRAIN_BATCH,
) -> torch.Tensor:
    """L(x, e, theta) of Imagic's stages A and B: mean over `batch` draws of || y - f(x_t, t, e) ||^2, with y the
    model's training target (`models.common.prediction.training_target`: eps, or v for a v-prediction model).

    clean: (1, C, h, w) latents of x; embedding: (1, L, D). Timesteps are uniform in [0, T) and the noises
    standard normal, both drawn from `generator`. Differentiable in `embedding` and in `unet`'s weights.
    """
    n_train = int(scheduler.config.num_train_timesteps)
    timesteps = torch.randint(0, n_train, (batch,), generator=generator, device=generator.device).to(clean.device)
    noise = randn((batch, *clean.shape[1:]), generator, clean.device, clean.dtype)
    clean = clean.expand(batch, -1, -1, -1)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    predicted = unet(noisy, timesteps, encoder_hidden_states=embedding.expand(batch, -1, -1)).sample
    return F.mse_loss(predicted.float(), training_target(scheduler, clean, noise, timesteps).float())


def optimise_embedding(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    clean: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    lr: float,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> tuple[torch.Tensor, list[float]]:
    """Stage A: e_opt = argmin_e L(x, e, theta) from e = e_tgt, with the model frozen.

    `unet` must have requires_grad False on its weights (only the embedding is trained). target: e_tgt
    (1, L, D). Returns e_opt (1, L, D), detached, and the loss of every step.
    """
    embedding = target.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            loss = denoising_loss(unet, scheduler, clean, embedding.to(clean.dtype), generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            callback(step + 1, steps)
    return embedding.detach().to(target.dtype), losses


def finetune(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    clean: torch.Tensor,
    embedding: torch.Tensor,
    steps: int,
    lr: float,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> list[float]:
    """Stage B: theta <- argmin_theta L(x, e_opt, theta), in place on `unet` (a job's own copy, never the
    shared model). embedding: e_opt (1, L, D), frozen. Returns the loss of every step."""
    parameters = list(unet.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            loss = denoising_loss(unet, scheduler, clean, embedding.detach(), generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            callback(step + 1, steps)
    for parameter in parameters:
        parameter.requires_grad_(False)
    return losses


def interpolate(target: torch.Tensor, optimised: torch.Tensor, eta: float) -> torch.Tensor:
    """Stage C, eq. 3: e = eta * e_tgt + (1 - eta) * e_opt. Both (1, L, D)."""
    return eta * target + (1.0 - eta) * optimised


def check_params(components: Components, params: Params, image: Image.Image) -> tuple[float, ...]:
    """Raise ValueError naming the first bad value; returns the etas as a tuple."""
    etas = tuple(float(eta) for eta in params.etas)
    if not 1 <= len(etas) <= MAX_ETAS:
        raise ValueError(f"etas must hold 1 to {MAX_ETAS} values, got {len(etas)}")
    if any(eta < 0.0 for eta in etas):
        raise ValueError(f"etas must be >= 0, got {list(etas)}")
    if params.embedding_steps < 0:
        raise ValueError(f"embedding_steps must be >= 0, got {params.embedding_steps}")
    if params.finetune_steps < 0:
        raise ValueError(f"finetune_steps must be >= 0, got {params.finetune_steps}")
    if not params.embedding_lr > 0.0:
        raise ValueError(f"embedding_lr must be > 0, got {params.embedding_lr}")
    if not params.finetune_lr > 0.0:
        raise ValueError(f"finetune_lr must be > 0, got {params.finetune_lr}")
    check_image(components, image)
    check_steps(components, params.steps)
    check_guidance(params.guidance_scale)
    check_prompt(components.tokenizer, params.target_prompt, "target_prompt")
    return etas


def mean_of(losses: list[float], last: bool, count: int = 10) -> float:
    """Mean of the first (or last) `count` losses, NaN-free: 0 for an empty stage."""
    window = losses[-count:] if last else losses[:count]
    return round(sum(window) / len(window), 5) if window else 0.0


@torch.no_grad()
def sample(
    components: Components,
    unet: UNet2DConditionModel,
    embedding: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    params: Params,
    callback: ProgressCallback = no_progress,
) -> Image.Image:
    """Stage C's generation: DDIM with guidance from `noise` (1, C, h, w) with `unet` and `embedding` (1, L, D)."""
    scheduler = components.ddim()
    scheduler.set_timesteps(params.steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    latents = ddim_sample(
        unet, scheduler, latents, scheduler.timesteps, embedding, uncond, params.guidance_scale, callback
    )
    return tensor_to_images(decode(components.vae, latents.to(components.vae.dtype)))[0]


def run(
    components: Components,
    params: Params,
    inputs: dict[str, Image.Image],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Edit `inputs["image"]` towards `params.target_prompt`: one output image per eta, in the order given.

    The generator draws the training noises and timesteps, then the sampling noise (shared by every eta).
    Not under `torch.no_grad()` as a whole: stages A and B need gradients; stage C runs without them.
    """
    # 1. Check inputs
    image = inputs["image"]
    etas = check_params(components, params, image)
    total = params.embedding_steps + params.finetune_steps + len(etas) * params.steps

    # 2. Encode the target prompt, the empty prompt and the image (B=1); no gradients into the encoders
    target32, uncond32, clean32 = encode_inputs(components, params.target_prompt, image)

    # 3. The job's own UNet: a float32 copy, trained in stage B and dropped on return or on an exception
    #    (cancel), so the worker's cached model never changes
    tuned = float32_copy(components.unet)
    try:
        scheduler = components.ddim()

        # 4. Stage A: optimise the text embedding with the model frozen
        progress = offset_progress(callback, 0, total)
        optimised, embedding_losses = optimise_embedding(
            tuned, scheduler, clean32, target32, params.embedding_steps, params.embedding_lr, generator, progress
        )

        # 5. Stage B: fine-tune the copy on e_opt
        progress = offset_progress(callback, params.embedding_steps, total)
        finetune_losses = finetune(
            tuned, scheduler, clean32, optimised, params.finetune_steps, params.finetune_lr, generator, progress
        )

        # 6. Stage C: interpolate and sample, every eta from the same noise
        done = params.embedding_steps + params.finetune_steps
        outputs = sample_etas(
            components, tuned, clean32, target32, optimised, uncond32, etas, params, generator, callback, done
        )
    finally:
        del tuned

    # 7. Report
    distance = float((optimised - target32).norm() / target32.norm())
    metrics: dict[str, float | int | str] = {
        "embedding_loss_first": mean_of(embedding_losses, last=False),
        "embedding_loss_last": mean_of(embedding_losses, last=True),
        "finetune_loss_first": mean_of(finetune_losses, last=False),
        "finetune_loss_last": mean_of(finetune_losses, last=True),
        "embedding_relative_change": round(distance, 5),
        "steps": params.steps,
    }
    return MethodOutput(images=outputs, result={"etas": list(etas)}, metrics=metrics)


@torch.no_grad()
def encode_inputs(
    components: Components, target_prompt: str, image: Image.Image
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e_tgt, the empty prompt's embedding (1, L, D), the image's latent z_0 (1, C, h, w)), all float32."""
    target, uncond = (
        encode_prompts(components.text_encoder, components.tokenizer, [prompt]) for prompt in (target_prompt, "")
    )
    clean = encode(components.vae, images_to_tensor([image]))
    return target.float(), uncond.float(), clean.float()


def float32_copy(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A float32 deep copy of `unet` with gradients off (stage B turns them on), the shared model untouched."""
    tuned = copy.deepcopy(unet)
    if tuned.dtype != torch.float32:
        tuned.to(dtype=torch.float32)
    tuned.requires_grad_(False)
    return tuned


def sample_etas(
    components: Components,
    tuned: UNet2DConditionModel,
    clean: torch.Tensor,
    target: torch.Tensor,
    optimised: torch.Tensor,
    uncond: torch.Tensor,
    etas: tuple[float, ...],
    params: Params,
    generator: torch.Generator,
    callback: ProgressCallback,
    done: int,
) -> list[Image.Image]:
    """Stage C: one image per eta from the fine-tuned `tuned` and e = interpolate(e_tgt, e_opt, eta), every eta
    from the same noise (the shape of `clean`, drawn from `generator`); progress continues after the `done`
    training steps."""
    noise = randn(clean.shape, generator, clean.device, torch.float32)
    total = done + len(etas) * params.steps
    outputs = []
    for index, eta in enumerate(etas):
        embedding = interpolate(target, optimised, eta)
        progress = offset_progress(callback, done + index * params.steps, total)
        outputs.append(sample(components, tuned, embedding, uncond, noise, params, progress))
    return outputs
