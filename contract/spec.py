"""What the service knows about one job kind: `MethodSpec`, and the typed capabilities a spec declares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

IMAGE_FIELD_MARK = "atelier-image"
IMAGE_LIST_FIELD_MARK = "atelier-image-list"

Queue = Literal["inference", "training"]
ModelCapability = Literal["unet", "text-to-image", "instruct-pix2pix", "cross-attention", "gligen"]
"""What a base model can do (`GET /v1/models`); a method `requires` some of them. `gligen`: its UNet has GLIGEN's
gated self-attention layers, so jobs on it take `grounding`."""

Family = Literal["sd1", "sd2", "sdxl", "custom"]
"""A base model's architecture (`GET /v1/models`): Stable Diffusion 1.x, 2.x, XL, or another UNet (the zoo's)."""
SD_FAMILIES: tuple[Family, ...] = ("sd1", "sd2", "custom")
"""The families with one text encoder and no added conditioning: every method runs on them."""
WITH_SDXL: tuple[Family, ...] = (*SD_FAMILIES, "sdxl")
"""Those and SDXL (two text encoders, added text-time conditioning): the methods that pass SDXL's conditioning."""

AdapterUse = Literal["install", "inputs", "none"]
"""What a job does with its `adapters`: `install` them on the base model while the method runs (most methods);
hand them to the method as `inputs["adapters"]`, installing nothing (a merge job reads them); or accept `none`
(a training starts from the base model; its request refuses them)."""


@dataclass(frozen=True)
class MethodSpec:
    """One job kind: its route, request schema and runner module, and what its runner needs from the service.

    The worker reads only these declarations to prepare a run: nothing is inferred from the runner module."""

    kind: str  # "sdedit"
    group: str  # "edits" -> POST /v1/edits/sdedit
    summary: str
    request: type[BaseModel]
    runner: str  # module in models/ exposing Params and run(...)
    queue: Queue = "inference"
    backbones: tuple[str, ...] = ("unet",)
    requires: tuple[ModelCapability, ...] = ()  # capabilities the base model must have
    families: tuple[Family, ...] = SD_FAMILIES
    """The base model families the method runs on; a job on a model of another family is a 422."""
    paper: str = ""
    adapters: AdapterUse = "install"
    resumable: bool = False
    """The runner's `run` takes `checkpoints=`: it saves its state every `checkpoint_every` steps, and a new
    attempt of the same job (its worker died) resumes from the last one."""
    class_images: bool = False
    """The runner exposes `class_image_requests(params)`: images the base model generates for the method (prior or
    regularisation images), which the worker generates once and keeps for every later job that asks the same."""
    same_size: tuple[tuple[str, str], ...] = ()
    """Pairs of image fields that must have the same size (checked when the job is created: a 422)."""
    control_size: tuple[str, str] | str | None = None
    """The method takes `controls` and `grounding` (its request is a `ControlledRequest`); where the size of the
    image it makes comes from, which a condition must match: the (width, height) params, or an image field."""

    def made_size(self, params: Mapping[str, Any], image_sizes: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
        """(width, height) of the image the job makes, from `control_size`: the params, or an image field's size
        in `image_sizes`."""
        if isinstance(self.control_size, tuple):
            return int(params[self.control_size[0]]), int(params[self.control_size[1]])
        if self.control_size is None:
            raise ValueError(f"{self.kind} takes no controls")
        return image_sizes[self.control_size]

    @property
    def path(self) -> str:
        return f"/v1/{self.group}/{self.kind}"

    def _marked(self, mark: str) -> tuple[str, ...]:
        return tuple(
            name
            for name, info in self.request.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("format") == mark
        )

    @property
    def image_fields(self) -> tuple[str, ...]:
        """Request fields that carry one image (a file id or base64)."""
        return self._marked(IMAGE_FIELD_MARK)

    @property
    def image_list_fields(self) -> tuple[str, ...]:
        """Request fields that carry a list of images."""
        return self._marked(IMAGE_LIST_FIELD_MARK)
