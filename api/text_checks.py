"""Checks of a job's text against the base model's tokenizers, at submission (422) rather than as a failed job
later: prompts longer than a text encoder takes, and a training token that is already a word of the model.

The count is the worker's (`models.common.text.count_tokens`: CLIP tokens with the start and end tokens), made
here without transformers, which the API never imports: from the tokenizer folder's `tokenizer.json` when the
model has one, else rebuilt from its `vocab.json` and `merges.txt` the way transformers builds CLIP's fast
tokenizer. A test checks both against transformers' CLIPTokenizer. An SDXL model's two tokenizers are both
checked.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from api.errors import invalid

TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _clip_from_vocabulary(folder: Path, config: dict[str, Any]) -> Tokenizer:
    vocab = json.loads((folder / "vocab.json").read_text())
    lines = (folder / "merges.txt").read_text().splitlines()
    pairs = [line.split() for line in lines if line and not line.startswith("#version")]
    merges = [(pair[0], pair[1]) for pair in pairs if len(pair) == 2]
    unk = str(config.get("unk_token") or "<|endoftext|>")
    bos, eos = str(config.get("bos_token") or "<|startoftext|>"), str(config.get("eos_token") or "<|endoftext|>")
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=unk)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]), (bos, vocab[bos]), add_prefix_space=False, trim_offsets=False
    )
    return tokenizer


@lru_cache(maxsize=16)
def tokenizers_of(model_folder: Path) -> tuple[tuple[Tokenizer, int], ...]:
    """(tokenizer, most tokens it takes) for each tokenizer folder of the model; empty if it has none we read."""
    found = []
    for name in TOKENIZER_FOLDERS:
        folder = model_folder / name
        if not folder.is_dir():
            continue
        config_path = folder / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        limit = int(config.get("model_max_length") or 77)
        if (folder / "tokenizer.json").is_file():
            found.append((Tokenizer.from_file(str(folder / "tokenizer.json")), limit))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            found.append((_clip_from_vocabulary(folder, config), limit))
    return tuple(found)


def count_tokens(tokenizer: Tokenizer, prompt: str) -> int:
    """Tokens of `prompt` with the start and end tokens, as the worker counts them."""
    return len(tokenizer.encode(prompt).ids)


def _texts(params: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, text) of every prompt-like field of the method's params (`*prompt`, `*prompts`, `instruction`)."""
    texts = []
    for name, value in params.items():
        if not (name.endswith("prompt") or name.endswith("prompts") or name == "instruction"):
            continue
        if isinstance(value, str):
            texts.append((name, value))
        elif isinstance(value, list):
            texts += [(f"{name}[{index}]", item) for index, item in enumerate(value) if isinstance(item, str)]
    return texts


def check_prompt_lengths(model_folder: Path, params: dict[str, Any]) -> None:
    """422 naming the field if a prompt is longer than any of the model's text encoders takes."""
    tokenizers = tokenizers_of(model_folder)
    for name, text in _texts(params):
        for tokenizer, limit in tokenizers:
            count = count_tokens(tokenizer, text)
            if count > limit:
                raise invalid(name, f"{count} tokens; the model {model_folder.name} takes at most {limit}")


def check_new_token(model_folder: Path, field: str, token: str) -> None:
    """422 if `token` (a concept's new word) is already a word of the model, as the trainers refuse it."""
    tokenizers = tokenizers_of(model_folder)
    if not tokenizers:
        return
    tokenizer = tokenizers[0][0]
    if any(tokenizer.token_to_id(word) is not None for word in (token, f"{token.lower()}</w>")):
        raise invalid(field, f"{token!r} is already a word of the model; choose a new one, e.g. '<s1>'")
