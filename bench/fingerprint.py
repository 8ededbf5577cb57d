"""`python -m bench.fingerprint --out FILE.json`: a SHA-256 of everything every method produces.

Each registered method runs once, with fixed small inputs (ShapesWorld images, few steps, fixed seeds), on the
bundled zoo models, through the service's own path: the request is posted to the API in-process (validation,
image resolution, the job row) and the job is run by the worker's `execute_job` in this process. Recorded per
job: the bytes of every output file, the result JSON, the job's view (`GET /v1/jobs/{id}` without ids and
timings) and, for a training job, the adapter file and its registry view. Run it before and after a refactor
and diff the two files: a change that keeps behaviour keeps every hash.

Random ids (`file_…`, `adp_…`, `job_…`) are replaced by their order of appearance, timing metrics (keys
naming seconds) are left out, and a safetensors file is hashed with its header's keys sorted (see `file_hash`),
so two runs of the same code give the same file. Runs on one CPU thread in a
few minutes, in a temporary folder (SQLite, the filesystem broker, local artifacts).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ID = re.compile(r"^(file|adp|job)_[0-9a-f]{24}$")
VIEW_KEYS = ("kind", "model", "state", "params", "progress", "attempts", "error", "result", "metrics")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Normalizer:
    """Replaces random ids by `<prefix:n>` in order of first appearance and drops timing keys."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: self(item) for key, item in value.items() if "second" not in key}
        if isinstance(value, list):
            return [self(item) for item in value]
        if isinstance(value, str) and ID.match(value):
            prefix = value.split("_")[0]
            return self.seen.setdefault(value, f"<{prefix}:{len(self.seen)}>")
        return value


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def file_hash(data: bytes) -> str:
    """SHA-256 of a file; for a safetensors file, of its header with sorted keys and its tensor bytes.

    The safetensors writer keeps `__metadata__` in a hash map, so the same tensors and metadata come out
    with their metadata in a different order in each process; the tensor layout itself is fixed."""
    if len(data) >= 8:
        size = int.from_bytes(data[:8], "little")
        if 8 + size <= len(data) and data[8:9] == b"{":
            try:
                header = json.loads(data[8 : 8 + size])
            except ValueError:
                header = None
            if isinstance(header, dict):
                return "safetensors:" + sha256(canonical(header) + data[8 + size :])
    return sha256(data)


def png(pixels: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def scene_png(*objects: tuple[str, str, str, str], background: str = "light") -> bytes:
    from models.shapes.world import Scene, ShapeObject, render

    return png(render(Scene(objects=tuple(ShapeObject(*o) for o in objects), background=background)).image)


def _blank(size: int) -> Any:
    import numpy as np

    return np.full((size, size, 3), 255, dtype=np.uint8)


def mask_png() -> bytes:
    import numpy as np

    mask = np.zeros((64, 64, 3), dtype=np.uint8)
    mask[8:40, 8:40] = 255
    return png(mask)


class Session:
    """The API in-process plus the worker's `execute_job`, on a fresh database in `folder`."""

    def __init__(self, folder: Path) -> None:
        os.environ.update(
            {
                "DATABASE_URL": f"sqlite:///{folder / 'atelier.db'}",
                "CELERY_BROKER_URL": "filesystem://",
                "ATELIER_BROKER_DIR": str(folder / "broker"),
                "ATELIER_ARTIFACTS_DIR": str(folder / "artifacts"),
                "ATELIER_MODELS_DIR": str(ROOT / "zoo"),
                "ATELIER_TORCH_THREADS": "1",
                "ATELIER_JOB_SOFT_TIME_LIMIT": "3600",
            }
        )
        import torch
        from fastapi.testclient import TestClient

        from api.main import create_app
        from store.artifacts import artifact_store
        from store.db import session_factory, session_scope
        from store.migrate import upgrade
        from store.settings import get_settings
        from store.tenants import create_key, create_tenant
        from worker.execution import WorkerContext
        from worker.runtime import DevicePolicy, ModelCache

        torch.set_num_threads(1)
        get_settings.cache_clear()
        settings = get_settings()
        upgrade(settings.database_url)
        with session_scope(settings.database_url) as session:
            tenant = create_tenant(session, "fingerprint")
            _, key = create_key(session, tenant.id)
        self.client = TestClient(create_app(settings), raise_server_exceptions=True)
        self.client.headers["Authorization"] = f"Bearer {key}"
        self.ctx = WorkerContext(
            settings=settings,
            sessions=session_factory(settings.database_url),
            artifacts=artifact_store(settings),
            cache=ModelCache(settings.models_dir, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa")),
            owner="fingerprint",
        )
        self.normalize = Normalizer()

    def upload(self, data: bytes) -> str:
        response = self.client.post("/v1/files", files={"file": ("image.png", data, "image/png")})
        response.raise_for_status()
        return str(response.json()["id"])

    def reject(self, route: str, body: dict[str, Any]) -> str:
        """Post a request the API must refuse; returns the hash of its status and error body."""
        response = self.client.post(route, json=body)
        if response.status_code < 400:
            raise RuntimeError(f"{route}: accepted {body}")
        return sha256(canonical([response.status_code, self.normalize(response.json())]))

    def run(self, route: str, body: dict[str, Any], expect: str = "succeeded") -> dict[str, Any]:
        """Post the job, run it here, and return the fingerprint of what it produced."""
        from worker.execution import execute_job

        response = self.client.post(route, json=body)
        if response.status_code != 201:
            raise RuntimeError(f"{route}: {response.status_code} {response.text}")
        job_id = response.json()["id"]
        started = time.perf_counter()
        outcome = execute_job(self.ctx, job_id)
        seconds = time.perf_counter() - started
        job = self.client.get(f"/v1/jobs/{job_id}").json()
        if outcome != expect:
            raise RuntimeError(f"{route}: {outcome} {job['error']}")
        found: dict[str, Any] = {
            "outputs": [file_hash(self.client.get(o["url"]).content) for o in job["outputs"]],
            "result": sha256(canonical(self.normalize(job["result"]))),
            "view": sha256(canonical(self.normalize({key: job[key] for key in VIEW_KEYS}))),
        }
        adapter_id = (job["result"] or {}).get("adapter_id")
        if adapter_id:
            view = self.client.get(f"/v1/adapters/{adapter_id}").json()
            found["adapter_file"] = file_hash(self.client.get(view["download_url"]).content)
            kept = {key: view[key] for key in ("name", "type", "tokens", "base_model", "training", "metrics")}
            kept["files"] = [{k: v for k, v in f.items() if k != "sha256"} for f in view["files"]]
            found["adapter_view"] = sha256(canonical(self.normalize(kept)))
            found["adapter_id"] = adapter_id
        print(f"{route:45s} {seconds:6.1f} s", file=sys.stderr, flush=True)
        return found


def concept_images(session: Session, shape: str, color: str) -> list[str]:
    cells = ("center", "top left", "bottom right")
    return [session.upload(scene_png((shape, color, "large", cell))) for cell in cells]


def fingerprint() -> dict[str, Any]:
    """The fingerprint of this checkout, computed in a temporary folder removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="atelier-fingerprint-"))
    try:
        return _fingerprint(Session(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _fingerprint(session: Session) -> dict[str, Any]:
    """Every method at least once, some with their defaults (two Custom Diffusion trainings feed the merge; a
    LoRA, a textual inversion and a Custom Diffusion adapter feed jobs with `adapters`), one job that fails in
    the worker, and requests the API must refuse."""
    image = session.upload(scene_png(("circle", "red", "large", "center")))
    inline = "data:image/png;base64," + base64.b64encode(scene_png(("square", "blue", "small", "top left"))).decode()
    mask = session.upload(mask_png())
    circles = concept_images(session, "circle", "red")
    squares = concept_images(session, "square", "blue")
    train = {"steps": 3, "batch_size": 2, "checkpoint_every": 2, "seed": 3}
    jobs: dict[str, tuple[str, dict[str, Any]]] = {
        "text-to-image": ("/v1/generations/text-to-image", {"prompt": "a large red circle", "steps": 4, "seed": 1}),
        "text-to-image-2": (
            "/v1/generations/text-to-image",
            {"prompt": "a small blue square at the top left", "steps": 3, "num_images": 2, "seed": 2},
        ),
        "sdedit": ("/v1/edits/sdedit", {"image": image, "prompt": "a large blue circle", "steps": 4, "seed": 1}),
        "sdedit-inline": ("/v1/edits/sdedit", {"image": inline, "prompt": "a small red square", "steps": 4}),
        "ddim-inversion": ("/v1/edits/ddim-inversion", {"image": image, "prompt": "a large red circle", "steps": 4}),
        "ddib": (
            "/v1/edits/ddib",
            {"image": image, "source_prompt": "a red circle", "target_prompt": "a blue circle", "steps": 4},
        ),
        "diffedit": (
            "/v1/edits/diffedit",
            {"image": image, "query_prompt": "a blue circle", "steps": 4, "n_mask_samples": 2, "seed": 4},
        ),
        "region-edit": (
            "/v1/edits/region-edit",
            {"image": image, "mask": mask, "prompt": "a green square", "steps": 4, "seed": 5},
        ),
        "prompt-to-prompt": (
            "/v1/edits/prompt-to-prompt",
            {"source_prompt": "a large red circle", "target_prompt": "a large blue circle", "steps": 4, "seed": 6},
        ),
        "prompt-to-prompt-real": (
            "/v1/edits/prompt-to-prompt",
            {
                "image": image,
                "source_prompt": "a large red circle",
                "target_prompt": "a large red circle",
                "mode": "reweight",
                "reweight_token": "red",
                "reweight_factor": 2.0,
                "local_blend_words": ["circle"],
                "null_text_steps": 2,
                "steps": 3,
            },
        ),
        "instruct-pix2pix": (
            "/v1/edits/instruct-pix2pix",
            {"image": image, "instruction": "make the circle blue", "steps": 4, "seed": 7},
        ),
        "imagic": (
            "/v1/edits/imagic",
            {
                "image": image,
                "target_prompt": "a large blue circle",
                "etas": [0.5, 1.0],
                "embedding_steps": 2,
                "finetune_steps": 2,
                "steps": 3,
            },
        ),
        "diffusion-classifier": (
            "/v1/classifications/diffusion-classifier",
            {
                "images": [image, inline],
                "class_names": ["circle", "square", "triangle"],
                "template": "a large red {}",
                "samples_per_stage": [2, 3],
                "keep_per_stage": [2],
                "seed": 8,
            },
        ),
        "synthetic": (
            "/v1/datasets/synthetic",
            {
                "classes": [
                    {"label": "red", "prompt": "a large red circle", "count": 2},
                    {"label": "blue", "prompt": "a large blue circle", "count": 1},
                ],
                "steps": 3,
                "batch_size": 2,
                "pseudo_label": True,
                "pseudo_label_samples_per_stage": [2, 2],
                "pseudo_label_keep_per_stage": [1],
            },
        ),
        "lora": ("/v1/trainings/lora", {"images": circles, "token": "<l1>", "class_word": "circle", **train}),
        "textual-inversion": (
            "/v1/trainings/textual-inversion",
            {"images": squares, "token": "<t1>", "init_word": "square", "num_vectors": 2, **train},
        ),
        "dreambooth": (
            "/v1/trainings/dreambooth",
            {
                "images": circles,
                "token": "<d1>",
                "class_word": "circle",
                "num_class_images": 2,
                "class_steps": 2,
                **train,
            },
        ),
        "custom-diffusion": (
            "/v1/trainings/custom-diffusion",
            {
                "images": circles,
                "token": "<c1>",
                "class_word": "circle",
                "num_class_images": 2,
                "class_steps": 2,
                **train,
            },
        ),
        "custom-diffusion-2": (
            "/v1/trainings/custom-diffusion",
            {"images": squares, "token": "<c2>", "class_word": "square", "regularization": False, **train},
        ),
        "perfusion": (
            "/v1/trainings/perfusion",
            {"images": squares, "token": "<p1>", "class_word": "square", **train},
        ),
    }
    jobs.update(
        {  # the request defaults, where they are cheap enough
            "text-to-image-defaults": ("/v1/generations/text-to-image", {"prompt": "a large green triangle"}),
            "sdedit-defaults": ("/v1/edits/sdedit", {"image": image, "prompt": "a large blue circle"}),
            "ddib-defaults": ("/v1/edits/ddib", {"image": image, "source_prompt": "red", "target_prompt": "blue"}),
            "diffedit-defaults": ("/v1/edits/diffedit", {"image": image, "query_prompt": "a blue circle"}),
            "region-edit-defaults": ("/v1/edits/region-edit", {"image": image, "mask": mask, "prompt": "a square"}),
            "prompt-to-prompt-defaults": (
                "/v1/edits/prompt-to-prompt",
                {"source_prompt": "a red circle", "target_prompt": "a red square"},
            ),
            "lora-20": ("/v1/trainings/lora", {"images": squares, "token": "<l2>", "steps": 20, "flip": True}),
        }
    )
    found: dict[str, Any] = {}
    for name, (route, body) in jobs.items():
        found[name] = session.run(route, body)
    black = session.upload(png(_blank(64) * 0))
    found["region-edit-black-mask"] = session.run(
        "/v1/edits/region-edit", {"image": image, "mask": black, "prompt": "a square", "steps": 2}, expect="failed"
    )
    adapter = {name: found[name]["adapter_id"] for name in ("lora", "textual-inversion", "custom-diffusion")}
    later: dict[str, tuple[str, dict[str, Any]]] = {
        "custom-diffusion-merge": (
            "/v1/trainings/custom-diffusion-merge",
            {
                "adapters": [{"id": adapter["custom-diffusion"]}, {"id": found["custom-diffusion-2"]["adapter_id"]}],
                "regularization_captions": 8,
            },
        ),
        "text-to-image-adapters": (
            "/v1/generations/text-to-image",
            {
                "prompt": "a <l1> circle and a <t1>",
                "steps": 4,
                "seed": 9,
                "adapters": [{"id": adapter["lora"], "scale": 0.8}, {"id": adapter["textual-inversion"]}],
            },
        ),
        "sdedit-adapter": (
            "/v1/edits/sdedit",
            {"image": image, "prompt": "a <c1> circle", "steps": 4, "adapters": [{"id": adapter["custom-diffusion"]}]},
        ),
    }
    for name, (route, body) in later.items():
        found[name] = session.run(route, body)
    small = session.upload(png(_blank(32)))
    rejections = {
        "training-with-adapters": session.reject(
            "/v1/trainings/lora", {"images": circles, "token": "<x>", "adapters": [{"id": adapter["lora"]}]}
        ),
        "unknown-adapter": session.reject(
            "/v1/generations/text-to-image", {"prompt": "a", "adapters": [{"id": "adp_" + "0" * 24}]}
        ),
        "duplicate-adapter": session.reject(
            "/v1/generations/text-to-image", {"prompt": "a", "adapters": [{"id": adapter["lora"]}] * 2}
        ),
        "merge-same-adapter": session.reject(
            "/v1/trainings/custom-diffusion-merge", {"adapters": [{"id": adapter["custom-diffusion"]}] * 2}
        ),
        "mask-size": session.reject("/v1/edits/region-edit", {"image": image, "mask": small, "prompt": "a square"}),
        "unknown-file": session.reject("/v1/edits/sdedit", {"image": "file_" + "0" * 24, "prompt": "a"}),
        "bad-base64": session.reject("/v1/edits/sdedit", {"image": "bm90IGFuIGltYWdl", "prompt": "a"}),
        "unknown-model": session.reject("/v1/generations/text-to-image", {"prompt": "a", "model": "nope"}),
        "model-lacks-capability": session.reject(
            "/v1/edits/instruct-pix2pix", {"image": image, "instruction": "a", "model": "shapes-sd-tiny"}
        ),
        "extra-field": session.reject("/v1/generations/text-to-image", {"prompt": "a", "colour": "red"}),
    }
    for entry in found.values():
        entry.pop("adapter_id", None)
    methods = sorted(m["kind"] for m in session.client.get("/v1/methods").json())
    covered = sorted({route.rsplit("/", 1)[1] for route, _ in [*jobs.values(), *later.values()]})
    if covered != methods:
        raise RuntimeError(f"methods without a job: {sorted(set(methods) - set(covered))}")
    return {"methods": methods, "jobs": found, "rejections": rejections}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Where to write the fingerprint JSON.")
    args = parser.parse_args()
    started = time.perf_counter()
    result = fingerprint()
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    elapsed = time.perf_counter() - started
    print(f"{len(result['jobs'])} jobs, {len(result['methods'])} methods, {elapsed:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
