"""Shared helpers of every personalization method: data, prompts, the denoising loss, tokens, and the loop.

- `images_to_latents`: training images -> VAE latents (optionally with horizontal flips);
- `training_prompts`: captions with the concept in them, in the words of the model's domain (`captions.py`);
- `noise_prediction_loss`: the latent-diffusion training objective (Ho et al. 2020, eq. 14, on latents);
- `added_tokens`: a context manager that adds new tokens to the tokenizer and text encoder and removes them after,
  leaving the shared components exactly as they were (the base embedding table is never written);
- `optimizer_tensors` / `load_optimizer_tensors`: an optimizer's state flattened to tensors for checkpoints;
- `train_loop`: steps, progress callback (cancel), checkpoint every N steps, resume from the last checkpoint;
- the tail every method's `run()` shares: `check_at_least_one` (step and batch counts), `concept_loss` and
  `class_loss` (the denoising loss on a random batch of the concept's or the class's images), `train_parameters`
  (`train_loop` with checkpoints of the trainable tensors and the optimizer) and `training_metrics`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image, ImageOps
from transformers import CLIPTokenizer

from contract.domains import Domain
from models.common.components import Components, ProgressCallback
from models.common.latents import encode, images_to_tensor, randn
from models.common.mixed_precision import MasterWeights
from models.common.prediction import training_target
from models.common.text import encode_prompts
from models.personalization.captions import templates
from models.personalization.common import Checkpoints


def concept_phrase(token: str, class_word: str) -> str:
    """ "<s1> circle": the new token followed by its class word (the class word may be empty)."""
    return f"{token} {class_word}".strip()


def training_prompts(concept: str, count: int, generator: torch.Generator, domain: Domain) -> list[str]:
    """`count` captions drawn from the model domain's templates (`captions.templates`) with `concept` (e.g.
    "<s1> circle") in them."""
    choices = templates(domain)
    picks = torch.randint(0, len(choices), (count,), generator=generator).tolist()
    return [choices[i].format(concept=concept) for i in picks]


@torch.no_grad()
def images_to_latents(components: Components, images: list[Image.Image], *, flip: bool = False) -> torch.Tensor:
    """Training images (resized to the model's native size: 64 px for the zoo) -> latents (N or 2N, 4, h, w).

    With `flip`, the mirrored images follow the originals (do not use it for asymmetric subjects)."""
    size = components.native_size
    images = [image.convert("RGB") for image in images]
    if flip:
        images = images + [ImageOps.mirror(image) for image in images]
    pixels = images_to_tensor(images, (size, size))
    return encode(components.vae, pixels).float()


def noise_prediction_loss(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-example denoising loss || eps - eps_theta(z_t, t, c) ||^2 (mean over latent cells), shape (B,).

    latents: (B, 4, h, w) clean latents; text_embeddings: (B, L, D). t ~ U{0..T-1} and eps from `generator`.
    For v-prediction models the target is the velocity. The caller weights and averages (prior preservation)."""
    batch = latents.shape[0]
    noise = randn(latents.shape, generator, latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(
        noisy.to(unet.dtype), timesteps, encoder_hidden_states=text_embeddings.to(unet.dtype)
    ).sample.float()
    target = training_target(scheduler, latents, noise, timesteps)
    return F.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))


class ExtendedEmbedding(torch.nn.Module):
    """A token embedding table with extra rows appended, without touching the base table.

    base: the text encoder's own nn.Embedding (V, D), read only; extra: (n, D), the new tokens' vectors
    (a trainable Parameter during textual inversion, a fixed tensor when an adapter is applied)."""

    def __init__(self, base: torch.nn.Module, extra: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.extra = extra

    @property
    def weight(self) -> torch.Tensor:
        base_weight = self.base.weight
        assert isinstance(base_weight, torch.Tensor)
        return torch.cat([base_weight, self.extra.to(base_weight.dtype)], dim=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def token_vectors(components: Components, words: list[str]) -> torch.Tensor:
    """The mean input embedding of the (sub)tokens of each word: (len(words), D), a detached copy."""
    table = components.text_encoder.get_input_embeddings().weight
    rows = []
    for word in words:
        ids = components.tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"word {word!r} gives no tokens")
        rows.append(table[ids].mean(dim=0))
    return torch.stack(rows).detach().clone().float()


def is_known_word(tokenizer: CLIPTokenizer, word: str) -> bool:
    """Whether the tokenizer already has `word` as one token (CLIP's BPE keeps whole words as "word</w>")."""
    vocabulary = tokenizer.get_vocab()
    return word in vocabulary or f"{word}</w>" in vocabulary


def expand_aliases(text: str, aliases: dict[str, str]) -> str:
    """Replace each whole word of `text` that is a key of `aliases` by its value ("<s1>" -> "<s1> <s1>_1")."""
    return " ".join(aliases.get(word, word) for word in text.split(" "))


def _with_aliases(tokenizer: CLIPTokenizer, aliases: dict[str, str]) -> CLIPTokenizer:
    """The tokenizer, re-classed so that prompts have `aliases` expanded before tokenizing (multi-vector tokens,
    as diffusers' `maybe_convert_prompt` does in its pipelines). Aliases accumulate when adapters nest."""
    base = type(tokenizer)
    merged = {**getattr(tokenizer, "atelier_aliases", {}), **aliases}

    def convert(text: Any) -> Any:
        if isinstance(text, str):
            return expand_aliases(text, merged)
        if isinstance(text, list | tuple) and all(isinstance(item, str) for item in text):
            return [expand_aliases(item, merged) for item in text]
        return text

    class AliasTokenizer(base):  # type: ignore[valid-type,misc]
        atelier_aliases = merged

        def __call__(self, text: Any = None, *args: Any, **kwargs: Any) -> Any:
            return super().__call__(convert(text), *args, **kwargs)

        def encode(self, text: Any, *args: Any, **kwargs: Any) -> Any:
            return super().encode(convert(text), *args, **kwargs)

        def tokenize(self, text: Any, *args: Any, **kwargs: Any) -> Any:
            return super().tokenize(convert(text), *args, **kwargs)

    AliasTokenizer.__name__ = base.__name__
    tokenizer.__class__ = AliasTokenizer
    return tokenizer


@contextmanager
def added_tokens(
    components: Components,
    tokens: list[str],
    vectors: torch.Tensor,
    aliases: dict[str, str] | None = None,
    second: bool = False,
) -> Iterator[list[int]]:
    """Add `tokens` with embedding rows `vectors` (n, D) for the length of the block; yields their ids.

    Installs a copy of the tokenizer and an `ExtendedEmbedding` on the text encoder, and puts the originals back in
    a finally, so the shared components come out exactly as they went in. Blocks nest (two adapters' tokens).
    `aliases` maps a prompt word to the tokens it stands for (a multi-vector concept "<s1>" -> "<s1> <s1>_1").
    `second`: SDXL's second text encoder and tokenizer instead of the first."""
    if vectors.shape[0] != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {vectors.shape[0]} embedding vectors")
    encoder_name, tokenizer_name = ("text_encoder_2", "tokenizer_2") if second else ("text_encoder", "tokenizer")
    text_encoder = getattr(components, encoder_name)
    original_tokenizer = getattr(components, tokenizer_name)
    if text_encoder is None or original_tokenizer is None:
        raise ValueError(f"the model has no {encoder_name}")
    original_embedding = text_encoder.get_input_embeddings()
    hidden = int(original_embedding.weight.shape[1])
    if vectors.ndim != 2 or vectors.shape[1] != hidden:
        raise ValueError(f"token vectors must be (n, {hidden}) for this text encoder, got {tuple(vectors.shape)}")
    if len(original_tokenizer) != original_embedding.weight.shape[0]:
        raise ValueError("the tokenizer and the text encoder's embedding table disagree in size")
    tokenizer = copy.deepcopy(original_tokenizer)
    for token in tokens:
        if is_known_word(tokenizer, token) or tokenizer.add_tokens([token]) != 1:
            raise ValueError(f"token {token!r} is already in the vocabulary; choose a new one, e.g. '<s1>'")
    if aliases:
        tokenizer = _with_aliases(tokenizer, aliases)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    extended = ExtendedEmbedding(original_embedding, vectors.to(original_embedding.weight.device))
    setattr(components, tokenizer_name, tokenizer)
    text_encoder.set_input_embeddings(extended)
    try:
        yield list(ids)
    finally:
        text_encoder.set_input_embeddings(original_embedding)
        setattr(components, tokenizer_name, original_tokenizer)


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optimizer.") -> dict[str, torch.Tensor]:
    """The per-parameter state of an optimizer (e.g. AdamW's step, exp_avg, exp_avg_sq) as flat named tensors."""
    flat: dict[str, torch.Tensor] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            flat[f"{prefix}{index}.{key}"] = tensor.detach().to("cpu").clone()
    return flat


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor], prefix: str = "optimizer."
) -> None:
    """Restore what `optimizer_tensors` wrote (param groups, i.e. learning rates, come from the optimizer)."""
    state_dict = optimizer.state_dict()
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        if name.startswith(prefix):
            index, key = name[len(prefix) :].split(".", 1)
            per_param.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": per_param, "param_groups": state_dict["param_groups"]})


RNG_KEY = "rng"
STEP_LOSSES_KEY = "losses"


@dataclass
class TrainingLog:
    """What a training loop did: the loss of every step (including resumed ones), where it started, its time."""

    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10% of steps (at least one), a steadier figure than the last step's."""
        tail = max(1, len(self.losses) // 10)
        return float(sum(self.losses[-tail:]) / tail) if self.losses else float("nan")


def pick(count: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` indices drawn uniformly from range(count) with `generator` (the rows of one training batch)."""
    return torch.randint(0, count, (batch,), generator=generator)


def parameter_state(
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    restored: Callable[[], None] | None = None,
) -> tuple[Callable[[], dict[str, torch.Tensor]], Callable[[dict[str, torch.Tensor]], None]]:
    """`train_loop`'s (get_state, set_state) for the usual case: the trainable tensors by name plus the
    optimizer's state (`optimizer_tensors`); set_state copies them back in place, onto each tensor's device,
    then calls `restored` (e.g. `MasterWeights.sync`)."""

    def get_state() -> dict[str, torch.Tensor]:
        return {**{name: parameter.detach() for name, parameter in trainable.items()}, **optimizer_tensors(optimizer)}

    def set_state(state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, parameter in trainable.items():
                parameter.copy_(state[name].to(parameter.device))
        load_optimizer_tensors(optimizer, state)
        if restored is not None:
            restored()

    return get_state, set_state


def train_loop(
    *,
    steps: int,
    step_fn: Callable[[int], float],
    get_state: Callable[[], dict[str, torch.Tensor]],
    set_state: Callable[[dict[str, torch.Tensor]], None],
    generator: torch.Generator,
    callback: ProgressCallback,
    checkpoints: Checkpoints | None = None,
    checkpoint_every: int = 0,
) -> TrainingLog:
    """Run `step_fn(step)` (one optimisation step, returns its loss) for steps 0..steps-1.

    Resume: if `checkpoints` holds one, `set_state` gets its tensors, the generator its RNG state, and the loop
    continues after its step (so a resumed run draws the same noise as an uninterrupted one). After each step
    `callback(step + 1, steps)` (it may raise to cancel); every `checkpoint_every` steps `checkpoints.save` gets
    `get_state()` plus the RNG state and the losses so far."""
    log = TrainingLog()
    start = 0
    if checkpoints is not None:
        last = checkpoints.load()
        if last is not None:
            start, state = last
            generator.set_state(state.pop(RNG_KEY))
            log.losses = [float(x) for x in state.pop(STEP_LOSSES_KEY, torch.zeros(0)).tolist()]
            set_state(state)
            log.resumed_from = start
    started = time.perf_counter()
    for step in range(start, steps):
        log.losses.append(float(step_fn(step)))
        callback(step + 1, steps)
        if checkpoints is not None and checkpoint_every > 0 and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            state = {name: tensor.detach().to("cpu").clone() for name, tensor in get_state().items()}
            state[RNG_KEY] = generator.get_state()
            state[STEP_LOSSES_KEY] = torch.tensor(log.losses, dtype=torch.float64)
            checkpoints.save(step + 1, state)
    log.seconds = time.perf_counter() - started
    return log


# ----------------------------------------------------------------------------------------------
# The tail of every method's run(): checks, the batch loss, the loop with checkpoints, the metrics


def check_at_least_one(**values: int) -> None:
    """ValueError naming the first of `values` (e.g. steps=..., batch_size=...) that is below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def concept_loss(
    components: Components,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    phrase: str,
    batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-example denoising loss (batch_size,) on `batch_size` rows of `latents` (N, 4, h, w) captioned with
    `phrase` in random templates of the model's domain, through `components`' UNet, text encoder and tokenizer
    (read now, so added tokens and installed layers count). Draws, in order: the rows, the templates, then the
    loss's noise and timesteps, all from `generator`."""
    rows = pick(latents.shape[0], batch_size, generator)
    prompts = training_prompts(phrase, batch_size, generator, components.domain)
    cond = encode_prompts(components.text_encoder, components.tokenizer, prompts)
    return noise_prediction_loss(components.unet, scheduler, latents[rows], cond, generator)


def class_loss(
    components: Components,
    scheduler: DDIMScheduler,
    class_latents: torch.Tensor,
    prompt: str,
    batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-example denoising loss (batch_size,) on `batch_size` rows of the class images' latents, all captioned
    with the fixed `prompt` ("a <class>"): DreamBooth's prior-preservation and Custom Diffusion's
    regularisation term. Draws the rows, then the loss's noise and timesteps, from `generator`."""
    rows = pick(class_latents.shape[0], batch_size, generator)
    cond = encode_prompts(components.text_encoder, components.tokenizer, [prompt] * batch_size)
    return noise_prediction_loss(components.unet, scheduler, class_latents[rows], cond, generator)


def train_parameters(
    trainable: dict[str, torch.nn.Parameter] | MasterWeights,
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[[int], float],
    *,
    steps: int,
    checkpoint_every: int,
    generator: torch.Generator,
    callback: ProgressCallback,
    checkpoints: Checkpoints | None,
) -> TrainingLog:
    """`train_loop` over `step_fn` whose checkpoints hold the `trainable` tensors by name (a `MasterWeights`'
    float32 masters) and the optimizer's state (`parameter_state`): the loop every personalization method runs."""
    if isinstance(trainable, MasterWeights):
        get_state, set_state = parameter_state(trainable.params, optimizer, trainable.sync)
    else:
        get_state, set_state = parameter_state(trainable, optimizer)
    return train_loop(
        steps=steps,
        step_fn=step_fn,
        get_state=get_state,
        set_state=set_state,
        generator=generator,
        callback=callback,
        checkpoints=checkpoints,
        checkpoint_every=checkpoint_every,
    )


def training_metrics(log: TrainingLog, steps: int, started: float | None = None) -> dict[str, float | int | str]:
    """The metrics every training job reports: final_loss, steps, seconds, resumed_from.

    With `started` (`time.perf_counter()` at the start of the job) "seconds" is the whole job and
    "train_seconds" the loop alone; without it "seconds" is the loop."""
    metrics: dict[str, float | int | str] = {"final_loss": round(log.final_loss, 6), "steps": steps}
    if started is None:
        metrics["seconds"] = round(log.seconds, 3)
    else:
        metrics["seconds"] = round(time.perf_counter() - started, 3)
        metrics["train_seconds"] = round(log.seconds, 3)
    metrics["resumed_from"] = log.resumed_from
    return metrics
