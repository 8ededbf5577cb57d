"""Perfusion (Tewel et al., "Key-Locked Rank One Editing for Text-to-Image Personalization", SIGGRAPH 2023).

A concept is a new token S* plus a gated rank-one edit of every cross-attention K and V projection:

    W' e = W e + sigma((u^T e - beta) / tau) * (o* - W i*),    u = C^-1 i* / (i*^T C^-1 i*)     (paper, eq. 7-8)

- i*: the encoding of S* (the text encoder's output at its position); C: the uncorrected covariance of text
  encodings over a caption corpus, so u^T e is the "energy" of an encoding e along i* (1 at e = i*);
- key locking (sec. 4.1): for K, o*_K = W_k i_class, the key of the class word's encoding, fixed: S* attends where
  the class word would, so the concept does not overfit the layout of the training images;
- the value target o*_V per layer is learned (initialised at W_v i_class), with the embedding of S*; only these
  train (a few hundred numbers per layer), the model is never written;
- the gate sigma((energy - beta) / tau) (bias beta, temperature tau) switches the edit on for S* only, so a prompt
  without S* is (nearly) unchanged; the `apply` scale multiplies the edit (the concept's strength at inference),
  and two concepts are two edits summed in the same processor.

The edit is installed through an attention processor on the attn2 layers (the module's forward is never replaced);
it computes the stock scaled-dot-product attention with the edited keys and values.

Adapter tensors: `token_embeddings` (1, D), `i_star`, `i_class`, `direction` (u) (D,), and `<layer>.value_target`
(hidden,) per attn2 layer; the gate's bias and temperature are metadata.
Not implemented: the paper's global locking variant (locking o*_V too), the cross-attention mask loss, and the
prior-preservation tricks; the caption corpus for C is a seeded stand-in for the paper's (`captions.caption_corpus`:
ShapesWorld's captions on the zoo, composed plain English captions on any other model).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from PIL import Image

from models.common.attention import attention_input, attention_output, cross_attention_layers, installed, split_heads
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.mixed_precision import optimizer_step
from models.common.text import check_prompt, encode_prompts
from models.personalization.captions import caption_corpus, context_prompts
from models.personalization.common import Adapter, Checkpoints, tokens_metadata
from models.personalization.concepts import TOKEN_EMBEDDINGS_KEY, check_concept, identifier_vectors, images_list
from models.personalization.training import (
    TrainingLog,
    added_tokens,
    check_at_least_one,
    concept_loss,
    images_to_latents,
    train_parameters,
    training_metrics,
)

VALUE_SUFFIX = ".value_target"


@dataclass(frozen=True)
class Params:
    token: str
    class_word: str
    steps: int = 200
    learning_rate: float = 2e-3
    batch_size: int = 2
    gate_bias: float = 0.75  # beta
    gate_temperature: float = 0.1  # tau
    flip: bool = False
    checkpoint_every: int = 50


# ----------------------------------------------------------------------------------------------
# The edit and its processor


@dataclass
class ConceptEdit:
    """One concept's gated rank-one edit. direction u, i_star, i_class: (D,); value_targets: layer -> (hidden,)."""

    direction: torch.Tensor
    i_star: torch.Tensor
    i_class: torch.Tensor
    value_targets: dict[str, torch.Tensor]
    bias: float
    temperature: float
    scale: float = 1.0

    def gate(self, encodings: torch.Tensor) -> torch.Tensor:
        """encodings (B, T, D) -> scale * sigma((u^T e - beta) / tau): (B, T, 1)."""
        energy = encodings.float() @ self.direction.float()
        return (self.scale * torch.sigmoid((energy - self.bias) / self.temperature))[..., None]


@dataclass
class PerfusionAttnProcessor:
    """Cross-attention with K and V edited by every concept in `edits` (eq. 7-8), then SDPA as in diffusers'
    AttnProcessor2_0. Self-attention never gets this processor."""

    layer: str
    edits: list[ConceptEdit] = field(default_factory=list)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """hidden_states: (B, Q, C) or (B, C, H, W); encoder_hidden_states: (B, T, D)."""
        if encoder_hidden_states is None:
            raise ValueError("the Perfusion processor serves cross-attention layers only")
        prepared = attention_input(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query = attn.to_q(prepared.hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        # Eq. 7-8: W' e = W e + gate(e) (o* - W i*), with o*_K = W_k i_class (key locking) and o*_V learned.
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        for edit in self.edits:
            gate = edit.gate(encoder_hidden_states).to(key.dtype)  # (B, T, 1)
            anchors = torch.stack([edit.i_class, edit.i_star]).to(encoder_hidden_states.dtype)
            key_class, key_star = attn.to_k(anchors)
            value_star = attn.to_v(anchors[1])
            key = key + gate * (key_class - key_star)
            value = value + gate * (edit.value_targets[self.layer].to(value.dtype) - value_star)

        query, key, value = (split_heads(t, attn.heads) for t in (query, key, value))  # (B, heads, N, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=prepared.attention_mask, dropout_p=0.0
        )
        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)  # (B, Q, heads * d)
        return attention_output(attn, hidden_states, prepared)


@contextmanager
def edited_attention(components: Components, edit: ConceptEdit) -> Iterator[None]:
    """Install `edit` on every attn2 layer; an outer Perfusion concept stays (the edits sum). Restored after."""
    processors: dict[str, Any] = {}
    current = components.unet.attn_processors
    for name in cross_attention_layers(components.unet):
        outer = current[name]
        earlier = outer.edits if isinstance(outer, PerfusionAttnProcessor) else []
        if not isinstance(outer, PerfusionAttnProcessor) and "CustomDiffusion" in type(outer).__name__:
            raise ValueError("a perfusion adapter cannot be combined with a custom-diffusion adapter in one job")
        processors[name] = PerfusionAttnProcessor(name, [*earlier, edit])
    with installed(components.unet, processors):
        yield


# ----------------------------------------------------------------------------------------------
# Encodings


@torch.no_grad()
def inverse_covariance(components: Components, prompts: list[str], ridge: float = 1e-3) -> torch.Tensor:
    """C^-1 for C = E[e e^T] over every real token position of `prompts` (+ ridge * mean diag * I): (D, D)."""
    features = encode_prompts(components.text_encoder, components.tokenizer, prompts).float()
    rows = [f[: len(components.tokenizer(p)["input_ids"])] for p, f in zip(prompts, features, strict=True)]
    encodings = torch.cat(rows)
    covariance = encodings.T @ encodings / encodings.shape[0]
    covariance = covariance + ridge * covariance.diagonal().mean() * torch.eye(covariance.shape[0])
    return torch.linalg.inv(covariance.double()).float()


def mean_encoding(components: Components, prompts: list[str], word: str) -> torch.Tensor:
    """The mean over `prompts` of the text encoder's output at `word` (its last sub-token), one batch: (D,)."""
    word_ids = components.tokenizer(word, add_special_tokens=False)["input_ids"]
    positions = []
    for prompt in prompts:
        ids = components.tokenizer(prompt)["input_ids"]
        starts = [i for i in range(len(ids) - len(word_ids) + 1) if ids[i : i + len(word_ids)] == word_ids]
        if not starts:
            raise ValueError(f"{word!r} does not occur in {prompt!r}")
        positions.append(starts[0] + len(word_ids) - 1)
    features = encode_prompts(components.text_encoder, components.tokenizer, prompts)  # (P, L, D)
    return features[torch.arange(len(prompts)), torch.tensor(positions)].float().mean(dim=0)


def word_encoding(components: Components, prompt: str, word: str) -> torch.Tensor:
    """The text encoder's output at the (last sub-token of the first occurrence of) `word` in `prompt`: (D,)."""
    ids = components.tokenizer(prompt)["input_ids"]
    word_ids = components.tokenizer(word, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            features = encode_prompts(components.text_encoder, components.tokenizer, [prompt])[0]
            return features[start + len(word_ids) - 1].float()
    raise ValueError(f"{word!r} does not occur in {prompt!r}")


def energy_direction(i_star: torch.Tensor, inverse_cov: torch.Tensor) -> torch.Tensor:
    """u = C^-1 i* / (i*^T C^-1 i*): u^T e is e's energy along i*, 1 at e = i* (eq. 8)."""
    projected = inverse_cov @ i_star
    return projected / (i_star @ projected)


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
    """Learn S*'s embedding and the value targets o*_V of every attn2 layer on inputs["images"], with S*'s key
    locked to the class word; returns a "perfusion" adapter."""
    # 1. Check inputs
    images = check_inputs(components, params, inputs)
    started = time.perf_counter()

    # 2. Data and the fixed parts of the edit: the class word's encoding, C^-1 over the caption corpus
    latents = images_to_latents(components, images, flip=params.flip)
    with torch.no_grad():
        i_class = word_encoding(components, f"a {params.class_word}", params.class_word)
        inverse_cov = inverse_covariance(components, caption_corpus(components.domain)).to(components.device)

    # 3. Trainables: S*'s embedding and o*_V per layer, and the edit they drive
    embedding, value_targets = edit_trainables(components, i_class, generator)
    trainable: dict[str, torch.nn.Parameter] = {TOKEN_EMBEDDINGS_KEY: embedding}
    trainable.update({name + VALUE_SUFFIX: target for name, target in value_targets.items()})
    edit = ConceptEdit(
        torch.zeros_like(i_class), i_class, i_class, dict(value_targets), params.gate_bias, params.gate_temperature
    )

    # 4. Optimise the denoising loss; i* and u follow the embedding every step
    log = optimise(components, params, trainable, edit, latents, inverse_cov, generator, callback, checkpoints)

    # 5. The adapter
    tensors = {name: parameter.detach().float().cpu().clone() for name, parameter in trainable.items()}
    for name, vector in (("i_star", edit.i_star), ("i_class", i_class), ("direction", edit.direction)):
        tensors[name] = vector.detach().float().cpu().clone()
    adapter = Adapter(type="perfusion", tensors=tensors, metadata=adapter_metadata(params))
    metrics = training_metrics(log, params.steps, started)
    metrics["gate_at_token"] = round(float(edit.gate(edit.i_star[None, None])), 4)
    return MethodOutput(adapter=adapter, metrics=metrics, result={"tokens": [params.token]})


def check_inputs(components: Components, params: Params, inputs: dict[str, object]) -> list[Image.Image]:
    """The concept's images; ValueError naming the first bad input or value (token, class word, counts, gate)."""
    images = images_list(inputs, "images")
    check_concept(components, params.token, params.class_word)
    check_prompt(components.tokenizer, f"a {params.class_word}", "class_word")
    check_at_least_one(steps=params.steps, batch_size=params.batch_size)
    if params.gate_temperature <= 0:
        raise ValueError(f"gate_temperature must be positive, got {params.gate_temperature}")
    return images


def edit_trainables(
    components: Components, i_class: torch.Tensor, generator: torch.Generator
) -> tuple[torch.nn.Parameter, dict[str, torch.nn.Parameter]]:
    """(S*'s embedding (1, D): a fresh vector, since initialised at the class word's the gate would fire on the
    class word too; o*_V = W_v i_class (hidden,) by attn2 layer, the value targets' starting point)."""
    embedding = torch.nn.Parameter(identifier_vectors(components, 1, generator).to(components.device))
    with torch.no_grad():
        value_targets = {
            name: torch.nn.Parameter(attn.to_v(i_class.to(attn.to_v.weight.dtype)).float().clone())
            for name, attn in cross_attention_layers(components.unet).items()
        }
    return embedding, value_targets


def optimise(
    components: Components,
    params: Params,
    trainable: dict[str, torch.nn.Parameter],
    edit: ConceptEdit,
    latents: torch.Tensor,
    inverse_cov: torch.Tensor,
    generator: torch.Generator,
    callback: ProgressCallback,
    checkpoints: Checkpoints | None,
) -> TrainingLog:
    """Minimise the denoising loss (AdamW) under captions with S*, with the token added and `edit` installed for
    the loop only; before every step, and once after the last, i* and u are recomputed from the embedding."""
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=params.learning_rate, weight_decay=0.0)
    scheduler = components.ddim()
    contexts = context_prompts(components.domain, params.token)
    with ExitStack() as stack:
        stack.enter_context(added_tokens(components, [params.token], trainable[TOKEN_EMBEDDINGS_KEY]))
        stack.enter_context(edited_attention(components, edit))

        def refresh() -> None:
            edit.i_star = mean_encoding(components, contexts, params.token)
            edit.direction = energy_direction(edit.i_star, inverse_cov)

        def step_fn(step: int) -> float:
            refresh()
            loss = concept_loss(components, scheduler, latents, params.token, params.batch_size, generator).mean()
            return optimizer_step(optimizer, loss)

        log = train_parameters(
            trainable,
            optimizer,
            step_fn,
            steps=params.steps,
            checkpoint_every=params.checkpoint_every,
            generator=generator,
            callback=callback,
            checkpoints=checkpoints,
        )
        with torch.no_grad():
            refresh()
    return log


def adapter_metadata(params: Params) -> dict[str, str]:
    """The adapter's header: its token, class word, the gate's bias and temperature, the training options."""
    return {
        "tokens": tokens_metadata([params.token]),
        "class_word": params.class_word,
        "gate_bias": str(params.gate_bias),
        "gate_temperature": str(params.gate_temperature),
        "steps": str(params.steps),
        "learning_rate": str(params.learning_rate),
    }


# ----------------------------------------------------------------------------------------------
# Using the adapter


def adapter_edit(components: Components, adapter: Adapter, scale: float) -> ConceptEdit:
    """The adapter's edit at strength `scale`, checked against this model's layers and sizes."""
    if adapter.type != "perfusion":
        raise ValueError(f"not a perfusion adapter: {adapter.type!r}")
    hidden_size = int(components.text_encoder.config.hidden_size)
    vectors = {}
    for name in ("i_star", "i_class", "direction"):
        tensor = adapter.tensors.get(name)
        if tensor is None or tuple(tensor.shape) != (hidden_size,):
            raise ValueError(f"perfusion adapter tensor {name!r} must have shape ({hidden_size},)")
        vectors[name] = tensor.to(components.device)
    targets = {}
    for name, attn in cross_attention_layers(components.unet).items():
        target = adapter.tensors.get(name + VALUE_SUFFIX)
        if target is None or target.shape[0] != attn.to_v.weight.shape[0]:
            raise ValueError(f"perfusion adapter lacks a value target of the right size for layer {name!r}")
        targets[name] = target.to(components.device)
    try:
        bias = float(adapter.metadata.get("gate_bias", Params.gate_bias))
        temperature = float(adapter.metadata.get("gate_temperature", Params.gate_temperature))
    except ValueError as exc:
        raise ValueError("perfusion adapter metadata gate_bias/gate_temperature must be numbers") from exc
    return ConceptEdit(vectors["direction"], vectors["i_star"], vectors["i_class"], targets, bias, temperature, scale)


@contextmanager
def apply(components: Components, adapter: Adapter, scale: float) -> Iterator[None]:
    """Add S* and its gated rank-one K/V edit at strength `scale` for the block (another Perfusion concept applied
    around it stays in effect: the edits sum); the model's own processors and tokens come back afterwards."""
    edit = adapter_edit(components, adapter, scale)
    vectors = adapter.tensors.get(TOKEN_EMBEDDINGS_KEY)
    if vectors is None:
        raise ValueError(f"perfusion adapter lacks {TOKEN_EMBEDDINGS_KEY!r}")
    with ExitStack() as stack:
        stack.enter_context(added_tokens(components, adapter.tokens, vectors))
        stack.enter_context(edited_attention(components, edit))
        yield
