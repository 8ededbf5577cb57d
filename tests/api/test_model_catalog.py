"""The model catalog on real families' layouts (configs only, no weights, read as JSON): family, prediction type,
native size, and the methods each runs (no method the code cannot run on its family); a job naming a model for a
method it cannot run is a 422."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from api.catalog import list_models
from store.settings import Settings
from tests.conftest import ZOO_MODEL, make_tenant
from tests.control_models import CONTROLNET, SDXL, SDXL_INDEX, SDXL_SCHEDULER, SDXL_UNET, SDXL_VAE, write_configs
from tests.images import b64, png_bytes

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


SDXL_METHODS = ["region-edit", "sdedit", "text-to-image"]  # what runs on SDXL (tests/models/test_sdxl.py)


def test_sdxl_claims_exactly_the_methods_that_pass_its_conditioning(tmp_path: Path) -> None:
    """SDXL runs text-to-image, SDEdit and region edit (with LoRA and textual-inversion adapters): the methods that
    pass its second text encoder and added conditioning; no other. Either mark (a second text encoder, or the UNet's
    text-time embedding) makes a folder SDXL, at any width."""
    tiny_unet = SDXL_UNET | {"block_out_channels": [32, 64], "cross_attention_dim": 64}
    no_second_encoder = {k: v for k, v in SDXL_INDEX.items() if not k.endswith("_2")}
    plain_unet = {k: v for k, v in SDXL_UNET.items() if not k.startswith(("addition", "projection"))}
    models = catalog(
        tmp_path,
        base=(SDXL_INDEX, SDXL_UNET, SDXL_VAE, SDXL_SCHEDULER),
        tiny=(no_second_encoder, tiny_unet, SDXL_VAE, SDXL_SCHEDULER),
        two_encoders=(SDXL_INDEX, plain_unet | {"cross_attention_dim": 1280}, SDXL_VAE, SDXL_SCHEDULER),
        sd15=(SD_INDEX, SD_UNET, SD_VAE, SD1_SCHEDULER),
    )
    for name in ("base", "tiny", "two_encoders"):
        assert models[name]["family"] == "sdxl", name
        assert sorted(models[name]["methods"]) == SDXL_METHODS, name
        assert {"unet", "text-to-image", "cross-attention"} <= set(models[name]["capabilities"]), name
    assert set(SDXL_METHODS) < set(models["sd15"]["methods"]) and "diffedit" in models["sd15"]["methods"]


def test_a_method_sdxl_does_not_run_is_422_naming_the_model_and_family(
    client: TestClient, auth: dict[str, str]
) -> None:
    models = {m["name"]: m for m in client.get("/v1/models", headers=auth).json()}
    assert models[SDXL]["family"] == "sdxl" and "prompt-to-prompt" not in models[SDXL]["methods"]
    assert models["shapes-sd-tiny"]["prediction_type"] == "epsilon"
    methods = {m["kind"]: m for m in client.get("/v1/methods", headers=auth).json()}
    assert "sdxl" in methods["text-to-image"]["families"] and "sdxl" not in methods["prompt-to-prompt"]["families"]
    body = {"source_prompt": "a red circle", "target_prompt": "a blue circle", "model": SDXL}
    response = client.post("/v1/edits/prompt-to-prompt", json=body, headers=auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"] == [
        {
            "field": "model",
            "message": f"{SDXL} is a sdxl model; prompt-to-prompt runs on sd1, sd2, custom models only "
            "(GET /v1/models lists each model's methods)",
        }
    ]


def test_a_control_model_of_another_family_on_an_sdxl_model_is_422(client: TestClient, auth: dict[str, str]) -> None:
    """An SDXL base takes SDXL control models only (tests/api/test_controls_api.py): the zoo's ControlNet is not
    one."""
    body = {
        "prompt": "a red circle",
        "model": SDXL,
        "controls": [{"model": CONTROLNET, "condition": "file_0123456789abcdef01234567"}],
    }
    response = client.post("/v1/generations/text-to-image", json=body, headers=auth)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["error"]["details"]
    assert detail["field"] == "controls[0].model"
    assert detail["message"].endswith("this ControlNet is not one"), detail


def client_on_folder(settings: Settings, folder: Path, *configs: dict[str, Any]) -> TestClient:
    """An API client whose models directory holds one model folder of these configs (index, UNet, VAE, scheduler)
    and the zoo's tokenizer."""
    from api.main import create_app

    write_configs(folder, *configs)
    (folder / "tokenizer").symlink_to(ZOO_MODEL / "tokenizer", target_is_directory=True)
    return TestClient(create_app(settings.model_copy(update={"models_dir": folder.parent})))


def test_text_to_image_on_sdxl_is_accepted_at_its_native_size(settings: Settings, tmp_path: Path) -> None:
    """A text-to-image job on an SDXL folder is created (no 422), at SDXL's 1024x1024 when no size is given."""
    auth = {"Authorization": f"Bearer {make_tenant(settings)[1]}"}
    with client_on_folder(settings, tmp_path / "sdxl", SDXL_INDEX, SDXL_UNET, SDXL_VAE, SDXL_SCHEDULER) as client:
        made = client.post(
            "/v1/generations/text-to-image", json={"prompt": "a red circle", "model": "sdxl"}, headers=auth
        )
        assert made.status_code == 201, made.text
        assert (made.json()["params"]["width"], made.json()["params"]["height"]) == (1024, 1024)
        refused = client.post(
            "/v1/edits/prompt-to-prompt",
            json={"source_prompt": "a red circle", "target_prompt": "a blue circle", "model": "sdxl"},
            headers=auth,
        )
        assert refused.status_code == 422, refused.text


def test_an_image_size_left_out_is_the_models_native_one(settings: Settings, tmp_path: Path) -> None:
    """Text-to-image without `width`/`height` on an SD 1.5-shaped model makes (and records) 512x512, its native
    size, not a size fitted to the bundled zoo model; given sizes are kept."""
    auth = {"Authorization": f"Bearer {make_tenant(settings)[1]}"}
    with client_on_folder(settings, tmp_path / "sd15", SD_INDEX, SD_UNET, SD_VAE, SD1_SCHEDULER) as client:
        made = client.post(
            "/v1/generations/text-to-image", json={"prompt": "a red circle", "model": "sd15"}, headers=auth
        )
        assert made.status_code == 201, made.text
        assert (made.json()["params"]["width"], made.json()["params"]["height"]) == (512, 512)
        given = {"prompt": "a red circle", "model": "sd15", "width": 256, "height": 384}
        kept = client.post("/v1/generations/text-to-image", json=given, headers=auth)
        assert kept.status_code == 201, kept.text
        assert (kept.json()["params"]["width"], kept.json()["params"]["height"]) == (256, 384)


def test_defaults_tuned_on_the_zoo_apply_to_zoo_models_only(
    settings: Settings, tmp_path: Path, client: TestClient, auth: dict[str, str]
) -> None:
    """Imagic's and the trainings' steps and rates left out come from the job's model: the paper's on a general
    model (an SD 1.5 folder), the zoo-tuned ones on a ShapesWorld model (its `atelier.json` says so); the job
    records them, and a value given is kept. Before, every model got the zoo's (DreamBooth at 2e-4 on SD 1.5)."""
    image = "data:image/png;base64," + b64(png_bytes())
    imagic = {"image": image, "target_prompt": "a blue circle"}
    dreambooth = {"images": [image] * 3, "token": "<s1>", "class_word": "circle"}

    def made(on: TestClient, headers: dict[str, str], path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = on.post(path, json=body, headers=headers)
        assert response.status_code == 201, response.text
        return dict(response.json()["params"])

    zoo = {m["name"]: m for m in client.get("/v1/models", headers=auth).json()}[ZOO_MODEL.name]
    assert zoo["domain"] == "shapesworld"
    zoo_imagic = made(client, auth, "/v1/edits/imagic", imagic | {"model": ZOO_MODEL.name})
    assert [zoo_imagic[k] for k in ("embedding_steps", "embedding_lr", "finetune_steps", "finetune_lr")] == [
        100, 2e-3, 150, 6e-5
    ]
    zoo_db = made(client, auth, "/v1/trainings/dreambooth", dreambooth | {"model": ZOO_MODEL.name})
    assert (zoo_db["steps"], zoo_db["learning_rate"]) == (200, 2e-4)

    general_auth = {"Authorization": f"Bearer {make_tenant(settings)[1]}"}
    with client_on_folder(settings, tmp_path / "sd15", SD_INDEX, SD_UNET, SD_VAE, SD1_SCHEDULER) as general:
        listed = {m["name"]: m for m in general.get("/v1/models", headers=general_auth).json()}
        assert listed["sd15"]["domain"] == "general"
        sd_imagic = made(general, general_auth, "/v1/edits/imagic", imagic | {"model": "sd15"})
        assert [sd_imagic[k] for k in ("embedding_steps", "embedding_lr", "finetune_steps", "finetune_lr")] == [
            500, 1e-3, 1000, 2e-6
        ]
        sd_db = made(general, general_auth, "/v1/trainings/dreambooth", dreambooth | {"model": "sd15"})
        assert (sd_db["steps"], sd_db["learning_rate"]) == (400, 5e-6)
        sd_lora = made(general, general_auth, "/v1/trainings/lora", dreambooth | {"model": "sd15", "steps": 7})
        assert (sd_lora["steps"], sd_lora["learning_rate"]) == (7, 1e-4)
