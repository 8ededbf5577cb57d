"""LoRA and Textual Inversion on the zoo model: determinism, exact resume, the base model left exactly as it was,
combinations, and interoperability through stock diffusers (load_lora_weights, load_textual_inversion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from models.common.components import Components
from models.common.text import encode_prompts
from models.generation import text_to_image
from models.personalization import lora
from models.personalization import textual_inversion as ti
from models.personalization.apply import applied
from models.personalization.common import Adapter, MemoryCheckpoints
from models.shapes.world import Scene, ShapeObject, render
from tests.conftest import ZOO_MODEL

COLORS = ("red", "blue", "green", "orange", "purple")
PROBE = "a <s1> diamond at the center"


def star_images() -> list[Image.Image]:
    return [Image.fromarray(render(Scene((ShapeObject("star", color, "large", "center"),))).image) for color in COLORS]


def snapshot(components: Components) -> dict[str, object]:
    """Everything a job could leave changed: weights, module types, processors, tokenizer, embedding table."""
    return {
        "unet": {k: v.clone() for k, v in components.unet.state_dict().items()},
        "text": {k: v.clone() for k, v in components.text_encoder.state_dict().items()},
        "modules": [type(m) for m in components.unet.modules()] + [type(m) for m in components.text_encoder.modules()],
        "processors": {k: type(v) for k, v in components.unet.attn_processors.items()},
        "tokenizer": components.tokenizer,
        "vocab": len(components.tokenizer),
        "embedding": components.text_encoder.get_input_embeddings(),
        "attributes": (set(vars(components.unet)), set(vars(components.text_encoder))),
    }


def assert_unchanged(components: Components, before: dict[str, object]) -> None:
    after = snapshot(components)
    for part in ("unet", "text"):
        old, new = before[part], after[part]
        assert isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys()
        assert all(torch.equal(old[k], new[k]) for k in old), part
    for key in ("modules", "processors", "vocab", "attributes"):
        assert before[key] == after[key], key
    assert before["tokenizer"] is after["tokenizer"] and before["embedding"] is after["embedding"]


def generate(components: Components, prompt: str = PROBE) -> np.ndarray:
    params = text_to_image.Params(prompt=prompt, steps=4)
    images = text_to_image.run(components, params, generator=torch.Generator().manual_seed(3)).images
    return np.asarray(images[0])


LORA = lora.Params(token="<s1>", class_word="diamond", steps=6, learning_rate=2e-2, checkpoint_every=3)
TI = ti.Params(token="<s1>", class_word="diamond", steps=6, learning_rate=5e-2, checkpoint_every=3, num_vectors=2)


@pytest.mark.parametrize("method,params", [(lora, LORA), (ti, TI)], ids=["lora", "textual-inversion"])
def test_training_is_deterministic_resumable_and_leaves_the_model_unchanged(
    components: Components, method: object, params: object
) -> None:
    before = snapshot(components)
    images = star_images()
    first = method.run(components, params, {"images": images}, generator=torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    assert_unchanged(components, before)
    assert first.adapter is not None and first.adapter.tokens == ["<s1>"]
    assert first.metrics["steps"] == 6 and np.isfinite(first.metrics["final_loss"])

    # Interrupted after step 4 (checkpoint at 3), then resumed: the same tensors as the uninterrupted run.
    class Stop(Exception):
        pass

    def stop_at_four(step: int, total: int) -> None:
        if step == 4:
            raise Stop

    checkpoints = MemoryCheckpoints()
    with pytest.raises(Stop):
        method.run(  # type: ignore[attr-defined]
            components,
            params,
            {"images": images},
            generator=torch.Generator().manual_seed(0),
            callback=stop_at_four,
            checkpoints=checkpoints,
        )
    assert checkpoints.last is not None and checkpoints.last[0] == 3
    assert_unchanged(components, before)
    resumed = method.run(  # type: ignore[attr-defined]
        components, params, {"images": images}, generator=torch.Generator().manual_seed(0), checkpoints=checkpoints
    )
    assert resumed.metrics["resumed_from"] == 3 and resumed.adapter is not None
    assert first.adapter.tensors.keys() == resumed.adapter.tensors.keys()
    assert all(torch.equal(first.adapter.tensors[k], resumed.adapter.tensors[k]) for k in first.adapter.tensors)


def test_textual_inversion_trains_only_the_new_vectors(components: Components) -> None:
    """Gal et al.: the generator is frozen; the embedding of S* is the only thing that moves."""
    out = ti.run(components, TI, {"images": star_images()}, generator=torch.Generator().manual_seed(0))
    assert out.adapter is not None
    ((token, vectors),) = out.adapter.tensors.items()
    assert token == "<s1>" and vectors.shape == (2, components.text_encoder.config.hidden_size)
    init = components.text_encoder.get_input_embeddings().weight[components.tokenizer.encode("diamond")[1]]
    assert not torch.allclose(vectors, init.expand_as(vectors))  # it moved from the init word


def test_lora_at_scale_zero_is_the_base_model_and_apply_restores_exactly(components: Components) -> None:
    """B starts at zero (Hu et al.), and at scale 0 the installed adapter changes nothing; after the block the
    model is exactly as before, even when the block raises."""
    out = lora.run(components, LORA, {"images": star_images()}, generator=torch.Generator().manual_seed(0))
    assert out.adapter is not None
    adapter = Adapter.from_bytes(out.adapter.to_bytes())
    base = generate(components)
    before = snapshot(components)
    with lora.apply(components, adapter, 0.0):
        assert np.array_equal(generate(components), base)
    with lora.apply(components, adapter, 1.0):
        changed = generate(components)
    assert not np.array_equal(changed, base)
    with pytest.raises(RuntimeError), lora.apply(components, adapter, 1.0):
        raise RuntimeError("the job failed")
    assert_unchanged(components, before)
    assert np.array_equal(generate(components), base)


def test_lora_and_textual_inversion_combine(components: Components) -> None:
    images = star_images()
    lora_out = lora.run(components, LORA, {"images": images}, generator=torch.Generator().manual_seed(0))
    ti_params = ti.Params(token="<s2>", class_word="diamond", steps=3, learning_rate=5e-2)
    ti_out = ti.run(components, ti_params, {"images": images}, generator=torch.Generator().manual_seed(0))
    assert lora_out.adapter is not None and ti_out.adapter is not None
    before = snapshot(components)
    prompt = "a <s1> <s2> at the center"
    base = generate(components, prompt)
    with applied(components, [(lora_out.adapter, 1.0)]):
        lora_only = generate(components, prompt)
    with applied(components, [(lora_out.adapter, 1.0), (ti_out.adapter, 1.0)]):
        assert components.tokenizer.convert_tokens_to_ids("<s2>") == before["vocab"]
        both = generate(components, prompt)
    assert not np.array_equal(both, lora_only) and not np.array_equal(both, base)
    assert_unchanged(components, before)


def test_bad_inputs_are_refused_at_the_top(components: Components) -> None:
    images = star_images()
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="already a word"):
        ti.run(
            components,
            ti.Params(token="circle", class_word="diamond", steps=1),
            {"images": images},
            generator=generator,
        )
    with pytest.raises(ValueError, match="images must hold"):
        ti.run(components, TI, {"images": []}, generator=generator)
    with pytest.raises(ValueError, match="rank"):
        lora.run(components, lora.Params(token="<s1>", class_word="x", rank=0), {"images": images}, generator=generator)
    with pytest.raises(ValueError, match="one tensor"):
        with ti.apply(components, Adapter("textual-inversion", {"a": torch.zeros(1, 128), "b": torch.zeros(1, 128)})):
            pass
    with pytest.raises(ValueError, match="must be"):
        with ti.apply(components, Adapter("textual-inversion", {"<s9>": torch.zeros(1, 7)})):
            pass


@pytest.fixture(scope="module")
def pipeline() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(ZOO_MODEL, safety_checker=None, requires_safety_checker=False)


def test_our_lora_file_loads_with_diffusers_load_lora_weights(
    components: Components, tmp_path: Path, pipeline: StableDiffusionPipeline
) -> None:
    params = lora.Params(
        token="<s1>", class_word="diamond", steps=3, learning_rate=5e-2, alpha=8.0, train_text_encoder=True
    )
    out = lora.run(components, params, {"images": star_images()}, generator=torch.Generator().manual_seed(0))
    assert out.adapter is not None
    path = tmp_path / "lora.safetensors"
    path.write_bytes(out.adapter.to_bytes())
    pipeline.load_lora_weights(str(path), adapter_name="ours")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([500])
    try:
        with torch.no_grad():
            theirs_text = encode_prompts(pipeline.text_encoder, pipeline.tokenizer, [PROBE])
            theirs = pipeline.unet(latents, timestep, encoder_hidden_states=theirs_text).sample
            base_text = encode_prompts(components.text_encoder, components.tokenizer, [PROBE])
            base = components.unet(latents, timestep, encoder_hidden_states=base_text).sample
            with lora.apply(components, out.adapter, 1.0):
                ours_text = encode_prompts(components.text_encoder, components.tokenizer, [PROBE])
                ours = components.unet(latents, timestep, encoder_hidden_states=ours_text).sample
    finally:
        pipeline.unload_lora_weights()
    assert not torch.allclose(ours_text, base_text, atol=1e-4)  # the text-encoder LoRA is in the file and applied
    assert not torch.allclose(ours, base, atol=1e-4)
    torch.testing.assert_close(theirs_text, ours_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_our_textual_inversion_file_loads_with_diffusers_load_textual_inversion(
    components: Components, tmp_path: Path, pipeline: StableDiffusionPipeline
) -> None:
    params = ti.Params(token="<s3>", class_word="diamond", steps=3, learning_rate=5e-2, num_vectors=2)
    out = ti.run(components, params, {"images": star_images()}, generator=torch.Generator().manual_seed(0))
    assert out.adapter is not None
    path = tmp_path / "ti.safetensors"
    path.write_bytes(out.adapter.to_bytes())
    pipeline.load_textual_inversion(str(path))
    try:
        prompt = "a <s3> at the center"
        converted = pipeline.maybe_convert_prompt(prompt, pipeline.tokenizer)
        assert converted == "a <s3> <s3>_1 at the center"
        with torch.no_grad():
            theirs = encode_prompts(pipeline.text_encoder, pipeline.tokenizer, [converted])
            with ti.apply(components, out.adapter):
                ours = encode_prompts(components.text_encoder, components.tokenizer, [prompt])
    finally:
        pipeline.unload_textual_inversion("<s3>")
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-6)
