"""The bundled zoo model and a tiny SD 2.x-shaped v-prediction model, each built once for the model tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models.common.components import Components
from tests.conftest import ZOO_MODEL
from tests.families import sd2_v_components, sdxl_components
from worker.runtime import DevicePolicy, load_components


@pytest.fixture(scope="session")
def components() -> Components:
    torch.set_num_threads(1)  # as the worker does (ATELIER_TORCH_THREADS)
    folder = Path(os.environ.get("ATELIER_TEST_MODELS_DIR", str(ZOO_MODEL.parent))) / ZOO_MODEL.name
    return load_components(folder, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))


@pytest.fixture(scope="session")
def sd2v() -> Components:
    """A tiny random SD 2.x-shaped model that predicts v (tests/families.py)."""
    torch.set_num_threads(1)
    return sd2_v_components()


@pytest.fixture(scope="module")
def sdxl() -> Components:
    """A tiny random SDXL-shaped model (tests/families.py)."""
    torch.set_num_threads(1)
    return sdxl_components()
