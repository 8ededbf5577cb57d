"""The `custom-diffusion-merge` job: two Custom Diffusion adapters -> one, by the closed-form constrained least
squares of Kumari et al. (CVPR 2023, sec. 3.2, eq. 4-5); the maths is `custom_diffusion.merge`.

inputs["adapters"]: the two (`Adapter`, scale) pairs the worker resolves from the request's adapter ids (in
order; the scales are ignored: the merge keeps each concept as trained).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.common.components import Components, MethodOutput, OutputFile, ProgressCallback, no_progress
from models.personalization.captions import caption_corpus
from models.personalization.common import Adapter
from models.personalization.custom_diffusion import diffusers_files, merge


@dataclass(frozen=True)
class Params:
    regularization_captions: int = 200


def run(
    components: Components,
    params: Params,
    inputs: dict[str, object],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Merge inputs["adapters"] (two custom-diffusion adapters); returns the merged adapter."""
    # 1. Check inputs
    given = inputs.get("adapters")
    adapters = [item[0] if isinstance(item, tuple) else item for item in given] if isinstance(given, list) else []
    if len(adapters) != 2 or not all(isinstance(adapter, Adapter) for adapter in adapters):
        raise ValueError("adapters must be two custom-diffusion adapters")
    if params.regularization_captions < 1:
        raise ValueError(f"regularization_captions must be at least 1, got {params.regularization_captions}")
    started = time.perf_counter()

    # 2. Merge (eq. 4-5) over seeded regularisation captions
    first, second = adapters
    assert isinstance(first, Adapter) and isinstance(second, Adapter)
    merged = merge(components, first, second, caption_corpus(components.domain, params.regularization_captions))
    callback(1, 1)
    files = {name: OutputFile(data, "application/octet-stream") for name, data in diffusers_files(merged).items()}
    metrics: dict[str, float | int | str] = {
        "seconds": round(time.perf_counter() - started, 3),
        "constraint_rows": int(merged.metadata["constraint_rows"]),
    }
    return MethodOutput(adapter=merged, files=files, metrics=metrics, result={"tokens": merged.tokens})
