"""Everything that controls one sampling run beside the prompt, as the UNet's extra arguments at each step:
ControlNet residuals, T2I-Adapter features and GLIGEN grounding tokens. The samplers take one `ControlInputs`.

On SDXL a ControlNet gets the UNet's added conditioning too (the pooled prompt and the size numbers of the same
batch, as diffusers' `StableDiffusionXLControlNetPipeline` passes them): the sampler hands its `added` to
`ControlInputs.extras`, which runs the ControlNets with it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention import GatedSelfAttentionDense

from models.common.components import Components
from models.control.adapter import AdapterControl, adapter_features, check_adapter_fit
from models.control.controlnet import Control, check_condition, check_controls, check_fit
from models.control.gligen import Grounding, GroundingTokens, check_grounding, gated_layers, grounding_tokens

if TYPE_CHECKING:  # the sampler imports this module
    from models.common.sampling import UnetExtras


@dataclass
class ControlInputs:
    """controls: ControlNets; adapter_features: summed T2I-Adapter features, (1, C_l, h_l, w_l) per encoder level;
    grounding: GLIGEN tokens with `gated`, the UNet's gated layers (switched per step, restored by the caller)."""

    controls: Sequence[Control] = ()
    adapter_features: Sequence[torch.Tensor] = ()
    grounding: GroundingTokens | None = None
    gated: Sequence[GatedSelfAttentionDense] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.controls or self.adapter_features or self.grounding)

    def step(self, index: int, total: int) -> None:
        """Before step `index` of `total`: GLIGEN's scheduled sampling keeps the gated layers on for the first
        int(fraction * total) steps only."""
        if self.grounding is not None:
            enabled = index < int(self.grounding.fraction * total)
            for layer in self.gated:
                layer.enabled = enabled

    def extras(
        self,
        index: int,
        total: int,
        latents: torch.Tensor,
        timestep: torch.Tensor | int,
        embeds: torch.Tensor,
        guided: bool,
        *,
        added: UnetExtras | None = None,
    ) -> dict[str, Any]:
        """The UNet's extra keyword arguments at step `index` of `total` for `latents` (B, C, h, w) and `embeds`
        (B, L, D); `guided`: the batch is [unconditional, conditional] halves. Controls outside their step range
        or at scale 0 are not run, so a job whose controls are all inactive equals the uncontrolled one exactly.
        `added`: the UNet's added conditioning (SDXL), whose `added_cond_kwargs` for this same batch each ControlNet
        also gets; these extras do not repeat it (the sampler gives it to the UNet itself, `combined`)."""
        batch = latents.shape[0]
        extras: dict[str, Any] = {}
        if self.adapter_features:
            # The UNet pops from this list, so every call gets a new one.
            extras["down_intrablock_additional_residuals"] = [
                feature.expand(batch, -1, -1, -1) for feature in self.adapter_features
            ]
        if self.grounding is not None:
            extras["cross_attention_kwargs"] = self.grounding.kwargs(batch, guided)
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        conditioning: dict[str, Any] | None = None  # SDXL's added_cond_kwargs, computed once for all ControlNets
        for control in self.controls:
            if control.scale == 0 or not control.active(index, total):
                continue
            if added is not None and conditioning is None:
                conditioning = {"added_cond_kwargs": added(latents, timestep, embeds, guided)["added_cond_kwargs"]}
            out = control.model(
                latents,
                timestep,
                encoder_hidden_states=embeds,
                controlnet_cond=control.condition.expand(batch, -1, -1, -1),
                conditioning_scale=control.scale,
                return_dict=False,
                **(conditioning or {}),
            )
            down = list(out[0]) if down is None else [a + b for a, b in zip(down, out[0], strict=True)]
            mid = out[1] if mid is None else mid + out[1]
        if down is not None:
            extras |= {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return extras


@contextmanager
def control_inputs(
    components: Components, inputs: Mapping[str, object], width: int, height: int
) -> Iterator[ControlInputs]:
    """Check and prepare a job's `inputs["controls"]` (ControlNets), `inputs["t2i_adapters"]` (T2I-Adapters) and
    `inputs["grounding"]` (GLIGEN) for a `width` x `height` generation; GLIGEN's gated layers are restored on exit.
    Raises ValueError naming the field for bad input, before any model runs."""
    controls: list[Control] = list(inputs.get("controls", []))  # type: ignore[call-overload]
    adapters: list[AdapterControl] = list(inputs.get("t2i_adapters", []))  # type: ignore[call-overload]
    grounding = inputs.get("grounding")
    check_controls(controls, width, height)
    for index, control in enumerate(controls):
        check_fit(f"controls[{index}]", control.model, components.unet)
    for index, adapter in enumerate(adapters):
        check_condition(f"adapters[{index}]", adapter.scale, adapter.condition, width, height)
        check_adapter_fit(f"adapters[{index}]", adapter.model, components.unet)
    if grounding is not None:
        if not isinstance(grounding, Grounding):
            raise ValueError(f"grounding must be a Grounding, got {type(grounding).__name__}")
        if components.is_sdxl:  # its tokens are one text encoder's phrases; SDXL cross-attends to two
            raise ValueError("grounding (GLIGEN) is not supported on SDXL models")
        check_grounding(components.unet, grounding)
    with gated_layers(components.unet) as gated:
        tokens = None
        if grounding is not None:
            width_d = int(components.unet.config.cross_attention_dim)
            tokens = grounding_tokens(grounding, components.text_encoder, components.tokenizer, width_d)
        else:
            for layer in gated:  # a GLIGEN model asked for no grounding runs as its plain UNet
                layer.enabled = False
        yield ControlInputs(controls, adapter_features(adapters), tokens, gated)
