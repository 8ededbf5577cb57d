"""Build a CLIP-format BPE tokenizer whose every ShapesWorld word is a single token.

CLIP's tokenizer (Radford et al. 2021, as shipped with Stable Diffusion) is byte-level BPE: text is
lower-cased, split into words, each word mapped byte-by-byte to printable unicode characters, its last
character suffixed with ``</w>``, and adjacent symbols merged in rank order from ``merges.txt``. The
vocabulary lists the 256 byte characters, the same with ``</w>``, one entry per merge, then
``<|startoftext|>`` and ``<|endoftext|>``.

We keep that exact format so the stock ``transformers.CLIPTokenizer`` loads it, and we only choose the
merges: enough of them that every world word collapses into one token. CLIP's pre-tokenizer splits
punctuation from letters, so a hyphenated word such as "two-tone" becomes three tokens
(``two</w> -</w> tone</w>``), as it would in SD 1.5; each letter run of it is one token. Words outside the vocabulary
still tokenize through the byte characters, so ``tokenizer.add_tokens("<s1>")`` works as it does on SD.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, exactly as OpenAI's CLIP/GPT-2 code does."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def _symbols(word: str, byte_encoder: dict[int, str]) -> list[str]:
    """Split a word into its initial BPE symbols: byte characters, the last one with ``</w>``."""
    chars = [byte_encoder[byte] for byte in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + END_OF_WORD]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE loop: repeatedly merge the lowest-ranked adjacent pair (all its occurrences)."""
    word = list(symbols)
    while len(word) > 1:
        pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Choose merges so each word becomes exactly one token.

    Each new merge is appended with the lowest priority, so it only fires once no earlier merge applies;
    words already reduced to one token are therefore never changed by later additions.
    """
    byte_encoder = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        while len(tokens := _apply_merges(_symbols(word, byte_encoder), ranks)) > 1:
            pair = (tokens[0], tokens[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def word_pieces(word: str) -> list[str]:
    """The pre-tokenized pieces of a vocabulary word: letter runs and hyphens ("two-tone" -> 3 pieces).

    Raises ValueError for anything but lower-case letter runs joined by single hyphens.
    """
    runs = word.split("-")
    if any(not run.isalpha() or run != run.lower() for run in runs):
        raise ValueError(f"vocabulary words must be lower-case letter runs joined by hyphens, got {word!r}")
    pieces = [runs[0]]
    for run in runs[1:]:
        pieces += ["-", run]
    return pieces


def expected_tokens(word: str) -> list[str]:
    """Tokens a vocabulary word must give: one ``piece</w>`` per piece of :func:`word_pieces`."""
    return [piece + END_OF_WORD for piece in word_pieces(word)]


def build_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 32) -> CLIPTokenizer:
    """Write ``vocab.json``/``merges.txt`` (CLIP format) for ``words`` to ``out_dir`` and load them.

    Args:
        words: every word captions can contain; each (each letter run of a hyphenated one) becomes
            one ``word</w>`` token.
        out_dir: directory to write the tokenizer files into (created if missing).
        model_max_length: padded sequence length; keep it equal to the text encoder's
            ``max_position_embeddings``.

    Returns:
        The stock ``CLIPTokenizer`` loaded back from ``out_dir`` (also saved there with its config).
    """
    word_list = sorted(set(words))
    letter_runs = sorted({piece for word in word_list for piece in word_pieces(word) if piece != "-"})
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)

    # 1. Base symbols, as in CLIP: bytes, bytes with the end-of-word suffix.
    base = list(bytes_to_unicode().values())
    vocab_list = base + [symbol + END_OF_WORD for symbol in base]
    # 2. One entry per merge, then the two special tokens.
    merges = learn_merges(letter_runs)
    vocab_list += ["".join(pair) for pair in merges]
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    if len(vocab) != len(vocab_list):
        raise RuntimeError("duplicate tokens in the built vocabulary")

    # 3. Write CLIP's files, then let transformers add its config files.
    (out_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (out_path / "merges.txt").write_text(merges_text, encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=str(out_path / "vocab.json"),
        merges=str(out_path / "merges.txt"),
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(str(out_path))
    tokenizer = CLIPTokenizer.from_pretrained(str(out_path))

    # 4. Check the promise: every world word (every letter run of a hyphenated one) is one token.
    for word in word_list:
        pieces = tokenizer.tokenize(word)
        if pieces != expected_tokens(word):
            raise RuntimeError(f"word {word!r} tokenized to {pieces}, expected {expected_tokens(word)}")
    logger.info("built tokenizer: %d words, %d merges, %d tokens", len(word_list), len(merges), len(vocab))
    return tokenizer
