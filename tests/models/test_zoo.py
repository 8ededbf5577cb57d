"""The bundled zoo model loads with stock diffusers, generates, and keeps the promised format.

It is the model every method test and `make serve` run on, so these checks use only public
diffusers/transformers entry points, as a user with a real SD 1.5 directory would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from models.shapes.world import vocabulary
from zoo.configs import SD15_SCHEDULER
from zoo.tokenizer import END_OF_WORD, build_tokenizer, expected_tokens

ZOO_MODEL = Path(__file__).resolve().parents[2] / "zoo" / "shapes-sd-tiny"
MAX_BYTES = 40 * 1024 * 1024
UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


@pytest.fixture(scope="module")
def pipeline() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(ZOO_MODEL), safety_checker=None)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(ZOO_MODEL / "tokenizer"))


def test_pipeline_generates_64px_deterministically(pipeline: StableDiffusionPipeline) -> None:
    def generate() -> np.ndarray:
        output = pipeline(
            "a small red circle at the top left",
            num_inference_steps=3,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return output.images[0]

    first, second = generate(), generate()
    assert first.shape == (64, 64, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def test_model_index_has_no_safety_checker() -> None:
    index = json.loads((ZOO_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False


def test_components_follow_sd15_layout(pipeline: StableDiffusionPipeline) -> None:
    scheduler = pipeline.scheduler.config
    for key, value in SD15_SCHEDULER.items():
        assert scheduler[key] == value, key
    assert type(pipeline.scheduler).__name__ == "DDIMScheduler"
    assert pipeline.vae_scale_factor == 4
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == 64
    assert pipeline.vae.config.latent_channels == 4
    assert pipeline.vae.config.scaling_factor != pytest.approx(0.18215)
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    assert pipeline.tokenizer.model_max_length == pipeline.text_encoder.config.max_position_embeddings
    cross_attention_blocks = [name for name in pipeline.unet.config.down_block_types if "CrossAttn" in name]
    assert len(cross_attention_blocks) >= 2
    assert all(parameter.dtype == torch.float32 for parameter in pipeline.unet.parameters())


def test_every_world_word_is_one_token(tokenizer: CLIPTokenizer) -> None:
    for word in vocabulary():
        assert tokenizer.tokenize(word) == expected_tokens(word), word
    assert tokenizer.tokenize("two-tone") == ["two</w>", "-</w>", "tone</w>"]


def test_new_concept_tokens_use_the_stock_path(tokenizer: CLIPTokenizer) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(ZOO_MODEL / "tokenizer"))
    assert tokenizer.add_tokens("<s1>") == 1
    assert tokenizer.tokenize("a <s1> circle") == ["a</w>", "<s1>", "circle</w>"]
    new_id = tokenizer.convert_tokens_to_ids("<s1>")
    assert new_id == len(tokenizer) - 1
    # Words outside the world still tokenize, through byte-level pieces, never to the unknown token.
    ids = tokenizer("a zebra", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 and tokenizer.unk_token_id not in ids


def test_weights_are_small_safetensors_only() -> None:
    files = [path for path in ZOO_MODEL.rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in UNSAFE_SUFFIXES]
    weights = [path for path in files if path.suffix == ".safetensors"]
    assert {path.parent.name for path in weights} == {"unet", "vae", "text_encoder"}
    assert sum(path.stat().st_size for path in files) <= MAX_BYTES


def test_build_tokenizer_writes_clip_format(tmp_path: Path) -> None:
    words = ["abc", "bc", "b", "cab", "two-tone", "tone"]
    tokenizer = build_tokenizer(words, tmp_path, model_max_length=16)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2"
    assert vocab["!"] == 0 and vocab["!" + END_OF_WORD] == 256
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2
    for word in words:
        assert tokenizer.tokenize(word) == expected_tokens(word)
    ids = tokenizer("abc bc", padding="max_length", max_length=16)["input_ids"]
    assert ids[:4] == [tokenizer.bos_token_id, vocab["abc</w>"], vocab["bc</w>"], tokenizer.eos_token_id]


def test_build_tokenizer_rejects_bad_words(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Red"):
        build_tokenizer(["Red"], tmp_path)
