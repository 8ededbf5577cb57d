"""Memory on a worker's device: VAE tiling, model-level CPU offload, `torch.compile` of the UNet, and memory returned
after training jobs (`ATELIER_VAE_TILING`, `ATELIER_CPU_OFFLOAD`, `ATELIER_COMPILE`; issue 12).

What is set once per loaded model (`prepare`): the VAE's slicing and tiling flags and the UNet's compiled call.
What is installed per job and removed after it (`job_memory`): the offload hooks, so that no job leaves them on the
shared model and every job ends with the weights back on the CPU.
"""

from __future__ import annotations

import gc
import logging
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from accelerate import cpu_offload_with_hook
from accelerate.hooks import UserCpuOffloadHook
from diffusers import AutoencoderKL, UNet2DConditionModel

from models.common.components import Components

log = logging.getLogger("atelier.worker")


# ----------------------------------------------------------------------------------------------
# VAE slicing and tiling


def vae_tiled(mode: str, device: torch.device) -> bool:
    """Whether a worker on `device` decodes and encodes large images in tiles: `on` always, `off` never, `auto` on a
    CUDA device only (a CPU worker is not short of memory, and tiles are blended at their seams, so it keeps
    whole-image decodes)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"vae tiling must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def configure_vae(vae: AutoencoderKL, *, tiled: bool, tile_pixels: int) -> None:
    """Set diffusers' own flags, which `vae.encode` / `vae.decode` (and so `models.common.latents`) obey.

    tiled: a batch is decoded one image at a time (slicing, the same result), and an image with a side larger than
    `tile_pixels` (the model's native size) is decoded from overlapping tiles of that size blended at their seams
    (encoded likewise); untiled: whole batches and whole images."""
    if tile_pixels < 8:
        raise ValueError(f"tile size must be at least 8 pixels, got {tile_pixels}")
    if not tiled:
        vae.disable_slicing()
        vae.disable_tiling()
        return
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.enable_slicing()
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_pixels
    vae.tile_latent_min_size = tile_pixels // scale


# ----------------------------------------------------------------------------------------------
# torch.compile


def compile_unet(unet: UNet2DConditionModel, mode: str) -> None:
    """Compile the UNet's call in place (`nn.Module.compile`: the module, its parameter names and its attention
    processors stay as they are). The first job at each new shape pays the compilation; a job that changes the
    UNet's layers (adapters, attention control) may recompile."""
    if mode not in ("default", "reduce-overhead", "max-autotune"):
        raise ValueError(f"compile mode must be default, reduce-overhead or max-autotune, got {mode!r}")
    unet.compile(mode=None if mode == "default" else mode)


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@contextmanager
def eager(module: torch.nn.Module) -> Iterator[None]:
    """The module's plain (uncompiled) call for the block. For training jobs: a compiled call is bound to the shared
    module, so a `copy.deepcopy` of it (DreamBooth's and Imagic's trainable copies) would still run the original."""
    compiled = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


def prepare(components: Components, *, vae_tiling: str, compile: str, compile_mode: str, device: torch.device) -> None:
    """What a worker sets once on a model it loads: the VAE's tiling (tiles of the model's native size) and,
    with `compile="unet"`, the compiled UNet."""
    configure_vae(components.vae, tiled=vae_tiled(vae_tiling, device), tile_pixels=components.native_size)
    if compile == "unet":
        compile_unet(components.unet, compile_mode)
    elif compile != "off":
        raise ValueError(f"compile must be off or unet, got {compile!r}")


# ----------------------------------------------------------------------------------------------
# Model-level CPU offload


def offload_order(components: Components) -> list[torch.nn.Module]:
    """The modules in the order a job uses them: text encoder(s), UNet, VAE."""
    modules: list[torch.nn.Module | None] = [
        components.text_encoder,
        getattr(components, "text_encoder_2", None),  # SDXL's second encoder (None on SD 1.x/2.x)
        components.unet,
        components.vae,
    ]
    return [module for module in modules if module is not None]


def _remove_hook(module: torch.nn.Module) -> None:
    """accelerate's `remove_hook_from_module`, then the instance's `forward` attribute it leaves is dropped, so the
    module calls its class's forward as before the hook."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module)
    if "forward" in vars(module):
        del module.forward


@contextmanager
def offloaded(components: Components, device: torch.device) -> Iterator[list[UserCpuOffloadHook]]:
    """Model-level CPU offload for one job (as diffusers' `enable_model_cpu_offload`): the weights rest on the CPU
    and each module moves to `device` when it is called, the previous one in `offload_order` going back to the CPU
    then. A module's `forward`, and the VAE's `encode` / `decode` (diffusers' `apply_forward_hook`), trigger its hook;
    methods put their tensors on `components.device`, the hooks' device. After the block every module is on the
    CPU again and the hooks are gone."""
    hooks: list[UserCpuOffloadHook] = []
    try:
        previous = None
        for module in offload_order(components):
            _, previous = cpu_offload_with_hook(module, device, prev_module_hook=previous)
            hooks.append(previous)
        yield hooks
    finally:
        for hook in hooks:
            hook.offload()
            _remove_hook(hook.model)


@contextmanager
def resident(components: Components, device: torch.device) -> Iterator[None]:
    """Every module on `device` for the block, back on the CPU after: offload between jobs, for training jobs (their
    trainable copies are plain modules on the device, and their optimizer state stays beside them)."""
    modules = offload_order(components)
    try:
        for module in modules:
            module.to(device)
        yield
    finally:
        for module in modules:
            module.to("cpu")


@contextmanager
def job_memory(components: Components, *, offload: bool, device: torch.device, training: bool) -> Iterator[None]:
    """What one job runs under: with `offload`, hooks (inference) or the whole model on the device (training); for
    training, the UNet's plain call (`eager`). Everything is put back after."""
    with ExitStack() as stack:
        if training and is_compiled(components.unet):
            stack.enter_context(eager(components.unet))
        if offload:
            stack.enter_context(resident(components, device) if training else offloaded(components, device))
        yield


# ----------------------------------------------------------------------------------------------
# Memory returned after a job


def forget_frames(exc: BaseException) -> None:
    """Clear the local variables of the frames in `exc`'s traceback (those still running are skipped). A logged
    exception's record keeps its traceback, and a handler that keeps records (a buffer, an error reporter) would
    otherwise keep every tensor the failed method held, on the device, for as long as it keeps the record."""
    traceback.clear_frames(exc.__traceback__)


def release_memory(device: torch.device) -> dict[str, Any]:
    """After a training job, once the worker holds nothing of it: collect reference cycles and, on CUDA, give the
    allocator's cached blocks back to the device (a training job's copies and optimizer state can be gigabytes).
    Returns what CUDA still holds, for the log."""
    gc.collect()
    if device.type != "cuda":
        return {}
    torch.cuda.empty_cache()
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
