"""Training data for the zoo: rendered ShapesWorld scenes, tokenized captions, cached VAE latents.

A dataset holds N scenes rendered once (uint8 images) and K token sequences per scene: variant 0 is
the canonical, fully specified caption, variants 1..K-1 use the world's template variety. Everything is
a pure function of the seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

from models.shapes.world import caption, render, sample_scene

logger = logging.getLogger(__name__)


@dataclass
class CaptionedImages:
    """Rendered scenes and their captions.

    images: (N, 64, 64, 3) uint8. captions: N lists of K strings, canonical first.
    token_ids: (N, K, max_length) int64, filled in by :func:`tokenize`.
    """

    images: np.ndarray
    captions: list[list[str]]
    token_ids: np.ndarray | None = None


def render_scenes(n_scenes: int, seed: int, n_variants: int, split: str = "train") -> CaptionedImages:
    """Render ``n_scenes`` scenes with one canonical and ``n_variants - 1`` template captions each."""
    if n_scenes < 1 or n_variants < 1:
        raise ValueError(f"need n_scenes >= 1 and n_variants >= 1, got {n_scenes}, {n_variants}")
    scene_rng = np.random.default_rng(seed)
    caption_rng = np.random.default_rng([seed, 1])
    images = np.empty((n_scenes, 64, 64, 3), dtype=np.uint8)
    captions: list[list[str]] = []
    for index in range(n_scenes):
        scene = sample_scene(scene_rng, split=split)
        images[index] = render(scene).image
        variants = [caption(scene)] + [caption(scene, rng=caption_rng) for _ in range(n_variants - 1)]
        captions.append(variants)
    return CaptionedImages(images=images, captions=captions)


def tokenize(tokenizer: CLIPTokenizer, data: CaptionedImages) -> CaptionedImages:
    """Pad every caption to ``tokenizer.model_max_length``; raise if one would be truncated."""
    flat = [text for variants in data.captions for text in variants]
    lengths = [len(ids) for ids in tokenizer(flat, truncation=False)["input_ids"]]
    longest = max(lengths)
    if longest > tokenizer.model_max_length:
        worst = flat[int(np.argmax(lengths))]
        raise ValueError(f"caption of {longest} tokens exceeds {tokenizer.model_max_length}: {worst!r}")
    ids = tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="np")
    n_scenes, n_variants = len(data.captions), len(data.captions[0])
    data.token_ids = ids["input_ids"].astype(np.int64).reshape(n_scenes, n_variants, -1)
    logger.info("tokenized %d captions, longest %d tokens", len(flat), longest)
    return data


def empty_token_ids(tokenizer: CLIPTokenizer) -> np.ndarray:
    """Token ids of the empty caption, the unconditional input of classifier-free guidance: (max_length,)."""
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="np")
    return ids["input_ids"][0].astype(np.int64)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> float (B, 3, 64, 64) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_data(data: CaptionedImages, path: Path) -> None:
    """Store images, token ids and captions in one ``.npz``."""
    if data.token_ids is None:
        raise ValueError("tokenize the data before saving it")
    np.savez(path, images=data.images, token_ids=data.token_ids, captions=np.array(data.captions))


def load_data(path: Path) -> CaptionedImages:
    """Inverse of :func:`save_data`."""
    with np.load(path) as archive:
        return CaptionedImages(
            images=archive["images"],
            captions=archive["captions"].tolist(),
            token_ids=archive["token_ids"],
        )


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of the VAE for uint8 images (N, 64, 64, 3) -> (N, 4, 16, 16), unscaled."""
    vae.eval()
    chunks = [
        vae.encode(to_tensor(images[start : start + batch_size])).latent_dist.mean
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)
