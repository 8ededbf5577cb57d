"""Mixed-precision training for the trainers that optimise tensors inside a half-precision model
(personalization, null-text inversion): float32 masters and optimizer state, the forward in the model's dtype."""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
INITIAL_LOSS_SCALE = 2.0**12
"""float16 gradients underflow below ~6e-8: the loss is multiplied by this before the backward pass (halved after
every step whose gradients overflow, which is then skipped) and the gradients divided by it again."""


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One step of `optimizer` on `loss` (gradients cleared first); returns the loss as a float for the log."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return float(loss.detach())


class MasterWeights:
    """Mixed-precision training (Micikevicius et al. 2018) for trainable parameters that live in a half-precision
    model: the optimizer steps float32 master copies (`params`), the model's own parameters stay in its dtype and
    receive the masters' values after each step, and the float16 loss is scaled so that its gradients do not
    underflow. Adam's state is then float32 too: in float16 its epsilon (1e-8) is 0 and its second moment
    underflows, which turns the first updates into NaN. In a float32 model it changes nothing: `params` are the
    parameters themselves and `step` is `optimizer_step`."""

    def __init__(self, trainable: dict[str, torch.nn.Parameter]) -> None:
        self.trainable = trainable
        self.half = any(parameter.dtype in HALF_DTYPES for parameter in trainable.values())
        self.params: dict[str, torch.nn.Parameter] = (
            {name: torch.nn.Parameter(p.detach().float().clone()) for name, p in trainable.items()}
            if self.half
            else trainable
        )
        fp16 = any(parameter.dtype == torch.float16 for parameter in trainable.values())
        self.loss_scale = INITIAL_LOSS_SCALE if fp16 else 1.0

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
        """One optimizer step on `loss` (over `params`); returns the loss as a float for the log."""
        if not self.half:
            return optimizer_step(optimizer, loss)
        for parameter in self.trainable.values():
            parameter.grad = None
        (loss.float() * self.loss_scale).backward()  # type: ignore[no-untyped-call]
        grads = {name: p.grad for name, p in self.trainable.items() if p.grad is not None}
        if not all(bool(torch.isfinite(grad).all()) for grad in grads.values()):
            self.loss_scale /= 2  # overflow: skip this step with a smaller scale next time
            for parameter in self.trainable.values():
                parameter.grad = None
            return float(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        for name, grad in grads.items():
            self.params[name].grad = grad.float() / self.loss_scale
            self.trainable[name].grad = None
        optimizer.step()
        self.sync()
        return float(loss.detach())

    def sync(self) -> None:
        """Copy the masters into the model's parameters (after a step, or after a checkpoint restored them)."""
        if self.half:
            with torch.no_grad():
                for name, parameter in self.trainable.items():
                    parameter.copy_(self.params[name])
