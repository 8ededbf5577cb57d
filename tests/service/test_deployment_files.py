"""docker-compose.yml and the Dockerfile, read as files (no docker here): the model folder every service mounts,
ATELIER_MODELS_DIR, and the API image's package filter keeping what the API imports."""

from __future__ import annotations

import ast
import re
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import yaml

from store.settings import ROOT

SERVICES = ("api", "worker-inference", "worker-training")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def stage(name: str) -> str:
    """The Dockerfile's lines of one build stage (`FROM ... AS name` up to the next FROM)."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, name
    return match.group(1)


def models_dir_env(text: str) -> str:
    match = re.search(r"^ENV .*\bATELIER_MODELS_DIR=(\S+)", text, re.MULTILINE)
    assert match, text
    return match.group(1)


def test_every_service_mounts_the_zoo_where_atelier_models_dir_points() -> None:
    services = compose()["services"]
    for name in SERVICES:
        service = services[name]
        models_dir = service["environment"]["ATELIER_MODELS_DIR"]
        mounts = [volume.split(":") for volume in service["volumes"]]
        sources = [mount[0] for mount in mounts if mount[1] == models_dir]
        assert sources == ["./zoo"], (name, service["volumes"])  # ./models is the Python package, not models
        assert [mount[2:] for mount in mounts if mount[1] == models_dir] == [["ro"]], name
    assert (ROOT / "zoo" / "shapes-sd-tiny" / "model_index.json").is_file()
    assert services["api"]["environment"]["ATELIER_DEFAULT_MODEL"].endswith("shapes-sd-tiny}")


def test_the_images_look_for_models_where_compose_mounts_them() -> None:
    mounted = {compose()["services"][name]["environment"]["ATELIER_MODELS_DIR"] for name in SERVICES}
    assert mounted == {models_dir_env(stage("api"))} == {models_dir_env(stage("worker"))}


def api_requirements() -> set[str]:
    """The distributions the API image installs: requirements.lock through the Dockerfile's own grep filter."""
    match = re.search(r"grep -viE '([^']+)' requirements\.lock > requirements\.api", stage("api"))
    assert match, "the API stage filters requirements.lock with grep -viE '...'"
    dropped = re.compile(match.group(1), re.IGNORECASE)
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return {normal(line.split("==")[0]) for line in lines if "==" in line and not dropped.search(line)}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(files: list[Path]) -> set[str]:
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_the_api_image_keeps_safetensors_and_numpy_and_drops_torch() -> None:
    kept = api_requirements()
    assert {"safetensors", "numpy"} <= kept  # api/adapter_files.py checks imported adapters with them
    assert not {"torch", "diffusers", "transformers", "peft"} & kept


def test_the_api_image_installs_every_package_its_code_imports() -> None:
    """What the API stage copies (api, contract, store, worker/celery_app.py) imports nothing the filter drops."""
    copied = [*(ROOT / "api").rglob("*.py"), *(ROOT / "contract").rglob("*.py"), *(ROOT / "store").rglob("*.py")]
    copied += [ROOT / "worker" / "__init__.py", ROOT / "worker" / "celery_app.py"]
    own = {"api", "contract", "store", "worker", "models", "tests"}
    distributions = packages_distributions()
    kept = api_requirements()
    missing = {}
    for module in imported_modules(copied) - own:
        names = {normal(name) for name in distributions.get(module, [])}
        if names and not names & kept:  # no distribution: the standard library
            missing[module] = names
    assert not missing, missing


def test_the_gpu_image_installs_a_pinned_xformers_and_the_lock_does_not() -> None:
    """ATELIER_ATTENTION=xformers needs xformers on the GPU worker; the lock the tests and CPU installs use stays
    without it, and the image installs it without dependencies, after torch, so that it cannot change torch."""
    worker = stage("worker")
    installs = re.findall(r"pip install [^\n]*\bxformers==(\d[\w.]*)", worker)
    assert len(installs) == 1, worker
    assert re.search(r"pip install --no-cache-dir --no-deps xformers==", worker)
    assert worker.index("xformers==") > worker.index("torch==")
    lock = (ROOT / "requirements.lock").read_text().lower()
    assert "xformers" not in lock
    assert "xformers" not in stage("api")
