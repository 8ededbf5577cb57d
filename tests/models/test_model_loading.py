"""Model folders as users keep them: diffusers' fp16 variant layout (`*.fp16.safetensors` only) loads like the
plain one, base models and control models, in the policy's dtype."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from models.common.components import Components
from tests.conftest import ZOO_MODEL
from tests.control_models import tiny_controlnet
from worker.runtime import DevicePolicy, load_components, load_control, weights_variant

CPU_FP32 = DevicePolicy(torch.device("cpu"), torch.float32, "sdpa")


def through_fp16(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights as an fp16 file holds them, read back in float32."""
    return {name: value.half().float() for name, value in module.state_dict().items()}


def fp16_only(components: Components, folder: Path) -> Path:
    """The zoo model saved as diffusers' `variant="fp16"` layout: fp16 weights, no plain files."""
    for name in ("scheduler", "tokenizer", "model_index.json"):
        source = ZOO_MODEL / name
        if source.is_dir():
            shutil.copytree(source, folder / name)
        else:
            shutil.copy(source, folder / name)
    for part in ("unet", "vae", "text_encoder"):
        half = copy.deepcopy(getattr(components, part)).half()
        half.save_pretrained(folder / part, variant="fp16", safe_serialization=True)
        assert weights_variant(folder / part) == "fp16", list((folder / part).iterdir())
    return folder


def test_a_folder_of_fp16_variant_weights_loads(components: Components, tmp_path: Path) -> None:
    loaded = load_components(fp16_only(components, tmp_path / "fp16"), CPU_FP32)
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(loaded, part)
        assert module.dtype == torch.float32
        expected = through_fp16(getattr(components, part))
        assert all(torch.equal(value, expected[name]) for name, value in module.state_dict().items()), part
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    text = torch.randn(1, 77, components.unet.config.cross_attention_dim)
    with torch.no_grad():
        ours = loaded.unet(latents, 500, encoder_hidden_states=text).sample
        plain = components.unet(latents, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, plain, rtol=1e-2, atol=1e-2)  # fp16 rounding of the weights only
    # The bundled UNet's EMA weights happen to be fp16-exact (its training pack keeps them in fp16); the VAE's are
    # not, so the rounding shows that the fp16 files were read.
    vae_plain = components.vae.state_dict()
    assert any(not torch.equal(value, vae_plain[name]) for name, value in loaded.vae.state_dict().items())


def test_a_control_model_of_fp16_variant_weights_loads(components: Components, tmp_path: Path) -> None:
    net = tiny_controlnet(components.unet, components.vae_scale, seed=1)
    copy.deepcopy(net).half().save_pretrained(tmp_path / "net", variant="fp16")
    assert weights_variant(tmp_path / "net") == "fp16"
    loaded = load_control(tmp_path / "net", CPU_FP32)
    expected = through_fp16(net)
    assert loaded.dtype == torch.float32
    assert all(torch.equal(value, expected[name]) for name, value in loaded.state_dict().items())


def test_plain_weights_are_preferred_to_the_fp16_variant(tmp_path: Path) -> None:
    (tmp_path / "diffusion_pytorch_model.safetensors").touch()
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").touch()
    assert weights_variant(tmp_path) is None
    assert weights_variant(tmp_path / "missing") is None
