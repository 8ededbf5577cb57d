"""Controls and grounding at the API: `GET /v1/models` lists control models; every bad control or grounding input is
a 422 naming the field, and leaves no job, no file and no stored bytes behind."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from store.settings import Settings
from tests.api.test_bad_input import counts, upload
from tests.control_models import ADAPTER, CONTROLNET, GLIGEN, OTHER_FAMILY
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
