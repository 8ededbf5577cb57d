"""Prompt encoding shared by every method."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def count_tokens(tokenizer: CLIPTokenizer, prompt: str) -> int:
    """Tokens of `prompt` including the start and end tokens."""
    return len(tokenizer(prompt, truncation=False)["input_ids"])


def check_prompt(tokenizer: CLIPTokenizer, prompt: str, name: str = "prompt") -> None:
    """Raise ValueError if the prompt would be truncated by the text encoder."""
    n_tokens = count_tokens(tokenizer, prompt)
    if n_tokens > tokenizer.model_max_length:
        raise ValueError(f"{name} is {n_tokens} tokens, the model takes at most {tokenizer.model_max_length}")


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Text embeddings of each prompt, padded to the tokenizer's length.

    Returns: (B, L, D) with L = tokenizer.model_max_length and D = the encoder's hidden size.
    """
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    input_ids = tokens.input_ids.to(text_encoder.device)
    return text_encoder(input_ids)[0]


def encode_prompts_xl(
    text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
    tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
    prompts: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning (Podell et al., 2023, Sec. 2.1): each encoder's penultimate hidden states,
    concatenated, and the second encoder's pooled, projected output.

    Returns: (B, L, D1 + D2) in the second encoder's dtype (768 + 1280 on SDXL), and (B, P) (P = 1280).
    """
    states = []
    for text_encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        tokens = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        output = text_encoder(tokens.input_ids.to(text_encoder.device), output_hidden_states=True)
        states.append(output.hidden_states[-2])
    pooled = output.text_embeds
    return torch.cat(states, dim=-1).to(pooled.dtype), pooled
