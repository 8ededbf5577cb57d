"""Where a module computes, which is not where its weights rest when it is offloaded to the CPU."""

from __future__ import annotations

import torch


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device `module` runs on: with a model-level CPU offload hook installed (accelerate's
    `cpu_offload_with_hook`, as the worker's `ATELIER_CPU_OFFLOAD=model` installs it) the hook's execution device,
    even while the weights rest on the CPU; otherwise the device of its first parameter.

    Tensors a method makes for a module (latents, noise, masks) belong on this device, as diffusers' pipelines use
    their `_execution_device`."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next(module.parameters()).device
