"""A small CNN, PGD attacks and adversarial training: the supervised reference and the robust classifiers of the
classification bench (Madry et al., ICLR 2018, for PGD and adversarial training; Gowal et al., NeurIPS 2021 and
Wang et al., ICML 2023 for adding generated data to it).

Plain torch, sized for a CPU: three conv blocks on 32x32 (or 64x64) inputs in [0, 1], one shared trunk and one
linear head per label ("shape", "color", ...). Adversarial training replaces each batch by its PGD adversary
(L-infinity ball of radius eps, random start, `steps` signed-gradient steps of size alpha) against the sum of
the heads' cross-entropies. Everything draws its randomness from an explicit generator, so a seed gives the
same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


@dataclass(frozen=True)
class Adversary:
    """PGD in the L-infinity ball of radius `eps` (pixels in [0, 1]): `steps` steps of size `alpha`."""

    eps: float = 4 / 255
    alpha: float = 1 / 255
    steps: int = 5


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    adversary: Adversary | None = None
    width: int = 32  # channels of the first conv block


class SmallCNN(nn.Module):
    """(B, 3, S, S) in [0, 1] -> {head: (B, n_classes)} logits; S divisible by 8."""

    def __init__(self, heads: dict[str, int], size: int = 32, width: int = 32) -> None:
        super().__init__()
        self.heads_spec = dict(heads)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (size // 8) ** 2, 128),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, n) for name, n in heads.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(pixels * 2.0 - 1.0)
        return {name: head(features) for name, head in self.heads.items()}


def to_tensor(images: Sequence[Image.Image], size: int = 32) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float32 in [0, 1] (box-filtered when downsampled)."""
    arrays = [
        np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def loss_of(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the labelled heads of the mean cross-entropy."""
    return sum((F.cross_entropy(logits[name], target) for name, target in labels.items()), torch.zeros(()))


def pgd(
    model: SmallCNN,
    pixels: torch.Tensor,
    labels: dict[str, torch.Tensor],
    adversary: Adversary,
    generator: torch.Generator,
) -> torch.Tensor:
    """PGD (Madry et al. 2018): x_adv = clip_[0,1](Proj_eps(x_adv + alpha sign(grad loss))), random start.

    pixels: (B, 3, S, S) in [0, 1]. Returns the adversarial batch, detached. The model is put in eval mode
    for the attack and returned to the mode it had.
    """
    was_training = model.training
    model.eval()
    start = (torch.rand(pixels.shape, generator=generator) * 2 - 1) * adversary.eps
    adversarial = (pixels + start).clamp(0, 1).detach()
    for _ in range(adversary.steps):
        adversarial.requires_grad_(True)
        loss = loss_of(model(adversarial), labels)
        (grad,) = torch.autograd.grad(loss, adversarial)
        stepped = adversarial.detach() + adversary.alpha * grad.sign()
        adversarial = (pixels + (stepped - pixels).clamp(-adversary.eps, adversary.eps)).clamp(0, 1).detach()
    model.train(was_training)
    return adversarial


def train(
    pixels: torch.Tensor,
    labels: dict[str, torch.Tensor],
    heads: dict[str, int],
    config: TrainConfig,
    seed: int,
) -> SmallCNN:
    """Train a SmallCNN on (N, 3, S, S) pixels with integer labels per head (N,); adversarial when
    `config.adversary` is set (every batch replaced by its PGD adversary). Seeded: the same seed, the same model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the layers' initialisation
        model = SmallCNN(heads, size=pixels.shape[-1], width=config.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = pixels.shape[0]
    steps = config.epochs * ((n + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(steps, 1))
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            batch = pixels[index]
            batch_labels = {name: target[index] for name, target in labels.items()}
            # Augmentation that keeps every label: none of the world's labels survives a flip or a shift
            # (position, and left/right of a two-tone fill), so only a small brightness jitter.
            batch = (batch * (1 + 0.1 * (torch.rand(len(index), 1, 1, 1, generator=generator) - 0.5))).clamp(0, 1)
            if config.adversary is not None:
                batch = pgd(model, batch, batch_labels, config.adversary, generator)
            loss = loss_of(model(batch), batch_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model


@torch.no_grad()
def predict(model: SmallCNN, pixels: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Log-probabilities per head, (N, n_classes) each."""
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in model.heads_spec}
    for start in range(0, pixels.shape[0], batch_size):
        for name, logits in model(pixels[start : start + batch_size]).items():
            outputs[name].append(F.log_softmax(logits, dim=-1))
    return {name: torch.cat(parts) for name, parts in outputs.items()}


def accuracy(model: SmallCNN, pixels: torch.Tensor, labels: torch.Tensor, head: str) -> float:
    """Share of (N,) labels the head gets right on clean pixels."""
    return float((predict(model, pixels)[head].argmax(-1) == labels).float().mean())


def robust_accuracy(
    model: SmallCNN,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    head: str,
    adversary: Adversary,
    seed: int,
    batch_size: int = 128,
) -> float:
    """Share of labels the head still gets right on each image's PGD adversary (the attack sees only `head`)."""
    generator = torch.Generator().manual_seed(seed)
    right = 0
    for start in range(0, pixels.shape[0], batch_size):
        batch, target = pixels[start : start + batch_size], labels[start : start + batch_size]
        adversarial = pgd(model, batch, {head: target}, adversary, generator)
        right += int((predict(model, adversarial)[head].argmax(-1) == target).sum())
    return right / pixels.shape[0]
