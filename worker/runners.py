"""A method's runner module as the worker calls it, and loading the one a spec names.

A runner module (`MethodSpec.runner`, in `models/`) provides `Params`, a dataclass the job's params fill, and
`run(components, params, inputs, *, generator, callback)`. What more it provides is declared by its spec, never
discovered at run time: `resumable` (its `run` also takes `checkpoints=`) and `class_images` (it has
`class_image_requests(params)`). `load_runner` checks the module against its spec once, so a mismatch fails
loudly (and the method-contract test fails for every method before any job runs).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Mapping
from functools import cache
from types import ModuleType
from typing import Any, Protocol, cast

import torch

from contract.spec import MethodSpec
from models.common.components import Components, MethodOutput, ProgressCallback
from models.personalization.common import Checkpoints


class Runner(Protocol):
    """What every runner module provides."""

    Params: type[Any]

    def run(
        self,
        components: Components,
        params: Any,
        inputs: dict[str, Any],
        *,
        generator: torch.Generator,
        callback: ProgressCallback = ...,
    ) -> MethodOutput: ...


class ResumableRunner(Runner, Protocol):
    """A runner whose spec is `resumable`: it saves checkpoints and resumes from the last one."""

    def run(
        self,
        components: Components,
        params: Any,
        inputs: dict[str, Any],
        *,
        generator: torch.Generator,
        callback: ProgressCallback = ...,
        checkpoints: Checkpoints | None = None,
    ) -> MethodOutput: ...


class ClassImageRunner(Runner, Protocol):
    """A runner whose spec declares `class_images`: base-model images it needs, by input name (each request has
    the prompt, count, steps and guidance the worker generates them with)."""

    def class_image_requests(self, params: Any) -> Mapping[str, Any]: ...


def runner_problems(spec: MethodSpec, module: ModuleType) -> list[str]:
    """How `module` falls short of what `spec` declares (empty when it provides exactly that)."""
    params = getattr(module, "Params", None)
    problems = [] if isinstance(params, type) and dataclasses.is_dataclass(params) else ["no Params dataclass"]
    run = getattr(module, "run", None)
    if not callable(run):
        return [*problems, "no run()"]
    accepted = inspect.signature(run).parameters
    problems += [f"run() takes no {name}=" for name in ("generator", "callback") if name not in accepted]
    declared = {"resumable": spec.resumable, "class_images": spec.class_images}
    provided = {
        "resumable": "checkpoints" in accepted,
        "class_images": callable(getattr(module, "class_image_requests", None)),
    }
    what = {"resumable": "run() taking checkpoints=", "class_images": "class_image_requests(params)"}
    for name, flag in declared.items():
        if flag and not provided[name]:
            problems.append(f"the spec declares {name} but the module has no {what[name]}")
        elif provided[name] and not flag:
            problems.append(f"the module has {what[name]} but the spec does not declare {name}: it would go unused")
    return problems


@cache
def load_runner(spec: MethodSpec) -> Runner:
    """The runner module of `spec`, checked against the spec (raises RuntimeError naming what is missing)."""
    module = importlib.import_module(spec.runner)
    problems = runner_problems(spec, module)
    if problems:
        raise RuntimeError(f"{spec.runner} does not match the {spec.kind!r} spec: {'; '.join(problems)}")
    return cast(Runner, module)


def method_params(runner: Runner, values: Mapping[str, Any]) -> Any:
    """The runner's `Params` from the job's params: its fields only (the images are inputs; a training's `name`
    names its adapter in the registry)."""
    names = {f.name for f in dataclasses.fields(runner.Params)}
    return runner.Params(**{key: value for key, value in values.items() if key in names})
