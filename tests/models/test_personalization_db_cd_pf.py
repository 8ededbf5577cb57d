"""DreamBooth, Custom Diffusion and Perfusion on the zoo model: determinism, the shared model left exactly as it was
(after training and after apply), each paper's invariant, resume from a checkpoint, interop with stock diffusers,
and bad input (run-level ValueErrors and the API's 422s)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from fastapi.testclient import TestClient
from PIL import Image

from models.common.attention import cross_attention_layers
from models.common.components import Components
from models.common.text import encode_prompts
from models.personalization import custom_diffusion, custom_diffusion_merge, dreambooth, perfusion
from models.personalization.common import Adapter, MemoryCheckpoints
from models.personalization.concepts import generate_class_images
from models.personalization.training import added_tokens
from models.shapes.world import Scene, ShapeObject, render


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def star_images() -> list[Image.Image]:
    positions = ("center", "top left", "bottom right")
    scenes = [Scene((ShapeObject("star", "yellow", "large", p),)) for p in positions]
    return [Image.fromarray(render(scene).image) for scene in scenes]


def heart_images() -> list[Image.Image]:
    positions = ("center", "top", "left")
    scenes = [Scene((ShapeObject("heart", "red", "large", p),)) for p in positions]
    return [Image.fromarray(render(scene).image) for scene in scenes]


CLASS_IMAGES = [Image.fromarray(render(Scene((ShapeObject("circle", "blue", "small", "center"),))).image)] * 2
LATENTS = torch.randn((1, 4, 16, 16), generator=gen(7))


def snapshot(components: Components) -> dict[str, Any]:
    """Everything a job could leave changed on the shared model."""
    return {
        "unet": {k: v.clone() for k, v in components.unet.state_dict().items()},
        "text": {k: v.clone() for k, v in components.text_encoder.state_dict().items()},
        "processors": dict(components.unet.attn_processors),
        "tokenizer": components.tokenizer,
        "vocab": len(components.tokenizer),
        "embedding": components.text_encoder.get_input_embeddings(),
    }


def assert_unchanged(components: Components, before: dict[str, Any]) -> None:
    after = snapshot(components)
    assert after["tokenizer"] is before["tokenizer"] and after["vocab"] == before["vocab"]
    assert after["embedding"] is before["embedding"]
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    assert all(torch.equal(after["unet"][k], v) for k, v in before["unet"].items())
    assert all(torch.equal(after["text"][k], v) for k, v in before["text"].items())
    assert not any(p.requires_grad for p in components.unet.parameters())


@torch.no_grad()
def eps(components: Components, prompt: str) -> torch.Tensor:
    """The UNet's noise prediction for fixed latents at t = 500 under `prompt`: (1, 4, 16, 16)."""
    cond = encode_prompts(components.text_encoder, components.tokenizer, [prompt])
    return components.unet(LATENTS, 500, encoder_hidden_states=cond).sample


def tensors_equal(a: Adapter, b: Adapter) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# ------------------------------------------------------------------------------------------------
# Trained adapters, shared by the tests (a few steps each: seconds on the CPU)


def train_dreambooth(components: Components, seed: int = 0, **kwargs: Any) -> Any:
    values = {"token": "<db1>", "class_word": "circle", "steps": 4, "num_class_images": 2, **kwargs}
    inputs: dict[str, object] = {"images": star_images(), "class_images": CLASS_IMAGES}
    return dreambooth.run(components, dreambooth.Params(**values), inputs, generator=gen(seed))


def train_cd(components: Components, token: str, images: list[Image.Image], seed: int = 0, **kwargs: Any) -> Any:
    extra = kwargs.pop("inputs", {})
    values = {"token": token, "class_word": "circle", "steps": 3, "num_class_images": 2, **kwargs}
    inputs: dict[str, object] = {"images": images, "class_images": CLASS_IMAGES, **extra}
    return custom_diffusion.run(components, custom_diffusion.Params(**values), inputs, generator=gen(seed))


def train_perfusion(components: Components, token: str, images: list[Image.Image], seed: int = 0) -> Any:
    params = perfusion.Params(token=token, class_word="circle", steps=20, learning_rate=1e-2)
    return perfusion.run(components, params, {"images": images}, generator=gen(seed))


@pytest.fixture(scope="module")
def db_adapter(components: Components) -> Adapter:
    before = snapshot(components)
    output = train_dreambooth(components)
    assert_unchanged(components, before)
    assert output.adapter is not None
    return output.adapter  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cd_adapters(components: Components) -> tuple[Adapter, Adapter]:
    before = snapshot(components)
    first = train_cd(components, "<cd1>", star_images(), seed=1).adapter
    second = train_cd(components, "<cd2>", heart_images(), seed=2).adapter
    assert_unchanged(components, before)
    return first, second


@pytest.fixture(scope="module")
def pf_adapters(components: Components) -> tuple[Adapter, Adapter]:
    before = snapshot(components)
    first = train_perfusion(components, "<pf1>", star_images(), seed=1).adapter
    second = train_perfusion(components, "<pf2>", heart_images(), seed=2).adapter
    assert_unchanged(components, before)
    return first, second


# ------------------------------------------------------------------------------------------------
# DreamBooth


def test_dreambooth_is_deterministic(components: Components, db_adapter: Adapter) -> None:
    again = train_dreambooth(components).adapter
    assert tensors_equal(db_adapter, again)
    other = train_dreambooth(components, seed=1).adapter
    assert not tensors_equal(db_adapter, other)


def test_dreambooth_delta_scale_zero_is_base_and_apply_restores(components: Components, db_adapter: Adapter) -> None:
    assert {k.split(".")[0] for k in db_adapter.tensors} == {"unet", "token_embeddings"}
    before = snapshot(components)
    base = eps(components, "a red circle at the center")
    with dreambooth.apply(components, db_adapter, 0.0):
        assert torch.equal(eps(components, "a red circle at the center"), base)  # base + 0 * delta is the base
    with dreambooth.apply(components, db_adapter, 1.0):
        tuned = eps(components, "a red <db1> circle at the center")
        assert not torch.equal(eps(components, "a red circle at the center"), base)
    assert_unchanged(components, before)
    assert torch.equal(eps(components, "a red circle at the center"), base)
    assert tuned.shape == base.shape


def test_dreambooth_generates_class_images_when_none_are_given(components: Components) -> None:
    calls: list[tuple[int, int]] = []
    params = dreambooth.Params(token="<db2>", class_word="circle", steps=1, num_class_images=2, class_steps=2)
    output = dreambooth.run(
        components, params, {"images": star_images()}, generator=gen(0), callback=lambda s, t: calls.append((s, t))
    )
    assert calls == [(1, 1)] and output.adapter is not None


def at_sample_size(components: Components, sample_size: int) -> Components:
    """The zoo model with its UNet's native sample size changed (the weights are the same: the UNet is
    convolutional), so its native resolution is sample_size x 4 pixels."""
    unet = UNet2DConditionModel.from_config(dict(components.unet.config) | {"sample_size": sample_size})
    unet.load_state_dict(components.unet.state_dict())
    return dataclasses.replace(components, unet=unet.eval())


@pytest.mark.parametrize("sample_size", [8, 24])
def test_class_images_are_generated_at_the_models_native_size(components: Components, sample_size: int) -> None:
    """DreamBooth's prior images and Custom Diffusion's regularisation images come from the base model at its own
    resolution (the training images' size), not at a fixed 64 x 64 upscaled afterwards."""
    model = at_sample_size(components, sample_size)
    size = sample_size * components.vae_scale
    requests = [
        dreambooth.class_image_requests(dreambooth.Params(token="<n>", class_word="circle", num_class_images=1)),
        custom_diffusion.class_image_requests(custom_diffusion.Params(token="<n>", class_word="circle")),
    ]
    for request in (r["class_images"] for r in requests):
        request = dataclasses.replace(request, count=1, steps=2)
        assert [image.size for image in generate_class_images(model, request)] == [(size, size)]


def test_dreambooth_resumes_from_checkpoint_as_if_never_stopped(components: Components) -> None:
    uninterrupted = train_dreambooth(components, steps=4, checkpoint_every=2).adapter
    checkpoints = MemoryCheckpoints()

    def die_at_3(step: int, total: int) -> None:
        if step == 3:
            raise RuntimeError("worker killed")

    values = {"token": "<db1>", "class_word": "circle", "steps": 4, "num_class_images": 2, "checkpoint_every": 2}
    inputs: dict[str, object] = {"images": star_images(), "class_images": CLASS_IMAGES}
    with pytest.raises(RuntimeError, match="worker killed"):
        dreambooth.run(
            components,
            dreambooth.Params(**values),
            inputs,
            generator=gen(0),
            callback=die_at_3,
            checkpoints=checkpoints,
        )
    assert checkpoints.last is not None and checkpoints.last[0] == 2
    steps: list[int] = []
    resumed = dreambooth.run(
        components,
        dreambooth.Params(**values),
        inputs,
        generator=gen(0),
        callback=lambda s, t: steps.append(s),
        checkpoints=checkpoints,
    )
    assert steps == [3, 4] and resumed.metrics["resumed_from"] == 2
    assert resumed.adapter is not None and tensors_equal(resumed.adapter, uninterrupted)


def test_dreambooth_text_encoder_option_trains_a_text_delta(components: Components) -> None:
    before = snapshot(components)
    adapter = train_dreambooth(components, steps=2, train_text_encoder=True).adapter
    assert any(k.startswith("text_encoder.") for k in adapter.tensors)
    assert not any("token_embedding" in k for k in adapter.tensors if k.startswith("text_encoder."))
    with dreambooth.apply(components, adapter, 1.0):
        eps(components, "a <db1> circle")
    assert_unchanged(components, before)


# ------------------------------------------------------------------------------------------------
# Custom Diffusion


def test_custom_diffusion_is_deterministic_and_trains_only_kv(
    components: Components, cd_adapters: tuple[Adapter, Adapter]
) -> None:
    first, _ = cd_adapters
    again = train_cd(components, "<cd1>", star_images(), seed=1).adapter
    assert tensors_equal(first, again)
    layers = cross_attention_layers(components.unet)
    trained = {k for k, v in first.tensors.items() if v.numel() and k != "token_embeddings"}
    assert trained == {n + s for n in layers for s in (custom_diffusion.KEY_SUFFIX, custom_diffusion.VALUE_SUFFIX)}


def test_custom_diffusion_merge_satisfies_the_constraint(
    components: Components, cd_adapters: tuple[Adapter, Adapter]
) -> None:
    """Eq. 4: the merged W maps each concept's caption features c to that concept's own W_n c."""
    first, second = cd_adapters
    output = custom_diffusion_merge.run(
        components,
        custom_diffusion_merge.Params(regularization_captions=64),
        {"adapters": [(first, 1.0), (second, 1.0)]},
        generator=gen(0),
    )
    merged = output.adapter
    assert merged is not None and merged.tokens == ["<cd1>", "<cd2>"]
    vectors = merged.tensors["token_embeddings"]
    with added_tokens(components, merged.tokens, vectors):
        for adapter, token in ((first, "<cd1>"), (second, "<cd2>")):
            features = custom_diffusion.concept_features(components, token, "circle")
            for key in adapter.tensors:
                if key.endswith((custom_diffusion.KEY_SUFFIX, custom_diffusion.VALUE_SUFFIX)):
                    wanted = adapter.tensors[key] @ features.T
                    got = merged.tensors[key] @ features.T
                    assert torch.allclose(got, wanted, atol=1e-4 * float(wanted.abs().max())), key
    # ... and it is not simply one of the two: on the other concept's features the single adapters differ.
    key = next(k for k in first.tensors if k.endswith(custom_diffusion.KEY_SUFFIX))
    assert not torch.allclose(merged.tensors[key], first.tensors[key])


def test_custom_diffusion_loads_in_stock_diffusers(
    components: Components, cd_adapters: tuple[Adapter, Adapter], tmp_path: Path
) -> None:
    """Our files through diffusers' own loaders (`load_attn_procs`, `load_textual_inversion`) give the same noise
    prediction as our apply."""
    adapter = cd_adapters[0]
    with custom_diffusion.apply(components, adapter, 1.0):
        ours = eps(components, "a <cd1> circle at the center")
    for name, data in custom_diffusion.diffusers_files(adapter).items():
        (tmp_path / name).write_bytes(data)
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=copy.deepcopy(components.text_encoder),
        tokenizer=copy.deepcopy(components.tokenizer), unet=copy.deepcopy(components.unet),
        scheduler=components.ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    # diffusers 0.42.1 installs the processors only when given the pipeline (see the report).
    pipe.unet.load_attn_procs(tmp_path, weight_name=custom_diffusion.ATTN_PROCS_FILE, _pipeline=pipe)
    pipe.load_textual_inversion(tmp_path, weight_name="<cd1>.safetensors")
    assert {type(p).__name__ for n, p in pipe.unet.attn_processors.items() if "attn2" in n} == {
        "CustomDiffusionAttnProcessor"
    }
    stock = Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, components.scheduler_config)
    theirs = eps(stock, "a <cd1> circle at the center")
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, eps(components, "a circle at the center"), atol=1e-3)


def test_custom_diffusion_two_adapters_add_up_and_restore(
    components: Components, cd_adapters: tuple[Adapter, Adapter]
) -> None:
    first, second = cd_adapters
    before = snapshot(components)
    name = next(iter(cross_attention_layers(components.unet)))
    attn = cross_attention_layers(components.unet)[name]
    with custom_diffusion.apply(components, first, 1.0), custom_diffusion.apply(components, second, 0.5):
        processor = components.unet.attn_processors[name]
        key = name + custom_diffusion.KEY_SUFFIX
        wanted = (
            attn.to_k.weight + (first.tensors[key] - attn.to_k.weight) + 0.5 * (second.tensors[key] - attn.to_k.weight)
        )
        assert torch.allclose(processor.to_k_custom_diffusion.weight, wanted, atol=1e-6)
        eps(components, "a <cd1> circle and a <cd2> circle")
    assert_unchanged(components, before)


def test_custom_diffusion_joint_training_of_two_concepts(components: Components) -> None:
    before = snapshot(components)
    output = train_cd(
        components, "<cj1>", star_images(), steps=2, second_token="<cj2>", second_class_word="circle",
        inputs={"second_images": heart_images(), "second_class_images": CLASS_IMAGES},
    )  # fmt: skip
    assert output.adapter.tokens == ["<cj1>", "<cj2>"] and output.adapter.tensors["token_embeddings"].shape[0] == 2
    assert custom_diffusion.ATTN_PROCS_FILE in output.files
    assert_unchanged(components, before)


# ------------------------------------------------------------------------------------------------
# Perfusion


def test_perfusion_is_deterministic_and_small(components: Components, pf_adapters: tuple[Adapter, Adapter]) -> None:
    first, _ = pf_adapters
    assert tensors_equal(first, train_perfusion(components, "<pf1>", star_images(), seed=1).adapter)
    assert sum(t.numel() for t in first.tensors.values()) * 4 < 10_000  # bytes: a few hundred numbers per layer


def test_perfusion_gate_leaves_prompts_without_the_concept_nearly_unchanged(
    components: Components, pf_adapters: tuple[Adapter, Adapter]
) -> None:
    first, _ = pf_adapters
    before = snapshot(components)
    plain, concept = "a small green square at the left", "a small green <pf1> at the left"
    base = eps(components, plain)
    with perfusion.apply(components, first, 1.0):
        changed_plain = float((eps(components, plain) - base).abs().max())
        changed_concept = float(
            (eps(components, concept) - eps(components, "a small green circle at the left")).abs().max()
        )
    with perfusion.apply(components, first, 0.0):
        assert torch.allclose(eps(components, plain), base, atol=1e-6)
    assert_unchanged(components, before)
    # Measured: ~4e-4 without the concept (the gate is ~1e-3 on other tokens) against ~0.3 with it.
    assert changed_plain < 0.02, changed_plain
    assert changed_concept > 10 * changed_plain, (changed_concept, changed_plain)


def test_perfusion_strength_and_two_concepts(components: Components, pf_adapters: tuple[Adapter, Adapter]) -> None:
    first, second = pf_adapters
    before = snapshot(components)
    prompt = "a <pf1> at the left and a <pf2> at the right"
    with perfusion.apply(components, first, 1.0), perfusion.apply(components, second, 1.0):
        name = next(iter(cross_attention_layers(components.unet)))
        assert len(components.unet.attn_processors[name].edits) == 2
        both = eps(components, prompt)
    # The strength scales the edit: its effect on the prediction (against strength 0, S* without the edit) is
    # smaller at 0.5 than at 1. (Distance to the class word's prompt is not monotone in strength: the key moves from
    # S*'s own key to the class word's while the value moves to the learned target.)
    concept = "a <pf1> at the left"
    with perfusion.apply(components, first, 0.0):
        unedited = eps(components, concept)
    effect = {}
    for strength in (0.5, 1.0):
        with perfusion.apply(components, first, strength):
            effect[strength] = float((eps(components, concept) - unedited).abs().mean())
    assert both.isfinite().all() and 0 < effect[0.5] < effect[1.0], effect
    assert_unchanged(components, before)


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: train_dreambooth(c, token="circle"), "token 'circle' is already in the vocabulary"),
        (lambda c: train_dreambooth(c, steps=0), "steps must be at least 1"),
        (lambda c: train_dreambooth(c, class_word=" "), "class_word must name the concept's class"),
        (
            lambda c: train_cd(c, "<x1>", star_images(), second_token="<x1>", second_class_word="circle"),
            "second_token must differ",
        ),
        (
            lambda c: train_cd(c, "<x1>", star_images(), inputs={"second_images": star_images()}),
            "second_images needs second_token",
        ),
        (
            lambda c: perfusion.run(
                c,
                perfusion.Params(token="<x1>", class_word="circle", gate_temperature=0.0),
                {"images": star_images()},
                generator=gen(0),
            ),
            "gate_temperature must be positive",
        ),
        (
            lambda c: perfusion.run(
                c, perfusion.Params(token="<x1>", class_word="circle"), {"images": []}, generator=gen(0)
            ),
            "images must be a non-empty list",
        ),
    ],
)
def test_bad_method_input_raises_value_error(components: Components, call: Any, message: str) -> None:
    before = snapshot(components)
    with pytest.raises(ValueError, match=message):
        call(components)
    assert_unchanged(components, before)


def test_merge_refuses_the_same_token_and_other_types(
    components: Components, cd_adapters: tuple[Adapter, Adapter]
) -> None:
    first, _ = cd_adapters
    with pytest.raises(ValueError, match="distinct modifier tokens"):
        custom_diffusion.merge(components, first, first, ["a circle"])
    with pytest.raises(ValueError, match="must be a custom-diffusion adapter"):
        custom_diffusion.merge(components, first, Adapter("perfusion", {}, {}), ["a circle"])
    with pytest.raises(ValueError, match="adapters must be two"):
        custom_diffusion_merge.run(
            components, custom_diffusion_merge.Params(), {"adapters": [(first, 1.0)]}, generator=gen(0)
        )


def test_apply_refuses_an_adapter_for_another_model(
    components: Components, cd_adapters: tuple[Adapter, Adapter]
) -> None:
    first, _ = cd_adapters
    wrong = Adapter("custom-diffusion", {k: v[:, :-1] if v.ndim == 2 else v for k, v in first.tensors.items()},
                    first.metadata)  # fmt: skip
    before = snapshot(components)
    with pytest.raises(ValueError, match="do not fit"), custom_diffusion.apply(components, wrong, 1.0):
        pass
    assert_unchanged(components, before)


FILE_IDS = ["file_0123456789abcdef01234567", "file_0123456789abcdef01234568", "file_0123456789abcdef01234569"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/trainings/dreambooth", {"images": FILE_IDS[:2], "token": "<s1>", "class_word": "circle"}, "images"),
        ("/v1/trainings/dreambooth", {"images": FILE_IDS, "token": "two words", "class_word": "circle"}, "token"),
        ("/v1/trainings/dreambooth", {"images": FILE_IDS, "token": "<s1>", "num_class_images": 0}, "num_class_images"),
        ("/v1/trainings/perfusion", {"images": FILE_IDS, "token": "<s1>", "class_word": ""}, "class_word"),
        (
            "/v1/trainings/dreambooth",
            {"images": FILE_IDS, "token": "<s1>", "prior_loss_weight": -1},
            "prior_loss_weight",
        ),
        ("/v1/trainings/custom-diffusion", {"images": FILE_IDS, "token": "<s1>", "second_token": "<s2>"}, ""),
        (
            "/v1/trainings/custom-diffusion",
            {"images": FILE_IDS, "token": "<s1>", "second_images": FILE_IDS[:1]},
            "second_images",
        ),
        ("/v1/trainings/perfusion", {"images": FILE_IDS, "token": "<s1>", "gate_temperature": 0}, "gate_temperature"),
        ("/v1/trainings/perfusion", {"images": FILE_IDS, "token": "<s1>", "adapters": [{"id": "adp_00"}]}, "adapters"),
        ("/v1/trainings/custom-diffusion-merge", {"adapters": [{"id": "adp_0a"}, {"id": "adp_0a"}]}, "adapters"),
        ("/v1/trainings/custom-diffusion-merge", {"adapters": [{"id": "adp_0a"}]}, "adapters"),
        ("/v1/trainings/custom-diffusion-merge", {"adapters": [{"id": "adp_0a"}, {"id": "not-an-id"}]}, "adapters"),
    ],
)
def test_bad_request_is_422_naming_the_field(
    client: TestClient, auth: dict[str, str], path: str, body: dict[str, Any], field: str
) -> None:
    response = client.post(path, json=body, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    if field:
        assert any(d["field"].split(".")[0] == field for d in error["details"]), error
