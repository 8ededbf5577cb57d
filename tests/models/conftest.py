"""The bundled zoo model, loaded once for the model tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models.common.components import Components
from tests.conftest import ZOO_MODEL
from worker.runtime import DevicePolicy, load_components


@pytest.fixture(scope="session")
def components() -> Components:
    torch.set_num_threads(1)  # as the worker does (ATELIER_TORCH_THREADS)
    folder = Path(os.environ.get("ATELIER_TEST_MODELS_DIR", str(ZOO_MODEL.parent))) / ZOO_MODEL.name
    return load_components(folder, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))
