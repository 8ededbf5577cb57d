"""What the concept-training methods that add an identifier token share (DreamBooth, Custom Diffusion,
Perfusion): checking the new token and its class word, drawing the token's fresh embedding, reading the
training images from the job's inputs, the adapter tensor that holds the token embeddings, and the class images.

The identifier is a new token (the DreamBooth paper picks a rare existing token; a fresh token whose embedding
is drawn at the scale of the embedding table is the same idea without hunting the vocabulary).

Class images are the prior images x_pr that DreamBooth's prior-preservation loss and Custom Diffusion's
regularisation train on: `count` images the frozen base model generates for "a <class>". They depend only on
(model, prompt, count, steps, guidance), never on the job's seed, so the worker caches them
(`worker/execution.py` generates missing ones with `generate_class_images` and passes them as job inputs) and a
method generates them itself only when its input lacks them (`class_images`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from models.common.components import Components
from models.common.text import check_prompt
from models.generation import text_to_image

TOKEN_EMBEDDINGS_KEY = "token_embeddings"
"""Adapter tensor (n, D): the input embeddings of the adapter's new tokens, in the order of `Adapter.tokens`."""


def check_concept(components: Components, token: str, class_word: str, field: str = "token") -> None:
    """ValueError naming the field when the token already exists or a caption with it would be truncated."""
    if not token or any(ch.isspace() for ch in token):
        raise ValueError(f"{field} must be one word without spaces, got {token!r}")
    if not class_word.strip():
        raise ValueError(f"{field.replace('token', 'class_word')} must name the concept's class, e.g. 'circle'")
    vocabulary = components.tokenizer.get_vocab()
    if token in vocabulary or f"{token.lower()}</w>" in vocabulary:
        raise ValueError(f"{field} {token!r} is already in the vocabulary; choose a new one, e.g. '<s1>'")
    check_prompt(components.tokenizer, f"a {token} {class_word} on a light background", field)


def identifier_vectors(components: Components, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` fresh token embeddings (count, D) drawn at the scale of the embedding table: per dimension the
    table's mean plus its standard deviation times a standard normal draw from `generator`."""
    table = components.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    noise = torch.randn((count, table.shape[1]), generator=generator)
    return table.mean(dim=0) + table.std(dim=0) * noise


def images_list(inputs: dict[str, object], name: str) -> list[Image.Image]:
    """inputs[name] as a non-empty list of PIL images; ValueError naming the input otherwise."""
    value = inputs.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(im, Image.Image) for im in value):
        raise ValueError(f"{name} must be a non-empty list of images")
    return value


# ----------------------------------------------------------------------------------------------
# Class images


CLASS_IMAGES_SEED = 0
"""Class images come from their own generator with this seed, never the job's: the same (model, prompt, count,
steps, guidance) always gives the same images, so a worker may cache them and a job with cached class images
equals one that generated them."""


@dataclass(frozen=True)
class ClassImageRequest:
    """The prior images x_pr one concept needs: `count` images of `prompt` from the frozen base model."""

    prompt: str
    count: int
    steps: int
    guidance_scale: float


def generate_class_images(components: Components, request: ClassImageRequest) -> list[Image.Image]:
    """`request.count` images the frozen base model generates for `request.prompt` (DDIM, one batch), at the
    model's native size, the size the training images are brought to."""
    generator = torch.Generator("cpu").manual_seed(CLASS_IMAGES_SEED)
    size = components.native_size
    params = text_to_image.Params(
        prompt=request.prompt,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        width=size,
        height=size,
        num_images=request.count,
    )
    return text_to_image.run(components, params, generator=generator).images


def class_images(components: Components, given: object, request: ClassImageRequest) -> list[Image.Image]:
    """The prior images: `given` (a list of PIL images, e.g. from the worker's cache) when it holds enough,
    otherwise generated now."""
    if isinstance(given, list) and len(given) >= request.count and all(isinstance(im, Image.Image) for im in given):
        return list(given[: request.count])
    return generate_class_images(components, request)
