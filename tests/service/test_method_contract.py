"""Every method's two declarations agree: its request schema (the API) and its runner's `Params` (the model).

A method declares its parameters twice: the pydantic request in `contract/params/` (what clients may send, with
bounds) and the `Params` dataclass of its runner in `models/` (what `run` reads). The worker builds `Params` from
the job's params by name. This walks every registered spec, imports its runner as the worker does, and proves:

- the runner provides what the spec declares (`load_runner`: resumable, class images);
- names: every field of the request reaches `Params` except the job options (model, seed, adapters, callback,
  controls, grounding), the image fields (they arrive as `inputs`) and a training's adapter name; a `Params` field
  the request does not carry has a default (a runner-only knob);
- types: what the request accepts, `Params` is declared to take (an int where a float is taken is fine);
- defaults: where both have one they are equal (a JSON list is a tuple's equal; a request's `None`, "not
  given", matches an empty `Params` default). A field whose default follows the model's domain
  (`contract/domains.py`) is None in the request, which the API fills in from the job's model, and its `Params`
  default is the ShapesWorld one (a runner called in process on the zoo); no other request field is None with a
  `Params` default that is not empty;
- bounds: each `Params` default passes the request field's own constraints (ranges, lengths, patterns, choices),
  as does each request default (pydantic does not check defaults);
- the request's OpenAPI examples convert into `Params` with their values intact;
- the request refuses adapters exactly when the spec declares `adapters="none"`;
- the request takes controls exactly when the spec says where the made image's size comes from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from contract.domains import defaults as domain_defaults
from contract.params.common import ADAPTER_NAME_FIELD, ControlledRequest, JobRequest
from contract.registry import methods
from contract.spec import MethodSpec
from worker.runners import load_runner, method_params, runner_problems

SPECS = sorted(methods().values(), key=lambda spec: spec.kind)
EMPTY: tuple[Any, ...] = ("", (), [])


def kinds(annotation: Any) -> frozenset[str]:
    """The kinds of value an annotation admits: int, float, str, bool, none, map, any, and seq:<kind>."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return kinds(args[0])
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(kinds(arg) for arg in args))
    if origin is Literal:
        return frozenset(type(value).__name__ for value in args)
    if annotation is type(None) or annotation is None:
        return frozenset({"none"})
    if annotation is Any:
        return frozenset({"any"})
    if origin in (list, tuple, set, frozenset, Sequence) or annotation in (list, tuple):
        inner = frozenset().union(*(kinds(arg) for arg in args if arg is not Ellipsis)) or {"any"}
        return frozenset(f"seq:{kind}" for kind in inner)
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return frozenset({"map"})
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return frozenset({"map"})
    if annotation in (int, float, str, bool):
        return frozenset({annotation.__name__})
    raise AssertionError(f"no kind for {annotation!r}")


def takes(accepted: frozenset[str], kind: str) -> bool:
    """Whether a field declared with `accepted` kinds takes a value of `kind`."""
    if kind in accepted or "any" in accepted or (kind == "int" and "float" in accepted):
        return True
    if kind.startswith("seq:"):
        return takes(frozenset(k[4:] for k in accepted if k.startswith("seq:")), kind[4:])
    return False


def as_json(value: Any) -> Any:
    """A Python default as it travels in a job's JSON params (tuples are lists)."""
    if isinstance(value, tuple | list):
        return [as_json(item) for item in value]
    return value


def request_default(info: FieldInfo) -> Any:
    """The request field's default, or PydanticUndefined when it is required."""
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def runner_default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return PydanticUndefined


def examples(spec: MethodSpec) -> list[dict[str, Any]]:
    """The request's OpenAPI examples (every method has one: it is the Swagger UI's sample body)."""
    extra = spec.request.model_config.get("json_schema_extra")
    found = extra.get("examples") if isinstance(extra, dict) else None
    assert isinstance(found, list) and found, f"{spec.kind}: the request schema has no example"
    assert all(isinstance(example, dict) for example in found)
    return found  # type: ignore[return-value]


def service_fields(spec: MethodSpec) -> set[str]:
    """Request fields the service reads itself instead of passing them to the method."""
    options = {*JobRequest.model_fields, *ControlledRequest.model_fields}
    return {*options, *spec.image_fields, *spec.image_list_fields, ADAPTER_NAME_FIELD}


def disagreements(spec: MethodSpec, params_cls: type) -> list[str]:
    """Every way the request schema of `spec` and the runner's `Params` disagree (empty when they agree)."""
    found: list[str] = []
    request_fields = spec.request.model_fields
    runner_fields = {field.name: field for field in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    method_fields = {name: info for name, info in request_fields.items() if name not in service_fields(spec)}

    for name in sorted(set(method_fields) - set(runner_fields)):
        found.append(f"{name}: in the request, not in Params (the runner never sees it)")
    for name in sorted(set(runner_fields) & (set(spec.image_fields) | set(spec.image_list_fields))):
        found.append(f"{name}: an image field of the request is also a Params field (images arrive as inputs)")
    for name in sorted(set(runner_fields) - set(request_fields)):
        if runner_default(runner_fields[name]) is PydanticUndefined:
            found.append(f"{name}: required by Params, absent from the request")

    for name in sorted(set(method_fields) & set(runner_fields)):
        info, default = method_fields[name], runner_default(runner_fields[name])
        declared, accepted = kinds(hints[name]), kinds(info.annotation)
        wanted = request_default(info)
        by_domain = domain_defaults(spec.kind, "shapesworld")
        if name in by_domain:  # left out, the API fills it in; in process on the zoo, Params' default is used
            if wanted is not None:
                found.append(f"{name}: its default follows the model's domain, so the request's must be None")
            wanted = by_domain[name]
        not_given = wanted is None and default in EMPTY  # the request's None means "absent": the runner's empty
        for kind in sorted(accepted):
            if not takes(declared, kind) and not (kind == "none" and (not_given or name in by_domain)):
                found.append(f"{name}: the request accepts {kind}, Params declares {sorted(declared)}")
        if default is not PydanticUndefined and wanted is not PydanticUndefined and not not_given:
            if as_json(default) != as_json(wanted):
                found.append(f"{name}: default {wanted!r} in the request, {default!r} in Params")
        constrained: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
        checker: TypeAdapter[Any] = TypeAdapter(constrained)
        for origin, value in (("Params", default), ("request", wanted)):
            if value is PydanticUndefined or (origin == "Params" and not_given):
                continue
            try:
                checker.validate_python(as_json(value))
            except ValidationError as exc:
                found.append(
                    f"{name}: the {origin} default {value!r} breaks the request's bounds: {exc.errors()[0]['msg']}"
                )
    return found


@pytest.mark.parametrize("spec", SPECS, ids=[spec.kind for spec in SPECS])
def test_runner_provides_what_the_spec_declares(spec: MethodSpec) -> None:
    runner = load_runner(spec)
    assert dataclasses.is_dataclass(runner.Params)


@pytest.mark.parametrize("spec", SPECS, ids=[spec.kind for spec in SPECS])
def test_request_and_runner_params_agree(spec: MethodSpec) -> None:
    assert disagreements(spec, load_runner(spec).Params) == []


@pytest.mark.parametrize("spec", SPECS, ids=[spec.kind for spec in SPECS])
def test_examples_reach_the_runner_intact(spec: MethodSpec) -> None:
    runner = load_runner(spec)
    for example in examples(spec):
        values = spec.request.model_validate(example).method_params()  # type: ignore[attr-defined]
        params = method_params(runner, values)
        for name in set(example) - service_fields(spec):
            assert as_json(getattr(params, name)) == as_json(values[name]), (spec.kind, name)


@pytest.mark.parametrize("spec", SPECS, ids=[spec.kind for spec in SPECS])
def test_the_request_takes_adapters_as_the_spec_declares(spec: MethodSpec) -> None:
    """`adapters="none"`: the request refuses any; otherwise it takes them (a merge takes exactly two)."""
    example = examples(spec)[0]
    count = 2 if spec.adapters == "inputs" else 1
    refs = [{"id": f"adp_{index:024x}"} for index in range(count)]
    try:
        spec.request.model_validate({**example, "adapters": refs})
    except ValidationError as exc:
        assert spec.adapters == "none", exc
        assert [error["loc"] for error in exc.errors()] == [("adapters",)]
    else:
        assert spec.adapters != "none", f"{spec.kind} declares adapters='none' but its request takes them"


@pytest.mark.parametrize("spec", SPECS, ids=[spec.kind for spec in SPECS])
def test_a_method_takes_controls_exactly_when_its_spec_says_where_its_size_comes_from(spec: MethodSpec) -> None:
    """`control_size` names params or an image field of the request; only then does the request take controls."""
    controlled = issubclass(spec.request, ControlledRequest)
    assert controlled == (spec.control_size is not None), spec.kind
    if isinstance(spec.control_size, tuple):
        assert set(spec.control_size) <= set(spec.request.model_fields)
    elif spec.control_size is not None:
        assert spec.control_size in spec.image_fields


# The checks catch what they claim to: a request and a runner that disagree in each way.


@dataclasses.dataclass
class _Params:
    prompt: str
    steps: int = 25
    strength: float = 1.5
    mode: str = "fast"
    hidden: int = 1
    needed: int = 0


class _Request(JobRequest):
    prompt: str = Field(min_length=1)
    steps: int = Field(default=30, ge=1, le=200)
    strength: float = Field(default=0.5, gt=0.0, le=1.0)
    mode: Literal["slow", "exact"] = "slow"
    stray: bool = False
    needed: str = "x"


def _run(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError


def test_disagreements_are_found() -> None:
    spec = MethodSpec(kind="probe", group="edits", summary="", request=_Request, runner="probe")
    found = "\n".join(disagreements(spec, _Params))
    assert "stray: in the request, not in Params" in found
    assert "steps: default 30 in the request, 25 in Params" in found
    assert "strength: the Params default 1.5 breaks the request's bounds" in found
    assert "mode: the Params default 'fast' breaks the request's bounds" in found
    assert "needed: the request accepts str" in found
    assert "hidden" not in found  # a runner-only knob with a default


def test_a_runner_that_does_not_match_its_spec_is_refused() -> None:
    module = types.ModuleType("probe")
    module.Params = _Params  # type: ignore[attr-defined]
    module.run = _run  # type: ignore[attr-defined]
    spec = MethodSpec(kind="probe", group="edits", summary="", request=_Request, runner="probe", resumable=True)
    problems = runner_problems(spec, module)
    assert "run() takes no generator=" in problems
    assert any("declares resumable" in problem for problem in problems)
    module.class_image_requests = lambda params: {}  # type: ignore[attr-defined]
    assert any("does not declare class_images" in problem for problem in runner_problems(spec, module))
