"""Pre-train the zoo's ``CLIPTextModel`` to read captions before the UNet ever sees it.

Trained jointly from scratch, the text encoder and the UNet must discover together which words matter,
and on a CPU budget the UNet learns the image statistics long before the caption steers it (the v1
model drew the asked position in ~15% of samples after 3,000 steps). Here the encoder first learns,
on its own and in a few CPU minutes, to predict every attribute the caption states from its final
EOS state (``pooler_output``): for each of up to two objects, in the order the caption names them, its
shape, colour, size, position and fill, and the scene's background. An attribute the caption leaves
out (template variants drop size, colour or position) has its own class, "unspecified", so the encoder
learns to say what it was told and nothing more. Only the ``CLIPTextModel`` is kept; the linear heads
are discarded. The UNet stage then starts from it (``--text-init``) and freezes it or trains it slowly.

Labels come from the captions alone (:func:`caption_labels`), never from the rendered scene, so they
hold for every template variant.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import CLIPTextModel

from models.shapes.world import ALL_SHAPES, BACKGROUNDS, COLORS, FILLS, POSITIONS, SIZES, SUBJECT_COLOR
from zoo.runs import MetricsLog, warmup_cosine_lr

logger = logging.getLogger(__name__)

UNSPECIFIED = "unspecified"
NONE = "none"  # the slot has no object (a one-object caption's second slot, the empty caption)
SLOTS = 2
# Each attribute's classes: the world's values, then "unspecified" and "none".
OBJECT_CLASSES: dict[str, tuple[str, ...]] = {
    "shape": (*ALL_SHAPES, UNSPECIFIED, NONE),
    "color": (*COLORS, SUBJECT_COLOR, UNSPECIFIED, NONE),
    "size": (*SIZES, UNSPECIFIED, NONE),
    "position": (*POSITIONS, UNSPECIFIED, NONE),
    "fill": (*FILLS, UNSPECIFIED, NONE),
}
BACKGROUND_CLASSES: tuple[str, ...] = (*BACKGROUNDS, UNSPECIFIED)
HEADS: tuple[tuple[str, int], ...] = (
    *((f"{attribute}{slot}", len(classes)) for slot in range(SLOTS) for attribute, classes in OBJECT_CLASSES.items()),
    ("background", len(BACKGROUND_CLASSES)),
)


def _object_labels(phrase: str) -> dict[str, str]:
    """Attributes one object phrase states ("a large blue square in the top left corner")."""
    words = phrase.split()
    labels = {attribute: UNSPECIFIED for attribute in OBJECT_CLASSES}
    labels["fill"] = "solid"
    shapes = [word for word in words if word in ALL_SHAPES]
    if len(shapes) != 1:
        raise ValueError(f"no single shape word in {phrase!r}")
    labels["shape"] = shapes[0]
    for word in words:
        if word in COLORS:
            labels["color"] = word
        elif word in SIZES:
            labels["size"] = word
        elif word == "checkered":
            labels["fill"] = "checkered"
        elif word == "two-tone":
            labels["fill"], labels["color"] = "two-tone", SUBJECT_COLOR
    tail = " ".join(words[words.index(shapes[0]) + 1 :]).removesuffix(" corner")
    for position in POSITIONS:
        if tail in (f"at the {position}", f"in the {position}"):
            labels["position"] = position
    return labels


def caption_labels(text: str) -> dict[str, str]:
    """What a caption (canonical or a template variant, see ``models.shapes.world.caption``) says: one
    label per head of :data:`HEADS`. The empty caption says nothing: every slot "none", background
    "unspecified"."""
    labels = {"background": UNSPECIFIED}
    for background in BACKGROUNDS:
        for suffix in (f" on a {background} background", f" against a {background} background", f" on {background}"):
            if text.endswith(suffix):
                text, labels["background"] = text[: -len(suffix)], background
    phrases = text.split(" and ") if text else []
    if len(phrases) > SLOTS:
        raise ValueError(f"more than {SLOTS} objects in {text!r}")
    for slot in range(SLOTS):
        if slot < len(phrases):
            found = _object_labels(phrases[slot])
        else:
            found = {attribute: NONE for attribute in OBJECT_CLASSES}
        labels.update({f"{attribute}{slot}": value for attribute, value in found.items()})
    return labels


def label_indices(captions: list[str]) -> torch.Tensor:
    """Class indices (N, len(HEADS)) of :func:`caption_labels` for each caption."""
    rows = []
    for text in captions:
        labels = caption_labels(text)
        row = []
        for name, _ in HEADS:
            classes = BACKGROUND_CLASSES if name == "background" else OBJECT_CLASSES[name[:-1]]
            row.append(classes.index(labels[name]))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


@dataclass(frozen=True)
class TextTrainParams:
    """Optimisation settings of the text-encoder pre-training stage."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-2
    empty_fraction: float = 0.05  # share of empty captions, so "" has a defined meaning too
    eval_every: int = 250
    seed: int = 0


class AttributeHeads(nn.Module):
    """One linear classifier per head of :data:`HEADS` on the encoder's pooled EOS state."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(hidden_size, count) for name, count in HEADS})

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(pooled) for name, head in self.heads.items()}


def _loss_and_accuracy(
    text_encoder: CLIPTextModel, heads: AttributeHeads, token_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over heads, and per-caption all-heads-right (B,) bool."""
    logits = heads(text_encoder(token_ids).pooler_output)
    losses, right = [], torch.ones(len(token_ids), dtype=torch.bool)
    for column, (name, _) in enumerate(HEADS):
        losses.append(nn.functional.cross_entropy(logits[name], labels[:, column]))
        right &= logits[name].argmax(-1) == labels[:, column]
    return torch.stack(losses).mean(), right


def train_text_encoder(
    text_encoder: CLIPTextModel,
    params: TextTrainParams,
    token_ids: np.ndarray,
    captions: list[list[str]],
    empty_ids: np.ndarray,
    eval_token_ids: np.ndarray,
    eval_captions: list[list[str]],
    metrics_path: Path,
) -> float:
    """Train ``text_encoder`` in place (with throw-away heads); returns held-out all-heads accuracy (%).

    token_ids: (N, K, L) per scene and caption variant; captions: the matching texts. The held-out set
    is read with every variant, so the figure covers template captions too.
    """
    # 1. Labels of every caption variant; model, heads, optimizer, random source.
    _, n_variants, length = token_ids.shape
    flat_ids = torch.from_numpy(token_ids.reshape(-1, length))
    flat_labels = label_indices([text for variants in captions for text in variants])
    empty_labels = label_indices([""])[0]
    eval_ids = torch.from_numpy(eval_token_ids.reshape(-1, length))
    eval_labels = label_indices([text for variants in eval_captions for text in variants])
    torch.manual_seed(params.seed)
    heads = AttributeHeads(text_encoder.config.hidden_size)
    parameters = [*text_encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=params.lr, weight_decay=params.weight_decay)
    rng = np.random.default_rng([params.seed, 4])
    metrics = MetricsLog(metrics_path, "text")
    text_encoder.train()
    started = time.monotonic()
    accuracy = 0.0

    for step in range(params.steps):
        # 2. A batch of caption variants, some replaced by the empty caption.
        index = torch.from_numpy(rng.integers(0, len(flat_ids), params.batch_size))
        ids, labels = flat_ids[index], flat_labels[index]
        empty = torch.from_numpy(rng.random(params.batch_size) < params.empty_fraction)
        ids = torch.where(empty[:, None], torch.from_numpy(empty_ids)[None, :], ids)
        labels = torch.where(empty[:, None], empty_labels[None, :], labels)

        # 3. Cross-entropy of every head, AdamW with warmup and cosine decay.
        loss, _ = _loss_and_accuracy(text_encoder, heads, ids, labels)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, params.lr, params.warmup, params.steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # 4. Held-out accuracy: every head right on a caption.
        done = step + 1
        if done % params.eval_every == 0 or done == params.steps:
            text_encoder.eval()
            with torch.no_grad():
                _, right = _loss_and_accuracy(text_encoder, heads, eval_ids, eval_labels)
            text_encoder.train()
            accuracy = 100.0 * right.float().mean().item()
            metrics.write(done, loss=loss.item(), eval_all_heads=accuracy, wall_s=time.monotonic() - started)
    logger.info(
        "text encoder pre-trained: held-out captions fully read %.1f%% (%d scenes x %d variants)",
        accuracy,
        len(eval_captions),
        n_variants,
    )
    return accuracy
