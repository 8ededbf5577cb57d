"""Single-file checkpoints as A1111 and ComfyUI users keep them (one `.safetensors` in the original LDM layout): the
worker builds the same model from the file as from its diffusers folder, through diffusers' single-file conversion,
with local configs only; the bundled family configs are the published architectures and read every weight of a
released file's layout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from contract.checkpoints import FAMILY_CONFIGS
from models.common.components import Components
from models.generation import text_to_image
from tests.families import save_folder, sd1_components, sd2_v_components, sdxl_components
from tests.ldm_layout import save_single_file, to_ldm
from worker.runtime import DevicePolicy, ModelCache
from worker.single_file import FAMILIES_DIR, find_checkpoint, load_tokenizer

CPU_FP32 = DevicePolicy(torch.device("cpu"), torch.float32, "sdpa")
FIXTURES: dict[str, tuple[Callable[[], Components], bool]] = {  # name -> (family fixture, OpenCLIP text encoder)
    "sd1": (sd1_components, False),
    "sd2-v": (sd2_v_components, True),
    "sdxl": (sdxl_components, False),  # its two text encoders: OpenAI CLIP's and OpenCLIP's layouts
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each tiny family model twice: as a diffusers folder `<f>`, and as the single file `<f>-file.safetensors` whose
    sidecar names a folder of its configs alone, `<f>-configs` (no weights: they come from the file)."""
    out = tmp_path_factory.mktemp("single-files")
    for name, (make, open_clip) in FIXTURES.items():
        components = make()
        save_folder(components, out / name)
        save_folder(components, out / f"{name}-configs", weights=False)
        save_single_file(components, out / f"{name}-file.safetensors", open_clip=open_clip)
        (out / f"{name}-file.json").write_text(json.dumps({"config": f"{name}-configs"}))
    return out


@pytest.mark.parametrize("name", list(FIXTURES))
def test_a_single_file_loads_as_its_folder_does(models_dir: Path, name: str) -> None:
    """Same weights, configs, tokenizer and scheduler; so the same seed makes the same image."""
    cache = ModelCache(models_dir, CPU_FP32)
    folder, single = cache.get(name), cache.get(f"{name}-file")
    assert not (models_dir / f"{name}-configs" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    parts = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if folder.text_encoder_2 is not None else ())
    for part in parts:
        expected, loaded = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert expected.keys() == loaded.keys(), part
        assert all(torch.equal(expected[k], loaded[k]) for k in expected), part
        configs = [getattr(m, part).config for m in (single, folder)]
        settings = [c.to_dict() if part.startswith("text_encoder") else dict(c) for c in configs]
        assert [{k: v for k, v in c.items() if k != "_name_or_path"} for c in settings][0] == {
            k: v for k, v in settings[1].items() if k != "_name_or_path"
        }, part
    assert single.scheduler_config["prediction_type"] == (folder.scheduler_config.get("prediction_type") or "epsilon")
    assert single.tokenizer("a red circle").input_ids == folder.tokenizer("a red circle").input_ids
    if folder.tokenizer_2 is not None:
        assert single.tokenizer_2 is not None and single.tokenizer_2.pad_token == folder.tokenizer_2.pad_token == "!"
        assert single.force_zeros_for_empty_prompt == folder.force_zeros_for_empty_prompt
    params = text_to_image.Params(prompt="a red circle", steps=3)
    images = [
        text_to_image.run(model, params, generator=torch.Generator().manual_seed(7)).images[0]
        for model in (folder, single)
    ]
    assert images[0].tobytes() == images[1].tobytes()


def test_a_file_with_non_finite_weights_is_refused(models_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(models_dir / "sd1-file.safetensors")
    key = "model.diffusion_model.out.2.weight"
    state[key][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    (tmp_path / "sd1-configs").symlink_to(models_dir / "sd1-configs", target_is_directory=True)
    (tmp_path / "nan.json").write_text(json.dumps({"config": "sd1-configs"}))
    with pytest.raises(ValueError, match=f"nan.safetensors: tensor '{key}' holds NaN or infinite values"):
        ModelCache(tmp_path, CPU_FP32).get("nan")


def test_a_file_missing_weights_is_refused(models_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(models_dir / "sd1-file.safetensors")
    del state["first_stage_model.decoder.conv_out.weight"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    (tmp_path / "sd1-configs").symlink_to(models_dir / "sd1-configs", target_is_directory=True)
    (tmp_path / "cut.json").write_text(json.dumps({"config": "sd1-configs"}))
    with pytest.raises(ValueError, match="cut.safetensors lacks weights its configs need"):
        ModelCache(tmp_path, CPU_FP32).get("cut")


def test_pickles_unreadable_files_and_unknown_layouts_never_load(tmp_path: Path) -> None:
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04pickle")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="pickled checkpoints are not loaded.*convert old.ckpt to .safetensors"):
        find_checkpoint(tmp_path, "old")
    with pytest.raises(ValueError, match="broken.safetensors is not a safetensors file"):
        find_checkpoint(tmp_path, "broken")
    with pytest.raises(FileNotFoundError):
        find_checkpoint(tmp_path, "absent")


# Parameters of the released models (their model cards and diffusers' published weights).
PUBLISHED_SIZES = {
    "unet": {"sd1": 859_520_964, "sd2": 865_910_724, "sd2-v": 865_910_724, "sdxl": 2_567_463_684},
    "text_encoder": {"sd1": 123_060_480, "sd2": 340_387_840, "sd2-v": 340_387_840, "sdxl": 123_060_480},
}


def empty_family(folder: str) -> Components:
    """A bundled family's model on the meta device (shapes, no memory)."""
    configs = FAMILIES_DIR / folder
    encoder_2 = None
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((configs / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text()))
        encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
        if (configs / "text_encoder_2").is_dir():
            encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs / "text_encoder_2"))
    scheduler = json.loads((configs / "scheduler" / "scheduler_config.json").read_text())
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=encoder,
        tokenizer=load_tokenizer(configs / "tokenizer"),
        scheduler_config=scheduler,
        text_encoder_2=encoder_2,
    )


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", sorted({c.folder for c in FAMILY_CONFIGS.values()}))
def test_bundled_configs_are_the_released_architectures(family: str) -> None:
    """Each bundled family builds its released model's parameter counts, native size and scheduler; its layout
    (converted to the original keys) goes back through diffusers' own converters to every weight of the model."""
    model = empty_family(family)
    assert count(model.unet) == PUBLISHED_SIZES["unet"][family]
    assert count(model.vae) == 83_653_863  # SD's VAE, in every family
    assert count(model.text_encoder) == PUBLISHED_SIZES["text_encoder"][family]
    if model.text_encoder_2 is not None:
        assert count(model.text_encoder_2) == 694_659_840  # OpenCLIP bigG/14 with its projection
    (entry,) = [(k, c) for k, c in FAMILY_CONFIGS.items() if c.folder == family]
    assert model.native_size == entry[1].sample_size
    assert model.scheduler_config.get("prediction_type", "epsilon") == entry[0][1]

    ldm = to_ldm(model, open_clip=family.startswith("sd2"))
    unet = convert_ldm_unet_checkpoint(ldm, dict(model.unet.config))
    assert {k: v.shape for k, v in unet.items()} == {k: v.shape for k, v in model.unet.state_dict().items()}
    vae = convert_ldm_vae_checkpoint(ldm, dict(model.vae.config))
    assert {k: v.shape for k, v in vae.items()} == {k: v.shape for k, v in model.vae.state_dict().items()}
    if family.startswith("sd2"):
        text = convert_open_clip_checkpoint(model.text_encoder, ldm)
    else:
        prefix = "conditioner.embedders.0.transformer." if family == "sdxl" else None
        text = convert_ldm_clip_checkpoint(ldm, prefix)
    expected = {k: v.shape for k, v in model.text_encoder.state_dict().items() if "position_ids" not in k}
    assert {
        k.removeprefix("text_model."): v.shape
        for k, v in text.items()
        if k in expected or k.removeprefix("text_model.") in expected
    } == expected


def test_the_clip_vocabulary_is_clips() -> None:
    """The derived vocabulary tokenizes as CLIP does (ids as in diffusers' and OpenAI's examples); SD 2.x pads with
    "!" (id 0), SD 1.x with <|endoftext|>."""
    sd1 = load_tokenizer(FAMILIES_DIR / "sd1" / "tokenizer")
    sd2 = load_tokenizer(FAMILIES_DIR / "sd2-v" / "tokenizer")
    assert len(sd1) == 49408 and sd1.model_max_length == 77
    ids = sd1("a photograph of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert sd1.pad_token_id == 49407 and sd2.pad_token_id == 0
