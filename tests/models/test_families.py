"""Every registered method runs on each Stable Diffusion family it claims (issue 12), on tiny random-weight models
with the families' structure (tests/families.py): SD 1.x (four UNet levels, VAE factor 8, 768-wide cross-attention,
77 tokens, epsilon), SD 2.x (linear attention projections, v-prediction) and SDXL (two text encoders, added
text-time conditioning; it claims only the methods whose spec lists it in `families`). They catch what the bundled
zoo model would hide: a 64-pixel or four-times-downsampling assumption, a hard-coded text width, the noise taken for
the model's output.

Each method runs as the worker runs it: its request's Swagger example, turned into the runner's `Params` by the
worker's own `method_params`, with the images the example names as inputs at the model's native size (and the
class images a worker would generate), at a few steps. A method a family lacks the capability for (InstructPix2Pix
needs an 8-channel UNet) is not claimed and not run; the merge of trained adapters reads adapters, not a model's
predictions, and has its own tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from api.catalog import runnable
from contract.registry import methods
from contract.spec import Family, MethodSpec
from models.common.components import Components
from models.shapes.world import render, sample_scene
from tests.families import sd1_components, sd2_v_components, sdxl_components
from worker.runners import load_runner, method_params

# fixture name -> (the catalog's family, the tiny model)
FAMILIES: dict[str, tuple[Family, Callable[[], Components]]] = {
    "sd1": ("sd1", sd1_components),
    "sd2-v": ("sd2", sd2_v_components),
    "sdxl": ("sdxl", sdxl_components),
}
CAPABILITIES = ("unet", "text-to-image", "cross-attention")  # what the catalog lists for a plain SD 1.x/2.x/XL UNet
SPECS = sorted(
    (spec for spec in methods().values() if spec.adapters != "inputs"),
    key=lambda spec: spec.kind,
)
CASES = [
    (name, spec)
    for name, (family, _) in FAMILIES.items()
    for spec in SPECS
    if family in spec.families and set(spec.requires) <= set(CAPABILITIES)
]
FEW = 2  # steps of every kind


@functools.cache
def built(name: str) -> Components:
    torch.set_num_threads(1)
    return FAMILIES[name][1]()


def example(spec: MethodSpec) -> dict[str, Any]:
    extra = spec.request.model_config.get("json_schema_extra")
    assert isinstance(extra, dict)
    return dict(extra["examples"][0])


def quick(values: dict[str, Any]) -> dict[str, Any]:
    """The example at a few steps: every `*steps` count, the classifier's samples, the synthetic classes' counts
    and the class images cut down, nothing else changed."""
    out = dict(values)
    for key, value in values.items():
        if key.endswith("steps") and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, FEW)
    if "samples_per_stage" in out:
        out["samples_per_stage"] = [1] * len(out["samples_per_stage"])
    if "classes" in out:
        out["classes"] = [{**item, "count": 1} for item in out["classes"]]
    out["num_class_images"] = 2
    out["class_steps"] = FEW
    out.pop("model", None)
    return out


def scene_image(size: int, seed: int) -> Image.Image:
    return Image.fromarray(render(sample_scene(np.random.default_rng(seed), split="test"), 64).image).resize(
        (size, size)
    )


def square_mask(size: int) -> Image.Image:
    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[size // 4 : size // 2, size // 4 : size // 2] = 255
    return Image.fromarray(pixels)


def inputs_for(spec: MethodSpec, named: dict[str, Any], params: Any, runner: Any, size: int) -> dict[str, object]:
    """The images the example names (`named`), as the worker would load them, and the class images it would make."""
    inputs: dict[str, object] = {}
    for name in spec.image_fields:
        if name in named:
            inputs[name] = square_mask(size) if name == "mask" else scene_image(size, 0)
    for name in spec.image_list_fields:
        if name in named:
            inputs[name] = [scene_image(size, seed) for seed in range(len(named[name]))]
    if spec.class_images:
        for name, wanted in runner.class_image_requests(params).items():
            inputs[name] = [scene_image(size, 100 + i) for i in range(wanted.count)]
    return inputs


def finite(image: Image.Image) -> bool:
    return bool(np.isfinite(np.asarray(image, dtype=np.float32)).all())


@pytest.mark.parametrize(("name", "spec"), CASES, ids=[f"{name}-{spec.kind}" for name, spec in CASES])
def test_every_claimed_method_runs_on_each_family(name: str, spec: MethodSpec) -> None:
    components = built(name)
    runner = load_runner(spec)
    values = quick(example(spec))
    params = method_params(runner, values)
    size = components.native_size
    inputs = inputs_for(spec, values, params, runner, size)
    out = runner.run(components, params, inputs, generator=torch.Generator().manual_seed(0))
    for image in out.images:
        assert image.size == (size, size) or spec.kind == "synthetic", (name, spec.kind, image.size)
        assert finite(image)
    assert out.images or out.adapter is not None or out.result or out.files, (name, spec.kind)


def test_the_runs_here_are_what_the_catalog_claims() -> None:
    """Every method the catalog lists for a family with these capabilities runs above (the adapter merge, which
    reads no model, has its own tests); SDXL's are exactly text-to-image, SDEdit and region edit."""
    merged = {spec.kind for spec in methods().values() if spec.adapters == "inputs"}
    for name, (family, _) in FAMILIES.items():
        here = {spec.kind for case, spec in CASES if case == name}
        assert set(runnable(family, list(CAPABILITIES))) - merged == here, name
    assert {spec.kind for case, spec in CASES if case == "sdxl"} == {"text-to-image", "sdedit", "region-edit"}


def test_the_families_are_shaped_as_claimed() -> None:
    sd1, sd2 = sd1_components(), sd2_v_components()
    assert (sd1.vae_scale, sd1.native_size, len(sd1.unet.config.block_out_channels)) == (8, 64, 4)
    assert sd1.unet.config.cross_attention_dim == 768 and sd1.tokenizer.model_max_length == 77
    assert sd1.ddim().config.prediction_type == "epsilon"
    assert sd2.ddim().config.prediction_type == "v_prediction" and sd2.unet.config.use_linear_projection
