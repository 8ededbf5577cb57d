"""The model catalog on real families' layouts (configs only, no weights, read as JSON): family, prediction type,
native size, and no capability the code cannot run; a job naming a model for a method it cannot run is a 422."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from api.catalog import list_models
from store.settings import Settings
from tests.conftest import ZOO_MODEL, make_tenant
from tests.control_models import SDXL, SDXL_INDEX, SDXL_SCHEDULER, SDXL_UNET, SDXL_VAE, write_configs

SD_INDEX = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
SD_UNET = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "in_channels": 4,
    "sample_size": 64,
}
SD_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}
# SD 1.5's scheduler config names no prediction type (epsilon); SD 2.1 (768 px) predicts v.
SD1_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "skip_prk_steps": True}
SD2_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "prediction_type": "v_prediction"}


def catalog(tmp_path: Path, **folders: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    for name, configs in folders.items():
        write_configs(tmp_path / name, *configs)
    return {m.name: m.model_dump() for m in list_models(tmp_path, "none")}


def test_families_prediction_types_and_native_sizes(tmp_path: Path) -> None:
    sd2_unet = SD_UNET | {"cross_attention_dim": 1024, "sample_size": 96}
    models = catalog(
        tmp_path,
        sd15=(SD_INDEX, SD_UNET, SD_VAE, SD1_SCHEDULER),
        sd21=(SD_INDEX, sd2_unet, SD_VAE, SD2_SCHEDULER),
        sdxl=(SDXL_INDEX, SDXL_UNET, SDXL_VAE, SDXL_SCHEDULER),
    )
    shown = {name: (m["family"], m["prediction_type"], m["sample_size"]) for name, m in models.items()}
    assert shown == {
        "sd15": ("sd1", "epsilon", 512),
        "sd21": ("sd2", "v_prediction", 768),
        "sdxl": ("sdxl", "epsilon", 1024),
    }
    assert {"unet", "text-to-image", "cross-attention"} <= set(models["sd15"]["capabilities"])


def test_sdxl_claims_no_capability(tmp_path: Path) -> None:
    """The worker loads one text encoder and passes no added conditioning: nothing runs on SDXL yet. Either mark
    (a second text encoder, or the UNet's text-time embedding) is enough, at any width."""
    tiny_unet = SDXL_UNET | {"block_out_channels": [32, 64], "cross_attention_dim": 64}
    no_second_encoder = {k: v for k, v in SDXL_INDEX.items() if not k.endswith("_2")}
    plain_unet = {k: v for k, v in SDXL_UNET.items() if not k.startswith(("addition", "projection"))}
    models = catalog(
        tmp_path,
        base=(SDXL_INDEX, SDXL_UNET, SDXL_VAE, SDXL_SCHEDULER),
        tiny=(no_second_encoder, tiny_unet, SDXL_VAE, SDXL_SCHEDULER),
        two_encoders=(SDXL_INDEX, plain_unet | {"cross_attention_dim": 1280}, SDXL_VAE, SDXL_SCHEDULER),
    )
    for name, model in models.items():
        assert (model["family"], model["capabilities"]) == ("sdxl", []), name


def test_text_to_image_on_sdxl_is_422_naming_the_model(client: TestClient, auth: dict[str, str]) -> None:
    models = {m["name"]: m for m in client.get("/v1/models", headers=auth).json()}
    assert models[SDXL]["family"] == "sdxl" and "text-to-image" not in models[SDXL]["capabilities"]
    assert models["shapes-sd-tiny"]["prediction_type"] == "epsilon"
    body = {"prompt": "a red circle", "model": SDXL}
    response = client.post("/v1/generations/text-to-image", json=body, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"] == [{"field": "model", "message": f"{SDXL} lacks text-to-image needed by text-to-image"}]


def test_an_image_size_left_out_is_the_models_native_one(settings: Settings, tmp_path: Path) -> None:
    """Text-to-image without `width`/`height` on an SD 1.5-shaped model makes (and records) 512x512, its native
    size, not a size fitted to the bundled zoo model; given sizes are kept."""
    from api.main import create_app

    write_configs(tmp_path / "sd15", SD_INDEX, SD_UNET, SD_VAE, SD1_SCHEDULER)
    (tmp_path / "sd15" / "tokenizer").symlink_to(ZOO_MODEL / "tokenizer", target_is_directory=True)
    _, key = make_tenant(settings)
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings.model_copy(update={"models_dir": tmp_path}))) as client:
        made = client.post(
            "/v1/generations/text-to-image", json={"prompt": "a red circle", "model": "sd15"}, headers=auth
        )
        assert made.status_code == 201, made.text
        assert (made.json()["params"]["width"], made.json()["params"]["height"]) == (512, 512)
        given = {"prompt": "a red circle", "model": "sd15", "width": 256, "height": 384}
        kept = client.post("/v1/generations/text-to-image", json=given, headers=auth)
        assert kept.status_code == 201, kept.text
        assert (kept.json()["params"]["width"], kept.json()["params"]["height"]) == (256, 384)
