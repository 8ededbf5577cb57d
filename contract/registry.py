"""The method registry: one entry per job kind, the single source of truth.

Each module in `contract/params/` declares its request schema and a `SPEC`. The routes, the OpenAPI entries,
`GET /v1/methods` and the worker's dispatch are all generated from these entries, so adding a method is its
runner module in `models/` plus one params module here (docs/adding-a-method.md walks through it).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from contract.spec import MethodSpec


@lru_cache(maxsize=1)
def methods() -> dict[str, MethodSpec]:
    """Every registered method, by kind, discovered from the modules of `contract.params`."""
    import contract.params as package

    found: dict[str, MethodSpec] = {}
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        spec = getattr(module, "SPEC", None)
        if isinstance(spec, MethodSpec):
            if spec.kind in found:
                raise RuntimeError(f"method {spec.kind!r} is registered twice")
            found[spec.kind] = spec
    return found
