"""Train the zoo's ``AutoencoderKL`` on rendered ShapesWorld images.

Loss: L1 + MSE reconstruction of a posterior sample plus a small KL term (Kingma & Welling 2014; SD's
VAE adds perceptual and adversarial terms, which flat-coloured 64x64 shapes do not need). The DESIGN
note measured that ~1,500 steps of batch 16 are needed before reconstructions keep their colours.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from zoo.configs import VaeConfig, build_vae
from zoo.data import to_tensor
from zoo.runs import (
    MetricsLog,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
    warmup_cosine_lr,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VaeTrainParams:
    """Optimisation settings of the VAE stage."""

    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-6
    edge_weight: float = 0.0  # weight of an L1 loss on horizontal and vertical pixel differences
    init: str = ""  # start from this AutoencoderKL folder (same sizes) instead of fresh weights
    decoder_only: bool = False  # train the decoder alone on cached latents; the encoder (and so the latent
    # space the UNet learns) stays exactly as it is
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    eval_every: int = 250
    seed: int = 0


def reconstruction_psnr(vae: AutoencoderKL, images: np.ndarray) -> float:
    """Mean PSNR (dB, on [0, 255]) of decoding the posterior mean of uint8 images (B, 64, 64, 3)."""
    vae.eval()
    with torch.no_grad():
        pixels = to_tensor(images)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    vae.train()
    mse = ((decoded - pixels) * 127.5).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(255.0**2 / mse.clamp_min(1e-8))).mean())


def edge_l1(decoded: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical neighbour differences: weighs outlines and corners,
    the few pixels that tell a small diamond from a circle, more than their share of the plain L1."""
    loss = (decoded.diff(dim=-1) - pixels.diff(dim=-1)).abs().mean()
    return loss + (decoded.diff(dim=-2) - pixels.diff(dim=-2)).abs().mean()


def train_vae(
    config: VaeConfig,
    params: VaeTrainParams,
    images: np.ndarray,
    eval_images: np.ndarray,
    out_dir: Path,
    metrics_path: Path,
    resume: bool,
    device: torch.device,
    latents: torch.Tensor | None = None,
) -> AutoencoderKL:
    """Train (or resume) the VAE; checkpoints go to ``out_dir``. Returns the trained model on CPU.

    images, eval_images: uint8 (N, 64, 64, 3). latents: the encoder's unscaled posterior means of
    ``images`` (N, 4, h, w), needed when ``params.decoder_only``.
    """
    if params.decoder_only and (latents is None or not params.init):
        raise ValueError("decoder_only needs an init VAE and its cached latents")
    # 1. Build model, optimizer and every random source from the seed.
    torch.manual_seed(params.seed)
    vae = build_vae(config).to(device)
    if params.init:
        vae.load_state_dict(AutoencoderKL.from_pretrained(params.init).state_dict())
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()] if params.decoder_only else list(
        vae.parameters()
    )
    optimizer = torch.optim.AdamW(trained, lr=params.lr, weight_decay=0.0)
    numpy_rng = np.random.default_rng([params.seed, 2])
    generator = torch.Generator().manual_seed(params.seed)
    start_step, wall_s = 0, 0.0

    # 2. Resume exactly where the newest checkpoint left off.
    checkpoint_path = latest_checkpoint(out_dir) if resume else None
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], numpy_rng, generator)
        start_step, wall_s = state["step"], state["wall_s"]
        logger.info("resumed VAE from %s at step %d", checkpoint_path, start_step)

    # 3. Optimise.
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(metrics_path, "vae")
    vae.train()
    tick = time.monotonic()
    for step in range(start_step, params.steps):
        index = numpy_rng.integers(0, len(images), params.batch_size)
        pixels = to_tensor(images[index]).to(device)
        if params.decoder_only:
            assert latents is not None
            decoded = vae.decode(latents[index].to(device)).sample
            kl = torch.zeros(())
        else:
            posterior = vae.encode(pixels).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
            decoded = vae.decode(posterior.mean + posterior.std * noise).sample
            kl = posterior.kl().mean() / pixels[0].numel()
        l1 = (decoded - pixels).abs().mean()
        mse = (decoded - pixels).pow(2).mean()
        loss = l1 + mse + params.kl_weight * kl + params.edge_weight * edge_l1(decoded, pixels)

        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, params.lr, params.warmup, params.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, params.grad_clip)
        optimizer.step()

        done = step + 1
        if done % 50 == 0 or done == params.steps:
            now = time.monotonic()
            wall_s, tick = wall_s + now - tick, now
            values = {"loss": loss.item(), "l1": l1.item(), "kl": kl.item(), "wall_s": wall_s}
            if done % params.eval_every == 0 or done == params.steps:
                values["eval_psnr"] = reconstruction_psnr(vae, eval_images)
            metrics.write(done, **values)
        if done % params.checkpoint_every == 0 or done == params.steps:
            now = time.monotonic()
            wall_s, tick = wall_s + now - tick, now
            save_checkpoint(
                out_dir,
                done,
                {
                    "vae": vae.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(numpy_rng, generator),
                    "wall_s": wall_s,
                },
            )
    return vae.cpu().eval()
