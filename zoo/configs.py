"""Tiny configurations of the Stable Diffusion components for the ShapesWorld zoo.

Every component is the stock class SD 1.5 uses (``AutoencoderKL``, ``CLIPTextModel``,
``UNet2DConditionModel``, ``DDIMScheduler``); only the sizes shrink. 64x64 images map to 16x16x4
latents (two VAE downsamples instead of SD's three), and the UNet cross-attends to the caption at
16x16 and 8x8 and in its mid block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

IMAGE_SIZE = 64
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class VaeConfig:
    """``AutoencoderKL`` sizes: three blocks, so 64x64 images become 16x16 latents."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)  # 16 channels at 64x64 keep the VAE cheap
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_block_add_attention: bool = True


@dataclass(frozen=True)
class TextConfig:
    """``CLIPTextModel`` sizes; ``max_length`` is both the tokenizer's and the position table's length."""

    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 32


@dataclass(frozen=True)
class UnetConfig:
    """``UNet2DConditionModel`` sizes; one block per resolution 16, 8, 4 (cross-attention at 16 and 8 and in
    the 4x4 mid block)."""

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int = 1
    attention_head_dim: int | tuple[int, ...] = 4  # diffusers' name; it is the number of heads
    norm_num_groups: int = 16


@dataclass(frozen=True)
class ZooConfig:
    """All component sizes of one zoo model."""

    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UnetConfig = field(default_factory=UnetConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for run manifests."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZooConfig:
        """Inverse of :meth:`to_dict`."""

        def _tuples(section: dict[str, Any]) -> dict[str, Any]:
            return {key: tuple(value) if isinstance(value, list) else value for key, value in section.items()}

        return cls(
            vae=VaeConfig(**_tuples(data["vae"])),
            text=TextConfig(**_tuples(data["text"])),
            unet=UnetConfig(**_tuples(data["unet"])),
        )


PRESETS: dict[str, ZooConfig] = {
    "tiny": ZooConfig(),
    # A fast configuration for tests and smoke runs.
    "micro": ZooConfig(
        vae=VaeConfig(block_out_channels=(16, 32, 32), norm_num_groups=8),
        text=TextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        unet=UnetConfig(
            block_out_channels=(32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2,
            norm_num_groups=8,
        ),
    ),
}


# The SD 1.5 scheduler, verbatim (scaled_linear betas, epsilon prediction, DDIM sampling defaults).
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}


def build_vae(config: VaeConfig, scaling_factor: float = 1.0) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` mapping (B, 3, 64, 64) to (B, 4, 16, 16)."""
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=config.norm_num_groups,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        mid_block_add_attention=config.mid_block_add_attention,
    )


def build_text_encoder(
    config: TextConfig, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int
) -> CLIPTextModel:
    """A freshly initialised ``CLIPTextModel``; hidden states (B, max_length, hidden_size)."""
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        projection_dim=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_length,
        hidden_act="quick_gelu",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModel(text_config)


def build_unet(config: UnetConfig, cross_attention_dim: int, latent_size: int) -> UNet2DConditionModel:
    """A freshly initialised ``UNet2DConditionModel`` on (B, 4, latent_size, latent_size) latents."""
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )


def build_scheduler() -> DDIMScheduler:
    """The SD 1.5 ``DDIMScheduler``."""
    return DDIMScheduler(**SD15_SCHEDULER)


def latent_size(vae: VaeConfig) -> int:
    """Side of the latent grid: each VAE block but the last halves the image."""
    return IMAGE_SIZE // 2 ** (len(vae.block_out_channels) - 1)


def count_parameters(module: Any) -> int:
    """Number of parameters of a torch module."""
    return sum(parameter.numel() for parameter in module.parameters())
