"""Controls and grounding at the API: `GET /v1/models` lists control models; every bad control or grounding input is
a 422 naming the field, and leaves no job, no file and no stored bytes behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from store.settings import Settings
from tests.api.test_bad_input import counts, upload
from tests.conftest import ZOO_MODEL, make_tenant
from tests.control_models import (
    ADAPTER,
    CONTROLNET,
    GLIGEN,
    OTHER_FAMILY,
    SDXL_ADAPTER,
    SDXL_CONTROLNET,
    SDXL_INDEX,
    SDXL_SCHEDULER,
    SDXL_TINY,
    SDXL_UNET,
    SDXL_VAE,
    write_configs,
)
from tests.images import b64, png_bytes

T2I = "/v1/generations/text-to-image"
SDEDIT = "/v1/edits/sdedit"
REGION = "/v1/edits/region-edit"


def control(condition: str, **fields: Any) -> dict[str, Any]:
    return {"model": CONTROLNET, "condition": condition, **fields}


def test_models_lists_control_models_with_kind_condition_and_family(client: TestClient, auth: dict[str, str]) -> None:
    models = {m["name"]: m for m in client.get("/v1/models", headers=auth).json()}
    assert models["shapes-sd-tiny"]["kind"] == "base" and models["shapes-sd-tiny"]["default"]
    assert "gligen" in models[GLIGEN]["capabilities"] and "gligen" not in models["shapes-sd-tiny"]["capabilities"]
    net, adapter = models[CONTROLNET], models[ADAPTER]
    assert (net["kind"], net["condition"], net["base_model"]) == ("controlnet", "canny", "shapes-sd-tiny")
    assert (adapter["kind"], adapter["condition"]) == ("t2i-adapter", "sketch")
    assert net["family"] == models["shapes-sd-tiny"]["family"] == "custom"
    assert models[OTHER_FAMILY]["condition"] == "unknown"  # no atelier.json, no condition word in its name


BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    # (route, body beyond the prompt, text the 422's message must hold)
    (T2I, {"controls": [control(b64(png_bytes(32, 32)))]}, "controls[0].condition: the condition is 32x32"),
    (T2I, {"controls": [control(b64(png_bytes(64, 32)), preprocessor="canny")]}, "aspect ratios differ"),
    (T2I, {"controls": [control(b64(png_bytes()), preprocessor="sobel")]}, "controls.0.preprocessor"),
    (T2I, {"controls": [control(b64(png_bytes()), model="no-such-controlnet")]}, "controls[0].model"),
    (T2I, {"controls": [control(b64(png_bytes()), model="shapes-sd-tiny")]}, "not found"),  # a base, not a control
    (T2I, {"controls": [control(b64(png_bytes()), model=OTHER_FAMILY)]}, "cross_attention_dim is 64"),
    (T2I, {"controls": [control(b64(png_bytes()))] * 5}, "at most 4"),
    (T2I, {"controls": [control(b64(png_bytes()), start=0.6, end=0.4)]}, "must be below end"),
    (T2I, {"controls": [control(b64(png_bytes()), scale=-1)]}, "controls.0.scale"),
    (T2I, {"controls": [control(b64(png_bytes()), low_threshold=200, high_threshold=100)]}, "low_threshold"),
    (T2I, {"controls": [control(b64(png_bytes()), model=ADAPTER, start=0.5)]}, "controls[0].start"),
    (T2I, {"controls": [control("file_00000000000000000000ffff")]}, "file_00000000000000000000ffff"),
    (T2I, {"controls": [control("not base64 at all!")]}, "controls[0].condition"),
    (T2I, {"model": GLIGEN, "grounding": [{"phrase": "a red circle", "box": [0.2, 0.2, 1.4, 0.5]}]}, "in [0, 1]"),
    (T2I, {"model": GLIGEN, "grounding": [{"phrase": "a red circle", "box": [0.5, 0.2, 0.5, 0.6]}]}, "non-zero area"),
    (T2I, {"model": GLIGEN, "grounding": [{"phrase": "a red circle"}]}, "grounding.0.box"),
    (T2I, {"model": GLIGEN, "grounding": [{"phrase": "", "box": [0, 0, 0.5, 0.5]}]}, "grounding.0.phrase"),
    (T2I, {"grounding": [{"phrase": "a red circle", "box": [0, 0, 0.5, 0.5]}]}, "has no GLIGEN layers"),
    (T2I, {"model": GLIGEN, "grounding": [{"phrase": "x", "box": [0, 0, 1, 1]}] * 31}, "at most 30"),
    (
        SDEDIT,
        {"image": b64(png_bytes(64, 64)), "controls": [control(b64(png_bytes(64, 48)))]},
        "the condition is 64x48",
    ),
    # Families: the zoo's (custom) control models on the SDXL model, the SDXL model's on the zoo's base; GLIGEN
    (
        T2I,
        {"model": SDXL_TINY, "controls": [control(b64(png_bytes()))]},
        f"{CONTROLNET} (controlnet, family custom) does not fit base model {SDXL_TINY} (family sdxl): an SDXL base "
        "model takes SDXL control models only",
    ),
    (
        SDEDIT,
        {"model": SDXL_TINY, "image": b64(png_bytes()), "controls": [control(b64(png_bytes()), model=ADAPTER)]},
        "(family sdxl): an SDXL base model takes SDXL control models only (a ControlNet with added text-time "
        "conditioning, a T2I-Adapter of type full_adapter_xl); this T2I-Adapter is not one",
    ),
    (
        T2I,
        {"controls": [control(b64(png_bytes()), model=SDXL_CONTROLNET)]},
        f"{SDXL_CONTROLNET} (controlnet, family sdxl) does not fit base model shapes-sd-tiny (family custom): an "
        "SDXL ControlNet runs on SDXL base models only",
    ),
    (T2I, {"controls": [control(b64(png_bytes()), model=SDXL_ADAPTER)]}, "an SDXL T2I-Adapter runs on SDXL base"),
    (
        T2I,
        {"model": SDXL_TINY, "controls": [control(b64(png_bytes()), model=SDXL_ADAPTER, start=0.5)]},
        "controls[0].start",
    ),
    (T2I, {"model": SDXL_TINY, "grounding": [{"phrase": "a", "box": [0, 0, 0.5, 0.5]}]}, "has no GLIGEN layers"),
]


@pytest.mark.parametrize(("route", "body", "message"), BAD_BODIES)
def test_bad_controls_are_422_and_nothing_is_stored(
    client: TestClient,
    auth: dict[str, str],
    settings: Settings,
    tenant: tuple[str, str],
    route: str,
    body: dict[str, Any],
    message: str,
) -> None:
    response = client.post(route, json={"prompt": "a large red circle at the center", **body}, headers=auth)
    assert response.status_code in (404, 422), response.text
    assert message in response.json()["error"]["message"], response.json()
    assert counts(settings, tenant[0]) == (0, 0, 0)


def test_a_bad_second_control_removes_the_first_ones_stored_condition(
    client: TestClient, auth: dict[str, str], settings: Settings, tenant: tuple[str, str]
) -> None:
    """The first condition is fine base64 and the second's model is missing: no file of the first stays."""
    body = {
        "prompt": "a large red circle at the center",
        "controls": [control(b64(png_bytes())), control(b64(png_bytes()), model="missing")],
    }
    response = client.post(T2I, json=body, headers=auth)
    assert response.status_code == 422 and "controls[1].model" in response.json()["error"]["message"]
    assert counts(settings, tenant[0]) == (0, 0, 0)


def test_a_photo_of_any_size_with_a_preprocessor_is_accepted_and_recorded(
    client: TestClient, auth: dict[str, str]
) -> None:
    """A 100x100 photo (sides not multiples of 8) is fine with `canny`: it is resized to the job's 64x64. The job
    records the control as requested, the condition by file id, and echoes it in its params."""
    photo = upload(client, auth, png_bytes(100, 100)).json()["id"]
    grounding = [{"phrase": "a red circle", "box": [0.1, 0.1, 0.5, 0.5]}]
    body = {
        "prompt": "a large red circle at the top left",
        "model": GLIGEN,
        "controls": [control(photo, preprocessor="canny", scale=0.5, end=0.8)],
        "grounding": grounding,
        "grounding_fraction": 0.5,
        "steps": 2,
    }
    created = client.post(T2I, json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = created.json()
    recorded = job["controls"][0]
    assert (recorded["model"], recorded["condition"], recorded["preprocessor"]) == (CONTROLNET, photo, "canny")
    assert (recorded["scale"], recorded["start"], recorded["end"]) == (0.5, 0.0, 0.8)
    assert job["grounding"] == {"boxes": grounding, "fraction": 0.5}
    assert job["params"]["controls"] == job["controls"] and job["params"]["grounding"] == grounding
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)


def test_models_lists_sdxl_control_models_with_family_sdxl(client: TestClient, auth: dict[str, str]) -> None:
    models = {m["name"]: m for m in client.get("/v1/models", headers=auth).json()}
    net, adapter = models[SDXL_CONTROLNET], models[SDXL_ADAPTER]
    assert (net["kind"], net["family"], net["condition"], net["base_model"]) == (
        "controlnet",
        "sdxl",
        "canny",
        SDXL_TINY,
    )
    assert (adapter["kind"], adapter["family"], adapter["condition"]) == ("t2i-adapter", "sdxl", "sketch")
    assert models[SDXL_TINY]["family"] == "sdxl"


def mask_png() -> bytes:
    return png_bytes(color=(255, 255, 255))


@pytest.mark.parametrize(
    ("route", "inputs"),
    [
        (T2I, {}),
        (SDEDIT, {"image": b64(png_bytes())}),
        (REGION, {"image": b64(png_bytes()), "mask": b64(mask_png()), "sparse": False}),
    ],
)
def test_sdxl_control_models_are_accepted_on_the_sdxl_model(
    client: TestClient, auth: dict[str, str], route: str, inputs: dict[str, Any]
) -> None:
    """An SDXL ControlNet (with a step range) and an SDXL T2I-Adapter on the SDXL model: text-to-image, SDEdit and
    a dense region edit are created and record both."""
    controls = [
        control(b64(png_bytes()), model=SDXL_CONTROLNET, scale=0.5, start=0.1, end=0.9),
        control(b64(png_bytes()), model=SDXL_ADAPTER, preprocessor="scribble"),
    ]
    body = {"prompt": "a large red circle", "model": SDXL_TINY, "steps": 2, "controls": controls, **inputs}
    created = client.post(route, json=body, headers=auth)
    assert created.status_code == 201, created.text
    job = created.json()
    assert [(c["model"], c["start"], c["end"]) for c in job["controls"]] == [
        (SDXL_CONTROLNET, 0.1, 0.9),
        (SDXL_ADAPTER, 0.0, 1.0),
    ]
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)


# The released models' configs (the fields the catalog reads), as they ship: Stable Diffusion 1.5's UNet, a ControlNet
# and a T2I-Adapter for it (lllyasviel/sd-controlnet-canny, TencentARC/t2iadapter_canny_sd15v2), and SDXL's
# (diffusers/controlnet-canny-sdxl-1.0, TencentARC/t2i-adapter-canny-sdxl-1.0).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "sample_size": 64,
}
SD15_CONTROLNET = {k: v for k, v in SD15_UNET.items() if k != "sample_size"} | {"_class_name": "ControlNetModel"}
SDXL_CONTROLNET_CONFIG = {
    k: v for k, v in SDXL_UNET.items() if k not in ("out_channels", "sample_size", "up_block_types")
} | {"_class_name": "ControlNetModel"}
SD15_ADAPTER = {"_class_name": "T2IAdapter", "adapter_type": "full_adapter", "channels": [320, 640, 1280, 1280]}
SDXL_ADAPTER_CONFIG = SD15_ADAPTER | {"adapter_type": "full_adapter_xl", "downscale_factor": 16}


def released_models(folder: Path) -> Path:
    """A models directory of the released families' configs: an SD 1.5 base, an SDXL base, an SDXL base with
    GLIGEN's gated layers, and each family's ControlNet and T2I-Adapter."""
    sd15_index = {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
    sd15_vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}
    sd15_scheduler = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000}
    bases = {
        "sd15": (sd15_index, SD15_UNET, sd15_vae, sd15_scheduler),
        "sdxl": (SDXL_INDEX, SDXL_UNET, SDXL_VAE, SDXL_SCHEDULER),
        "sdxl-gligen": (SDXL_INDEX, SDXL_UNET | {"attention_type": "gated"}, SDXL_VAE, SDXL_SCHEDULER),
    }
    for name, configs in bases.items():
        write_configs(folder / name, *configs)
        (folder / name / "tokenizer").symlink_to(ZOO_MODEL / "tokenizer", target_is_directory=True)
    controls = {
        "sd15-controlnet-canny": SD15_CONTROLNET,
        "sd15-t2i-adapter-canny": SD15_ADAPTER,
        "sdxl-controlnet-canny": SDXL_CONTROLNET_CONFIG,
        "sdxl-t2i-adapter-canny": SDXL_ADAPTER_CONFIG,
    }
    for name, config in controls.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    return folder


def test_released_control_models_fit_their_family_only(settings: Settings, tmp_path: Path) -> None:
    """On the released configs: each control model is listed with its family; one of the other family is a 422
    naming both families (nothing stored), GLIGEN grounding on an SDXL base is refused, and SDXL's ControlNet and
    T2I-Adapter are accepted on SDXL's base."""
    from api.main import create_app

    tenant_id, key = make_tenant(settings)
    auth = {"Authorization": f"Bearer {key}"}
    condition = b64(png_bytes(128, 128))  # canny resizes it to the job's size
    models_dir = released_models(tmp_path / "models")
    with TestClient(create_app(settings.model_copy(update={"models_dir": models_dir}))) as client:
        listed = {m["name"]: m["family"] for m in client.get("/v1/models", headers=auth).json()}
        assert listed == {
            "sd15": "sd1",
            "sdxl": "sdxl",
            "sdxl-gligen": "sdxl",
            "sd15-controlnet-canny": "sd1",
            "sd15-t2i-adapter-canny": "sd1",
            "sdxl-controlnet-canny": "sdxl",
            "sdxl-t2i-adapter-canny": "sdxl",
        }

        def post(base: str, **body: Any) -> Any:
            body = {"prompt": "a red circle", "model": base, "width": 512, "height": 512, **body}
            return client.post(T2I, json=body, headers=auth)

        for base, other in (("sdxl", "sd15"), ("sd15", "sdxl")):
            for kind in ("controlnet", "t2i-adapter"):
                name = f"{other}-{kind}-canny"
                response = post(base, controls=[{"model": name, "condition": condition, "preprocessor": "canny"}])
                assert response.status_code == 422, response.text
                (detail,) = response.json()["error"]["details"]
                assert detail["field"] == "controls[0].model"
                named = f"{name} ({kind}, family {listed[name]}) does not fit base model {base} (family {listed[base]})"
                assert detail["message"].startswith(named), detail
        grounding = [{"phrase": "a red circle", "box": [0, 0, 0.5, 0.5]}]
        refused = post("sdxl-gligen", grounding=grounding)
        assert refused.status_code == 422, refused.text
        assert "GLIGEN grounding on SDXL base models (sdxl-gligen) is not supported" in refused.text
        assert counts(settings, tenant_id) == (0, 0, 0)
        for base in ("sdxl", "sd15"):
            controls = [
                {"model": f"{base}-{kind}-canny", "condition": condition, "preprocessor": "canny"}
                for kind in ("controlnet", "t2i-adapter")
            ]
            created = post(base, controls=controls)
            assert created.status_code == 201, created.text
            client.post(f"/v1/jobs/{created.json()['id']}/cancel", headers=auth)
