"""LoRA: low-rank adaptation (Hu et al., ICLR 2022) of the UNet's attention projections, optionally the text encoder.

Each targeted linear map W (to_q, to_k, to_v, to_out.0 of every UNet attention; q/k/v/out_proj of the text encoder
when `train_text_encoder`) becomes W + (alpha / r) B A with A: (r, in), B: (out, r), B initialised to zero, so
training starts from the base model (eq. 3 of the paper). Only A and B train, with the latent-diffusion loss on
captions "a S* <class word> ..." from the shared templates (DreamBooth-style prompts without prior preservation;
the token S* is plain text the tokenizer splits, no embedding is added).

peft injects the low-rank layers into the shared modules for the length of training (and of `apply`), and a finally
puts the original `nn.Linear` modules back, so the base weights are never written.
File format: diffusers' (`pipeline.load_lora_weights`): keys "unet.<module>.lora_A.weight" / ".lora_B.weight" and
"text_encoder.<...>", with alpha / r folded into B so any loader applies it at scale 1. An SDXL LoRA (applied, not
trained here) may also hold "text_encoder_2.<...>" keys for the second text encoder.
Not implemented: LoRA on convolutions or feed-forward layers, DoRA and other peft variants.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from PIL import Image

from contract.domains import defaults
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.mixed_precision import MasterWeights
from models.personalization.common import Adapter, Checkpoints, tokens_metadata
from models.personalization.training import (
    TrainingLog,
    check_at_least_one,
    concept_loss,
    concept_phrase,
    images_to_latents,
    train_parameters,
    training_metrics,
)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PREFIXES = ("unet", "text_encoder", "text_encoder_2")  # what a file may hold; training writes the first two
_names = itertools.count()


# Params' defaults are the zoo's; the service fills a job's from its model's domain (contract/domains.py).
ZOO = defaults("lora", "shapesworld")


@dataclass(frozen=True)
class Params:
    token: str
    class_word: str
    rank: int = 4
    alpha: float = 4.0
    train_text_encoder: bool = False
    steps: int = ZOO["steps"]
    learning_rate: float = ZOO["learning_rate"]
    batch_size: int = 4
    flip: bool = False
    checkpoint_every: int = 50


def check_params(params: Params, images: list[Image.Image]) -> None:
    """Raise ValueError naming the first bad value."""
    if not 1 <= len(images) <= 20:
        raise ValueError(f"images must hold 1 to 20 images, got {len(images)}")
    if not params.token or " " in params.token:
        raise ValueError(f"token must be one word, got {params.token!r}")
    if not 1 <= params.rank <= 128:
        raise ValueError(f"rank must be in [1, 128], got {params.rank}")
    if params.alpha <= 0:
        raise ValueError(f"alpha must be positive, got {params.alpha}")
    check_at_least_one(steps=params.steps)


def _modules(components: Components, prefix: str) -> torch.nn.Module:
    module: torch.nn.Module | None = getattr(components, prefix)
    if module is None:
        raise ValueError(f"the LoRA has {prefix}.* weights but the model has no {prefix}")
    return module


@contextlib.contextmanager
def injected(model: torch.nn.Module, config: LoraConfig, state: dict[str, torch.Tensor] | None = None) -> Iterator[str]:
    """Inject a LoRA adapter (yields its name) into `model` for the block, loading `state` (peft keys) if given.

    Other adapters already injected stay active beside it (their outputs add up). On exit the adapter is deleted,
    and a layer left with no adapter is replaced by its original base module, so the model is as it was."""
    name = f"atelier{next(_names)}"
    had_config = "peft_config" in vars(model)
    with warnings.catch_warnings():  # a second adapter beside the first is what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model, adapter_name=name)
    try:
        layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
        for layer in layers:  # every installed adapter active, so two LoRAs combine
            layer.set_adapter(list(layer.lora_A.keys()))
        if state is not None:
            result = set_peft_model_state_dict(model, state, adapter_name=name)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"LoRA keys that match no layer of the model: {unexpected[:3]}")
        yield name
    finally:
        _remove(model, name, had_config)


def _remove(model: torch.nn.Module, name: str, had_config: bool) -> None:
    """Delete adapter `name`; put back the base module where no adapter is left, and peft's config attribute."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer) and name in child.lora_A:
                child.delete_adapter(name)
                if not child.lora_A:
                    setattr(parent, child_name, child.get_base_layer())
                else:
                    child.set_adapter(list(child.lora_A.keys()))
    configs = vars(model).get("peft_config")
    if isinstance(configs, dict):
        configs.pop(name, None)
        if not configs and not had_config:
            del model.peft_config


def _peft_state(model: torch.nn.Module, name: str, alpha_over_rank: float) -> dict[str, torch.Tensor]:
    """The adapter's A and B in peft keys, with alpha / r folded into B (so the file applies at alpha = r)."""
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {
        key: (tensor * alpha_over_rank if ".lora_B." in key else tensor).detach().to("cpu", torch.float32).clone()
        for key, tensor in state.items()
    }


def run(
    components: Components,
    params: Params,
    inputs: dict[str, Any],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
    checkpoints: Checkpoints | None = None,
) -> MethodOutput:
    """Train LoRA weights for the concept in `inputs["images"]`; returns the adapter and the loss."""
    # 1. Check inputs
    images: list[Image.Image] = list(inputs.get("images") or [])
    check_params(params, images)

    # 2. Encode the training images once (the VAE is frozen)
    latents = images_to_latents(components, images, flip=params.flip).to(components.device)
    concept = concept_phrase(params.token, params.class_word)
    prefixes = PREFIXES[:2] if params.train_text_encoder else PREFIXES[:1]

    # 3. Inject the low-rank layers (B = 0: the model starts as the base model) and train only them
    with contextlib.ExitStack() as stack:
        names: dict[str, str] = {}
        for prefix in prefixes:
            names[prefix] = stack.enter_context(injected(_modules(components, prefix), lora_config(params, prefix)))
        trainable = lora_parameters(components, names)
        initialise(trainable, generator)
        log = train_lora(components, params, trainable, latents, concept, generator, callback, checkpoints)

        # 4. The adapter in diffusers' key layout, alpha / r folded into B
        tensors: dict[str, torch.Tensor] = {}
        for prefix in prefixes:
            state = _peft_state(_modules(components, prefix), names[prefix], params.alpha / params.rank)
            tensors.update({f"{prefix}.{key}": tensor for key, tensor in state.items()})

    adapter = Adapter(
        type="lora",
        tensors=tensors,
        metadata={
            "tokens": tokens_metadata([params.token]),
            "class_word": params.class_word,
            "rank": str(params.rank),
            "alpha": str(params.alpha),
            "train_text_encoder": str(params.train_text_encoder).lower(),
        },
    )
    metrics = training_metrics(log, params.steps)
    metrics["trainable_parameters"] = sum(p.numel() for p in trainable.values())
    return MethodOutput(adapter=adapter, metrics=metrics, result={"tokens": [params.token], "prompt": f"a {concept}"})


def lora_config(params: Params, prefix: str) -> LoraConfig:
    """The LoRA layers of rank r and scale alpha for one component ("unet": UNET_TARGETS, "text_encoder":
    TEXT_ENCODER_TARGETS); peft's init makes B = 0, A is drawn again by `initialise`."""
    targets = {"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS}
    return LoraConfig(
        r=params.rank, lora_alpha=params.alpha, target_modules=list(targets[prefix]), init_lora_weights=True
    )


def lora_parameters(components: Components, names: dict[str, str]) -> dict[str, torch.nn.Parameter]:
    """The injected A and B of adapter `names[prefix]` in each component, by "<prefix>.<peft key>" with the
    adapter's name left out (so a resumed run, whose adapter has another name, finds them)."""
    return {
        f"{prefix}.{key.replace(f'.{name}.', '.')}": parameter
        for prefix, name in names.items()
        for key, parameter in _modules(components, prefix).named_parameters()
        if f".{name}." in f".{key}." and "lora_" in key
    }


def initialise(trainable: dict[str, torch.nn.Parameter], generator: torch.Generator) -> None:
    """Make the LoRA weights trainable (in the base's dtype: `train_lora` keeps float32 masters of them) and draw
    every A again with peft's kaiming-uniform bound from the job's generator, in `trainable`'s order
    (determinism)."""
    for key, parameter in trainable.items():
        parameter.requires_grad_(True)
        if ".lora_A." in key:
            bound = 1.0 / math.sqrt(parameter.shape[1])
            noise = torch.rand(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.data.copy_((noise * 2 - 1) * bound)


def train_lora(
    components: Components,
    params: Params,
    trainable: dict[str, torch.nn.Parameter],
    latents: torch.Tensor,
    concept: str,
    generator: torch.Generator,
    callback: ProgressCallback,
    checkpoints: Checkpoints | None,
) -> TrainingLog:
    """Optimise the latent-diffusion loss over the LoRA weights alone (AdamW), with float32 masters of them on a
    half-precision base (`MasterWeights`)."""
    master = MasterWeights(trainable)
    optimizer = torch.optim.AdamW(list(master.params.values()), lr=params.learning_rate, weight_decay=1e-2)
    scheduler = components.ddim()

    def step(index: int) -> float:
        with torch.enable_grad():
            loss = concept_loss(components, scheduler, latents, concept, params.batch_size, generator).mean()
        return master.step(optimizer, loss)

    return train_parameters(
        master,
        optimizer,
        step,
        steps=params.steps,
        checkpoint_every=params.checkpoint_every,
        generator=generator,
        callback=callback,
        checkpoints=checkpoints,
    )


def split_state(adapter: Adapter) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's tensors by component ("unet", "text_encoder"), in peft keys; ValueError on foreign keys.

    Accepts diffusers' keys ("unet.<module>.lora_A.weight") and peft's with the default adapter name inside."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix not in PREFIXES or not (rest.endswith(".lora_A.weight") or rest.endswith(".lora_B.weight")):
            raise ValueError(
                f"LoRA key {key!r} is not unet.*, text_encoder.* or text_encoder_2.* ending in lora_A/lora_B.weight"
            )
        parts.setdefault(prefix, {})[rest.replace(".default.", ".")] = tensor
    return parts


def config_for(state: dict[str, torch.Tensor]) -> LoraConfig:
    """A LoraConfig matching a state dict: its modules, and alpha = r per module (alpha / r is folded into B)."""
    ranks: dict[str, int] = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight"):
            ranks[key[: -len(".lora_A.weight")]] = int(tensor.shape[0])
    for module in ranks:
        if f"{module}.lora_B.weight" not in state:
            raise ValueError(f"LoRA module {module!r} has lora_A but no lora_B")
    if not ranks:
        raise ValueError("the LoRA file has no lora_A weights")
    first = next(iter(ranks.values()))
    return LoraConfig(
        r=first,
        lora_alpha=first,
        target_modules=list(ranks),
        rank_pattern=dict(ranks),
        alpha_pattern={module: float(rank) for module, rank in ranks.items()},
    )


@contextlib.contextmanager
def apply(components: Components, adapter: Adapter, scale: float = 1.0) -> Iterator[None]:
    """Install the LoRA weights for the block, at `scale` times their trained strength (0 = off)."""
    with contextlib.ExitStack() as stack:
        for prefix, state in split_state(adapter).items():
            model = _modules(components, prefix)
            first = next(model.parameters())
            state = {key: tensor.to(device=first.device, dtype=first.dtype) for key, tensor in state.items()}
            name = stack.enter_context(injected(model, config_for(state), state))
            for layer in model.modules():
                if isinstance(layer, LoraLayer) and name in layer.lora_A:
                    layer.set_scale(name, scale)
        yield
