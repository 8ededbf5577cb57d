"""The method registry: one entry per job kind, the single source of truth.

Each module in `api/params/` declares its request schema and a `SPEC`. The routes, the OpenAPI
entries, `GET /v1/methods` and the worker's dispatch are all generated from these entries, so
adding a method is one file in `models/` plus one params module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel

IMAGE_FIELD_MARK = "atelier-image"
IMAGE_LIST_FIELD_MARK = "atelier-image-list"


@dataclass(frozen=True)
class MethodSpec:
    """What the service knows about one job kind."""

    kind: str  # "sdedit"
    group: str  # "edits" -> POST /v1/edits/sdedit
    summary: str
    request: type[BaseModel]
    runner: str  # module in models/ exposing Params and run(...)
    queue: Literal["inference", "training"] = "inference"
    backbones: tuple[str, ...] = ("unet",)
    requires: tuple[str, ...] = ()  # capabilities the base model must have
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

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


@lru_cache(maxsize=1)
def methods() -> dict[str, MethodSpec]:
    """Every registered method, by kind, discovered from the modules of `api.params`."""
    import api.params as package

    found: dict[str, MethodSpec] = {}
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        spec = getattr(module, "SPEC", None)
        if isinstance(spec, MethodSpec):
            if spec.kind in found:
                raise RuntimeError(f"method {spec.kind!r} is registered twice")
            found[spec.kind] = spec
    return found
