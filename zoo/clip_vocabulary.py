"""Derive CLIP's tokenizer files (`vocab.json`, `merges.txt`) from CLIP's BPE table, for the single-file families.

Stable Diffusion 1.x, 2.x and SDXL all tokenize with CLIP's byte-level BPE (Radford et al. 2021): 49,408 tokens, the
same vocabulary and merges for OpenAI's CLIP ViT-L/14 and OpenCLIP's ViT-H/14 and bigG/14. A single-file checkpoint
carries no tokenizer, and the hub is not used, so the worker reads the files this script writes to
`worker/families/clip-tokenizer/` (committed, 1.4 MB).

The source is `bpe_simple_vocab_16e6.txt.gz`, the table OpenAI's CLIP and OpenCLIP ship (inside the
`open_clip_torch` wheel). The construction is CLIP's `SimpleTokenizer`: the 256 byte characters
(`bytes_to_unicode`), the same with `</w>`, one entry per merge (lines 1 to 48,894 of the table), then
`<|startoftext|>` and `<|endoftext|>`.

    pip download open_clip_torch==3.3.0 --no-deps -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python -m zoo.clip_vocabulary /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz worker/families/clip-tokenizer
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from zoo.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, bytes_to_unicode

VOCAB_SIZE = 49408
MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894: the table's lines after its version header


def write_clip_vocabulary(table: Path, out_dir: Path) -> int:
    """Write `vocab.json` and `merges.txt` derived from the gzipped BPE `table` into `out_dir`; returns the size."""
    lines = gzip.open(table).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    if len(merges) != MERGES or any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{table} is not CLIP's BPE table: expected {MERGES} merges after the header")
    characters = list(bytes_to_unicode().values())
    tokens = characters + [c + END_OF_WORD for c in characters] + ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived {len(vocab)} distinct tokens, CLIP has {VOCAB_SIZE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    return len(vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    write_clip_vocabulary(args.table, args.out_dir)


if __name__ == "__main__":
    main()
