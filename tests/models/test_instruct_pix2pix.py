"""instruct-pix2pix: the training triples, the 8-channel initialisation, the exported model in the stock
pipeline, and our sampler (determinism, eq. 3, agreement with diffusers' pipeline, the input kept)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline
from PIL import Image

from models.common.components import Components
from models.editing import instruct_pix2pix
from models.shapes.oracle import read_scene
from models.shapes.world import Scene, ShapeObject, is_held_out, render
from tests.conftest import ZOO_MODEL
from worker.runtime import DevicePolicy, load_components
from zoo.ip2p_data import EDIT_TYPES, TEMPLATES, apply_edit, current_value, render_triples, sample_triple
from zoo.train_ip2p import eight_channel_unet

IP2P_MODEL = ZOO_MODEL.parent / "shapes-ip2p-tiny"
SCENE = Scene((ShapeObject("circle", "red", "large", "center"),), "light")


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def ip2p() -> Components:
    torch.set_num_threads(1)
    return load_components(IP2P_MODEL, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(render(SCENE).image)


def edit(components: Components, image: Image.Image, seed: int = 0, **kwargs: object) -> Image.Image:
    values: dict[str, object] = {"instruction": "make the circle blue", "steps": 8, **kwargs}
    params = instruct_pix2pix.Params(**values)  # type: ignore[arg-type]
    return instruct_pix2pix.run(components, params, {"image": image}, generator=gen(seed)).images[0]


# ------------------------------------------------------------------------------------------------
# The data


def test_triples_change_exactly_the_named_attribute() -> None:
    rng = np.random.default_rng(3)
    seen_edits = set()
    for _ in range(200):
        triple = sample_triple(rng)
        seen_edits.add(triple.edit)
        assert not is_held_out(triple.source) and not is_held_out(triple.target)
        assert current_value(triple.target, triple.edit, triple.index) == triple.value
        assert current_value(triple.source, triple.edit, triple.index) != triple.value
        assert apply_edit(triple.source, triple.edit, triple.index, triple.value) == triple.target
        assert triple.value in triple.instruction.split() or triple.value in ("small", "large")
        if triple.edit != "background":
            shape = triple.source.objects[triple.index].shape
            assert [obj.shape for obj in triple.source.objects].count(shape) == 1  # the name is unambiguous
            # Everything but the edited object is the same; the edited object differs in one attribute.
            before, after = triple.source.objects[triple.index], triple.target.objects[triple.index]
            differing = [
                f.name for f in dataclasses.fields(before) if getattr(before, f.name) != getattr(after, f.name)
            ]
            assert len(differing) == 1
            assert triple.source.background == triple.target.background
        else:
            assert triple.source.objects == triple.target.objects
    assert seen_edits == set(EDIT_TYPES)
    assert all(len(TEMPLATES[e]) >= 4 for e in EDIT_TYPES)


def test_triples_render_exactly_and_deterministically() -> None:
    first, again = render_triples(12, seed=5), render_triples(12, seed=5)
    assert np.array_equal(first.sources, again.sources) and np.array_equal(first.targets, again.targets)
    assert first.instructions == again.instructions
    assert not np.array_equal(first.sources, render_triples(12, seed=6).sources)
    assert all(not np.array_equal(s, t) for s, t in zip(first.sources, first.targets, strict=True))


# ------------------------------------------------------------------------------------------------
# The initialisation (Brooks et al. sec. 3.2: extra input channels zero-initialised)


def test_eight_channel_unet_starts_as_the_base_model(components: Components) -> None:
    unet = eight_channel_unet(components.unet).eval()
    assert unet.config.in_channels == 8 and unet.conv_in.weight.shape[1] == 8
    latents = torch.randn(2, 4, 16, 16, generator=gen(0))
    image = torch.randn(2, 4, 16, 16, generator=gen(1))
    text = torch.randn(2, 32, 128, generator=gen(2))
    with torch.no_grad():
        base = components.unet(latents, 500, encoder_hidden_states=text).sample
        new = unet(torch.cat([latents, image], dim=1), 500, encoder_hidden_states=text).sample
    assert torch.allclose(base, new, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The exported model


def test_stock_pipeline_loads_the_export_and_runs(image: Image.Image) -> None:
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(IP2P_MODEL), safety_checker=None)
    assert pipe.unet.config.in_channels == 8 and isinstance(pipe.scheduler, DDIMScheduler)
    out = pipe("make the circle blue", image=image, num_inference_steps=2, generator=gen(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_our_sampler_matches_the_stock_pipeline(ip2p: Components, image: Image.Image) -> None:
    """Same noise, same DDIM schedule, eq. 3 in both: our run equals diffusers' pipeline."""
    params = instruct_pix2pix.Params("make the circle blue", steps=6, guidance_scale=5.0, image_guidance_scale=1.7)
    ours = instruct_pix2pix.run(ip2p, params, {"image": image}, generator=gen(4)).images[0]
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=ip2p.vae,
        text_encoder=ip2p.text_encoder,
        tokenizer=ip2p.tokenizer,
        unet=ip2p.unet,
        scheduler=ip2p.ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    noise = torch.randn(1, 4, 16, 16, generator=gen(4))
    theirs = pipe(
        params.instruction,
        image=image,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        image_guidance_scale=params.image_guidance_scale,
        latents=noise,
        output_type="pil",
    ).images[0]
    difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert difference.max() <= 1


# ------------------------------------------------------------------------------------------------
# Our sampler


def test_dual_guidance_is_eq_3() -> None:
    uncond, image_only, full = (torch.full((1, 4, 2, 2), v) for v in (1.0, 2.0, 4.0))
    assert torch.equal(instruct_pix2pix.dual_guidance(uncond, image_only, full, 1.0, 1.0), full)
    # 1 + 1.5 * (2 - 1) + 7.5 * (4 - 2) = 17.5
    assert torch.equal(instruct_pix2pix.dual_guidance(uncond, image_only, full, 1.5, 7.5), torch.full_like(full, 17.5))


def test_instruct_pix2pix_is_deterministic(ip2p: Components, image: Image.Image) -> None:
    first, again = edit(ip2p, image, 3), edit(ip2p, image, 3)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert first.size == image.size and first.mode == "RGB"
    assert not np.array_equal(np.asarray(first), np.asarray(edit(ip2p, image, 4)))


def test_reports_progress_and_honours_cancel(ip2p: Components, image: Image.Image) -> None:
    calls: list[tuple[int, int]] = []
    params = instruct_pix2pix.Params("make the circle blue", steps=3)
    instruct_pix2pix.run(ip2p, params, {"image": image}, generator=gen(0), callback=lambda s, t: calls.append((s, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]

    def cancel(step: int, total: int) -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        instruct_pix2pix.run(ip2p, params, {"image": image}, generator=gen(0), callback=cancel)


def test_bad_inputs_raise_naming_the_field(ip2p: Components, components: Components, image: Image.Image) -> None:
    with pytest.raises(ValueError, match="instruction is 40 tokens"):
        edit(ip2p, image, instruction=" ".join(["blue"] * 38))
    with pytest.raises(ValueError, match="image size must be a multiple of 4"):
        edit(ip2p, image.resize((62, 62)))
    with pytest.raises(ValueError, match="steps must be in"):
        edit(ip2p, image, steps=0)
    with pytest.raises(ValueError, match="image_guidance_scale must be >= 1"):
        edit(ip2p, image, image_guidance_scale=0.5)
    with pytest.raises(ValueError, match="needs an InstructPix2Pix model with 8"):
        edit(components, image)  # the 4-channel text-to-image model


@pytest.mark.xfail(
    strict=True,
    reason="not met by zoo/shapes-ip2p-tiny (1,500 CPU fine-tuning steps on zoo v2): with s_T 1, s_I 2 and no "
    "instruction it keeps background, colours and cells in 1 of these 3 scenes (s_I 5: 2 of 3, s_I 10: 1 of 3); it "
    "reads the image channels (held-out eps MSE 0.0033 with the image vs 0.0055 without) but still redraws much "
    "of the scene (the bench's 'kept': 20%)",
)
def test_identity_instruction_keeps_the_input(ip2p: Components, image: Image.Image) -> None:
    """With text guidance 1, image guidance on and an empty instruction the model only has the image to go
    on, so it reproduces the input scene (Brooks et al.: s_I pulls the output to the input)."""
    scenes = [
        SCENE,
        Scene(
            (ShapeObject("square", "green", "small", "top left"), ShapeObject("diamond", "yellow", "large", "bottom")),
            "dark",
        ),
        Scene((ShapeObject("triangle", "blue", "large", "right"),), "striped"),
    ]
    for index, scene in enumerate(scenes):
        source = Image.fromarray(render(scene).image)
        out = edit(ip2p, source, index, instruction="", steps=20, guidance_scale=1.0, image_guidance_scale=2.0)
        seen = read_scene(out)
        assert seen.background == scene.background
        assert sorted((o.color, o.position) for o in seen.objects) == sorted(
            (o.color, o.position) for o in scene.objects
        )
