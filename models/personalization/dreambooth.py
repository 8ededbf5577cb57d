"""DreamBooth (Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation", CVPR 2023).

The whole UNet (optionally the text encoder) of a *copy* of the base model is fine-tuned on 3-10 images
captioned "a [V] <class>", with the class-specific prior-preservation loss (paper, eq. 2):

    E[ ||eps - eps_theta(z_t, t, c_[V])||^2 + lambda ||eps' - eps_theta(z'_t', t', c_class)||^2 ]

where z' are latents of images the frozen base model generated for "a <class>" (the paper's x_pr). The
identifier [V] is a new token (the paper picks a rare existing token; a fresh token whose embedding is drawn
at the scale of the embedding table is the same idea without hunting the vocabulary). Its vector is fixed
unless the text encoder trains.

The adapter is the weight DELTA (fine-tuned minus base) of every parameter that changed, in safetensors:
`unet.<param>` and `text_encoder.<param>` tensors, plus `token_embeddings` (n, D). `apply` adds
`scale * delta` to the shared model and puts the original tensors back afterwards (a copy, so the base
returns bit for bit, not merely up to rounding).

Implemented: prior preservation (on/off, weight), class images from the caller (the worker's cache) or
generated in the job, optional text-encoder training (the token table itself stays frozen: only the new
token's row trains), checkpoints and resume, horizontal flips as an option.
Not implemented: the paper's super-resolution fine-tuning, 8-bit optimizers, gradient checkpointing.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.text import check_prompt, encode_prompts
from models.generation import text_to_image
from models.personalization.common import Adapter, Checkpoints, tokens_metadata
from models.personalization.training import (
    added_tokens,
    concept_phrase,
    images_to_latents,
    noise_prediction_loss,
    optimizer_step,
    parameter_state,
    pick,
    train_loop,
    training_prompts,
)

TOKEN_EMBEDDINGS_KEY = "token_embeddings"
"""Adapter tensor (n, D): the input embeddings of the adapter's new tokens, in the order of `Adapter.tokens`."""

FROZEN_TEXT_PARAMS = ("token_embedding",)
"""Text-encoder parameters never trained: the embedding table (a dense delta of it would be V x D)."""


@dataclass(frozen=True)
class Params:
    token: str
    class_word: str
    steps: int = 200
    learning_rate: float = 2e-4
    batch_size: int = 2
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 8
    class_prompt: str = ""  # default "a <class_word>"
    class_steps: int = 25  # DDIM steps when the job generates its class images
    class_guidance_scale: float = 7.5
    train_text_encoder: bool = False
    flip: bool = False
    checkpoint_every: int = 50


# ----------------------------------------------------------------------------------------------
# Pieces Custom Diffusion shares


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
    """`request.count` images the frozen base model generates for `request.prompt` (DDIM, one batch)."""
    generator = torch.Generator("cpu").manual_seed(CLASS_IMAGES_SEED)
    params = text_to_image.Params(
        prompt=request.prompt, steps=request.steps, guidance_scale=request.guidance_scale, num_images=request.count
    )
    return text_to_image.run(components, params, generator=generator).images


def class_images(components: Components, given: object, request: ClassImageRequest) -> list[Image.Image]:
    """The prior images: `given` (a list of PIL images, e.g. from the worker's cache) when it holds enough,
    otherwise generated now."""
    if isinstance(given, list) and len(given) >= request.count and all(isinstance(im, Image.Image) for im in given):
        return list(given[: request.count])
    return generate_class_images(components, request)


def class_prompt(params: Params) -> str:
    return params.class_prompt or f"a {params.class_word}".strip()


def class_image_requests(params: Params) -> dict[str, ClassImageRequest]:
    """The inputs a worker may fill from its cache of class images (none without prior preservation)."""
    if not params.prior_preservation:
        return {}
    request = ClassImageRequest(
        class_prompt(params), params.num_class_images, params.class_steps, params.class_guidance_scale
    )
    return {"class_images": request}


def images_list(inputs: dict[str, object], name: str) -> list[Image.Image]:
    value = inputs.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(im, Image.Image) for im in value):
        raise ValueError(f"{name} must be a non-empty list of images")
    return value


# ----------------------------------------------------------------------------------------------
# Training


def run(
    components: Components,
    params: Params,
    inputs: dict[str, object],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
    checkpoints: Checkpoints | None = None,
) -> MethodOutput:
    """Fine-tune a copy of the UNet on inputs["images"] (with prior preservation on inputs["class_images"] or
    generated ones); returns the weight delta as a "dreambooth" adapter."""
    # 1. Check inputs
    images = images_list(inputs, "images")
    check_concept(components, params.token, params.class_word)
    prior_prompt = class_prompt(params)
    check_prompt(components.tokenizer, prior_prompt, "class_prompt")
    for name, value in (("steps", params.steps), ("batch_size", params.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if params.prior_preservation and params.num_class_images < 1:
        raise ValueError(f"num_class_images must be at least 1 with prior preservation, got {params.num_class_images}")
    started = time.perf_counter()

    # 2. Data: instance latents, the identifier's vector, the prior images generated by the frozen model
    instance_latents = images_to_latents(components, images, flip=params.flip)
    vectors = identifier_vectors(components, 1, generator)
    class_latents: torch.Tensor | None = None
    if params.prior_preservation:
        prior = class_images(components, inputs.get("class_images"), class_image_requests(params)["class_images"])
        class_latents = images_to_latents(components, prior)

    # 3. The trainable copy (the shared model is only read)
    unet = copy.deepcopy(components.unet)
    unet.requires_grad_(True)
    text_encoder = copy.deepcopy(components.text_encoder) if params.train_text_encoder else components.text_encoder
    trainable: dict[str, torch.nn.Parameter] = {f"unet.{n}": p for n, p in unet.named_parameters()}
    token_vectors = torch.nn.Parameter(vectors.to(components.device), requires_grad=params.train_text_encoder)
    if params.train_text_encoder:
        for name, parameter in text_encoder.named_parameters():
            if not any(frozen in name for frozen in FROZEN_TEXT_PARAMS):
                parameter.requires_grad_(True)
                trainable[f"text_encoder.{name}"] = parameter
        trainable[TOKEN_EMBEDDINGS_KEY] = token_vectors
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=params.learning_rate, weight_decay=0.0)
    scheduler = components.ddim()
    phrase = concept_phrase(params.token, params.class_word)
    train = dataclasses.replace(components, unet=unet, text_encoder=text_encoder)

    # 4. Optimise eq. 2
    with added_tokens(train, [params.token], token_vectors):

        def step_fn(step: int) -> float:
            rows = pick(instance_latents.shape[0], params.batch_size, generator)
            prompts = training_prompts(phrase, params.batch_size, generator)
            cond = encode_prompts(train.text_encoder, train.tokenizer, prompts)
            loss = noise_prediction_loss(unet, scheduler, instance_latents[rows], cond, generator).mean()
            if class_latents is not None:
                rows = pick(class_latents.shape[0], params.batch_size, generator)
                class_cond = encode_prompts(train.text_encoder, train.tokenizer, [prior_prompt] * params.batch_size)
                prior_loss = noise_prediction_loss(unet, scheduler, class_latents[rows], class_cond, generator)
                loss = loss + params.prior_loss_weight * prior_loss.mean()
            return optimizer_step(optimizer, loss)

        get_state, set_state = parameter_state(trainable, optimizer)

        log = train_loop(
            steps=params.steps,
            step_fn=step_fn,
            get_state=get_state,
            set_state=set_state,
            generator=generator,
            callback=callback,
            checkpoints=checkpoints,
            checkpoint_every=params.checkpoint_every,
        )

    # 5. The delta against the base model
    tensors = weight_delta(components.unet, unet, "unet.")
    if params.train_text_encoder:
        tensors.update(weight_delta(components.text_encoder, text_encoder, "text_encoder."))
    tensors[TOKEN_EMBEDDINGS_KEY] = token_vectors.detach().float().cpu().clone()
    metadata = {
        "tokens": tokens_metadata([params.token]),
        "class_word": params.class_word,
        "class_prompt": prior_prompt,
        "prior_preservation": str(params.prior_preservation),
        "train_text_encoder": str(params.train_text_encoder),
        "steps": str(params.steps),
        "learning_rate": str(params.learning_rate),
    }
    adapter = Adapter(type="dreambooth", tensors=tensors, metadata=metadata)
    metrics: dict[str, float | int | str] = {
        "final_loss": round(log.final_loss, 6),
        "steps": params.steps,
        "seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(log.seconds, 3),
        "resumed_from": log.resumed_from,
        "changed_tensors": sum(1 for name in tensors if name != TOKEN_EMBEDDINGS_KEY),
    }
    return MethodOutput(adapter=adapter, metrics=metrics, result={"tokens": [params.token], "loss": log.losses[-1:]})


def weight_delta(base: torch.nn.Module, tuned: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """`prefix + name` -> tuned - base (CPU float32) for every parameter the training changed."""
    base_parameters = dict(base.named_parameters())
    delta: dict[str, torch.Tensor] = {}
    for name, parameter in tuned.named_parameters():
        difference = (parameter.detach().float() - base_parameters[name].detach().float()).cpu()
        if bool(difference.any()):
            delta[prefix + name] = difference.contiguous()
    return delta


# ----------------------------------------------------------------------------------------------
# Using the adapter


@contextmanager
def apply(components: Components, adapter: Adapter, scale: float) -> Iterator[None]:
    """Add `scale * delta` to the shared UNet (and text encoder) and the identifier token for the block; the
    original tensors are copied back in a finally, so the base model comes back exactly."""
    if adapter.type != "dreambooth":
        raise ValueError(f"not a dreambooth adapter: {adapter.type!r}")
    modules = {"unet.": components.unet, "text_encoder.": components.text_encoder}
    targets: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, delta in adapter.tensors.items():
        if key == TOKEN_EMBEDDINGS_KEY:
            continue
        prefix = next((p for p in modules if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"dreambooth adapter tensor {key!r} names neither the unet nor the text encoder")
        try:
            parameter = modules[prefix].get_parameter(key[len(prefix) :])
        except AttributeError as exc:
            raise ValueError(f"dreambooth adapter tensor {key!r} is not a parameter of this base model") from exc
        if tuple(parameter.shape) != tuple(delta.shape):
            raise ValueError(
                f"dreambooth adapter tensor {key!r} has shape {tuple(delta.shape)}, "
                f"the model's is {tuple(parameter.shape)}"
            )
        targets.append((parameter, delta))
    vectors = adapter.tensors.get(TOKEN_EMBEDDINGS_KEY)
    if vectors is None:
        raise ValueError(f"dreambooth adapter lacks {TOKEN_EMBEDDINGS_KEY!r}")
    with ExitStack() as stack:
        stack.enter_context(added_tokens(components, adapter.tokens, vectors))
        originals = [parameter.detach().clone() for parameter, _ in targets]
        try:
            with torch.no_grad():
                for parameter, delta in targets:
                    parameter.add_(
                        delta.to(device=parameter.device, dtype=torch.float32).mul(scale).to(parameter.dtype)
                    )
            yield
        finally:
            with torch.no_grad():
                for (parameter, _), original in zip(targets, originals, strict=True):
                    parameter.copy_(original)
