"""What a control model must share with the base model it steers, read by the API (from the configs on disk) and
by the model code (from the loaded models) alike."""

from __future__ import annotations

SDXL_ADAPTER = "full_adapter_xl"
"""The T2I-Adapter type (`adapter_type` in its config) made for SDXL's UNet: it marks an adapter's family."""

CONTROLNET_FIT = (
    "cross_attention_dim",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "in_channels",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)
"""Config fields a ControlNet shares with the UNet it was copied from: its residuals fit the UNet's skip connections
only with the same encoder, and an SDXL one (added text-time embedding) reads the added conditioning an SDXL UNet
is given."""
