"""A job's spatial controls, from its row to the method's inputs: the control models (cached), the condition
images run through their preprocessors at the size of the image the job makes, and GLIGEN's grounding."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from diffusers import T2IAdapter
from PIL import Image

from contract.spec import MethodSpec
from models.control.adapter import AdapterControl
from models.control.controlnet import Control, condition_tensor
from models.control.gligen import Grounding
from models.control.preprocess import PreprocessParams, preprocess
from store.tables import Job
from worker.runtime import ModelCache


@dataclass
class JobControls:
    """What the method receives (`inputs["controls"]`, `["t2i_adapters"]`, `["grounding"]`), and each condition as
    the job used it, written beside its outputs as `control-{i}.png`."""

    inputs: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, Image.Image] = field(default_factory=dict)


def job_controls(
    job: Job,
    spec: MethodSpec,
    inputs: Mapping[str, Any],
    cache: ModelCache,
    load_image: Callable[[str, str], Image.Image],
) -> JobControls:
    """Load the job's controls; `load_image(name, file_id)` reads one of the tenant's files."""
    out = JobControls()
    if not job.controls and not job.grounding:
        return out
    sizes = {name: image.size for name, image in inputs.items() if isinstance(image, Image.Image)}
    width, height = spec.made_size(job.params, sizes)
    device, dtype = cache.policy.device, cache.policy.dtype
    controls, adapters = [], []
    for index, ref in enumerate(job.controls):
        name = f"controls[{index}]"
        image = load_image(f"{name}.condition", str(ref["condition"]))
        params = PreprocessParams(
            low_threshold=int(ref["low_threshold"]),
            high_threshold=int(ref["high_threshold"]),
            threshold=int(ref["threshold"]),
        )
        pixels = preprocess(str(ref["preprocessor"]), np.asarray(image.convert("RGB")), (width, height), params)
        condition = Image.fromarray(pixels)
        out.conditions[f"control-{index}"] = condition
        model = cache.control(str(ref["model"]))
        tensor = condition_tensor(condition, device, dtype)
        if isinstance(model, T2IAdapter):
            adapters.append(AdapterControl(model, tensor, float(ref["scale"])))
        else:
            controls.append(Control(model, tensor, float(ref["scale"]), float(ref["start"]), float(ref["end"])))
    out.inputs = {"controls": controls, "t2i_adapters": adapters}
    if job.grounding:
        boxes = job.grounding["boxes"]
        out.inputs["grounding"] = Grounding(
            phrases=[str(b["phrase"]) for b in boxes],
            boxes=[tuple(float(v) for v in b["box"]) for b in boxes],  # type: ignore[misc]
            fraction=float(job.grounding["fraction"]),
        )
    return out
