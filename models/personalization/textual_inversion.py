"""Textual Inversion (Gal et al., "An Image is Worth One Word", ICLR 2023).

A new token S* gets one or more embedding vectors v (initialised from a word, by default the class word); only v
trains, with the latent-diffusion loss of eq. (2): v* = argmin_v E || eps - eps_theta(z_t, t, c_theta(y(S*))) ||^2
over captions y from templates ("a S* circle on a light background"). The text encoder, the UNet and the VAE are
frozen and never written: the new rows live in an `ExtendedEmbedding` beside the base table.

With `num_vectors` n > 1 the token stands for n tokens "S*", "S*_1", ... (as diffusers' multi-vector
`load_textual_inversion` expands them). The adapter file is diffusers' format: one tensor named after the token,
shape (n, D), so `pipeline.load_textual_inversion(path)` reads it. An SDXL embedding (applied, not trained here)
holds one tensor per text encoder, `clip_l` (n, D1) and `clip_g` (n, D2), with its token in the metadata, as
SDXL embedding files are shared; `apply` adds the token to both encoders.
Not implemented: the paper's per-image captions and its progressive extension to the UNet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from contract.domains import defaults
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.mixed_precision import optimizer_step
from models.personalization.common import Adapter, Checkpoints, tokens_metadata
from models.personalization.training import (
    TrainingLog,
    added_tokens,
    check_at_least_one,
    concept_loss,
    concept_phrase,
    images_to_latents,
    is_known_word,
    token_vectors,
    train_parameters,
    training_metrics,
)

VECTORS_KEY = "vectors"
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding's vectors for the first and the second text encoder


# Params' defaults are the zoo's; the service fills a job's from its model's domain (contract/domains.py).
ZOO = defaults("textual-inversion", "shapesworld")


@dataclass(frozen=True)
class Params:
    token: str
    class_word: str
    init_word: str = ""  # default: the class word
    num_vectors: int = 1
    steps: int = ZOO["steps"]
    learning_rate: float = ZOO["learning_rate"]
    batch_size: int = 4
    flip: bool = False
    checkpoint_every: int = 50


def sub_tokens(token: str, count: int) -> list[str]:
    """The tokens a multi-vector concept stands for: "<s1>", "<s1>_1", ... (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def check_params(components: Components, params: Params, images: list[Image.Image]) -> None:
    """Raise ValueError naming the first bad value."""
    if not 1 <= len(images) <= 20:
        raise ValueError(f"images must hold 1 to 20 images, got {len(images)}")
    if not params.token or " " in params.token:
        raise ValueError(f"token must be one word, got {params.token!r}")
    if is_known_word(components.tokenizer, params.token):
        raise ValueError(f"token {params.token!r} is already a word of the model; choose a new one, e.g. '<s1>'")
    check_at_least_one(steps=params.steps)
    if not 1 <= params.num_vectors <= 8:
        raise ValueError(f"num_vectors must be in [1, 8], got {params.num_vectors}")
    for name in ("class_word", "init_word"):
        word = getattr(params, name)
        if word and any(piece == components.tokenizer.unk_token for piece in components.tokenizer.tokenize(word)):
            raise ValueError(f"{name} {word!r} has words the model does not know")


def run(
    components: Components,
    params: Params,
    inputs: dict[str, Any],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
    checkpoints: Checkpoints | None = None,
) -> MethodOutput:
    """Learn the token's vectors from `inputs["images"]`; returns the adapter and the loss."""
    # 1. Check inputs
    images: list[Image.Image] = list(inputs.get("images") or [])
    check_params(components, params, images)

    # 2. Encode the training images once (the VAE is frozen)
    latents = images_to_latents(components, images, flip=params.flip).to(components.device)

    # 3. The trainable vectors, initialised from the init word (eq. 2's v, one row per sub-token)
    vectors = initial_vectors(components, params)
    concept = concept_phrase(params.token, params.class_word)

    # 4. Optimise only the vectors; the token exists only inside this block
    log = train_vectors(components, params, vectors, latents, concept, generator, callback, checkpoints)

    # 5. The adapter: diffusers' textual-inversion layout, {token: (n, D)}
    adapter = Adapter(
        type="textual-inversion",
        tensors={params.token: vectors.detach().to("cpu", torch.float32).clone()},
        metadata={
            "tokens": tokens_metadata([params.token]),
            "class_word": params.class_word,
            "num_vectors": str(params.num_vectors),
        },
    )
    metrics = training_metrics(log, params.steps)
    return MethodOutput(adapter=adapter, metrics=metrics, result={"tokens": [params.token], "prompt": f"a {concept}"})


def initial_vectors(components: Components, params: Params) -> torch.nn.Parameter:
    """The trainable v (num_vectors, D) on the model's device: every row the init word's embedding (by default
    the class word's)."""
    init_word = params.init_word or params.class_word or "a"
    init = token_vectors(components, [init_word]).repeat(params.num_vectors, 1)
    return torch.nn.Parameter(init.to(components.device))


def train_vectors(
    components: Components,
    params: Params,
    vectors: torch.nn.Parameter,
    latents: torch.Tensor,
    concept: str,
    generator: torch.Generator,
    callback: ProgressCallback,
    checkpoints: Checkpoints | None,
) -> TrainingLog:
    """Optimise eq. 2 over `vectors` alone (AdamW), with the token (and its sub-tokens) added for the loop only."""
    optimizer = torch.optim.AdamW([vectors], lr=params.learning_rate, weight_decay=0.0)
    tokens = sub_tokens(params.token, params.num_vectors)
    aliases = {params.token: " ".join(tokens)} if params.num_vectors > 1 else None
    scheduler = components.ddim()
    with added_tokens(components, tokens, vectors, aliases):

        def step(index: int) -> float:
            with torch.enable_grad():
                loss = concept_loss(components, scheduler, latents, concept, params.batch_size, generator).mean()
            return optimizer_step(optimizer, loss)

        return train_parameters(
            {VECTORS_KEY: vectors},
            optimizer,
            step,
            steps=params.steps,
            checkpoint_every=params.checkpoint_every,
            generator=generator,
            callback=callback,
            checkpoints=checkpoints,
        )


def vectors_of(adapter: Adapter) -> tuple[str, torch.Tensor]:
    """The adapter's token and its (n, D) vectors; ValueError if the file is not one token's embedding."""
    if len(adapter.tensors) != 1:
        raise ValueError(f"a textual-inversion adapter holds one tensor, this one {len(adapter.tensors)}")
    token, tensor = next(iter(adapter.tensors.items()))
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise ValueError(f"textual-inversion vectors must be (n, D), got {tuple(tensor.shape)}")
    return token, tensor


def sdxl_vectors_of(adapter: Adapter) -> tuple[str, torch.Tensor, torch.Tensor]:
    """An SDXL embedding's token and its (n, D1) and (n, D2) vectors; ValueError if it is not one."""
    if set(adapter.tensors) != set(SDXL_KEYS):
        raise ValueError(
            f"an SDXL textual-inversion adapter holds tensors {' and '.join(SDXL_KEYS)}, this one "
            f"{sorted(adapter.tensors)}"
        )
    if len(adapter.tokens) != 1:
        raise ValueError(f"an SDXL textual-inversion adapter names one token in its metadata, got {adapter.tokens}")
    first, second = (adapter.tensors[key] for key in SDXL_KEYS)
    first, second = (t.unsqueeze(0) if t.ndim == 1 else t for t in (first, second))
    if first.ndim != 2 or second.ndim != 2 or first.shape[0] != second.shape[0]:
        raise ValueError(
            f"clip_l and clip_g must be (n, D) with one n, got {tuple(first.shape)}, {tuple(second.shape)}"
        )
    return adapter.tokens[0], first, second


@contextlib.contextmanager
def apply(components: Components, adapter: Adapter, scale: float = 1.0) -> Iterator[None]:
    """Add the adapter's token for the block (to both text encoders of SDXL). `scale` multiplies the vectors
    (1 = as trained)."""
    if components.text_encoder_2 is not None:
        token, vectors, vectors_2 = sdxl_vectors_of(adapter)
    elif set(adapter.tensors) == set(SDXL_KEYS):
        raise ValueError("an SDXL textual-inversion adapter (clip_l, clip_g) needs an SDXL model")
    else:
        (token, vectors), vectors_2 = vectors_of(adapter), None
    count = vectors.shape[0]
    tokens = sub_tokens(token, count)
    aliases = {token: " ".join(tokens)} if count > 1 else None
    dtype = components.text_encoder.get_input_embeddings().weight.dtype
    with contextlib.ExitStack() as stack:
        stack.enter_context(added_tokens(components, tokens, (vectors * scale).to(dtype), aliases))
        if vectors_2 is not None:
            stack.enter_context(added_tokens(components, tokens, (vectors_2 * scale).to(dtype), aliases, second=True))
        yield
