"""A job's options: what it runs with that is not the method's own parameters (the base model, the seed, the
adapters, the callback URL). Resolved once here, when the job is created, into the job row's own fields.

Every method accepts them (they are `JobRequest`'s fields), none of them reaches the method's `Params`, and the
worker reads them from the row. A new option (spatial controls, grounding boxes) is one more `JobRequest` field,
one more column of `jobs` (with its migration), resolved here, and read by the worker's `_prepare`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from api.catalog import control_misfit, find_control, find_model, model_for
from api.checkpoint_catalog import refusal
from api.errors import invalid, not_found
from api.schemas import ModelOut
from api.webhook_targets import check_callback_url
from contract.domains import Domain
from contract.params.common import AdapterRef, ControlledRequest, JobRequest
from contract.spec import MethodSpec
from store.adapters import get_adapter
from store.settings import Settings


@dataclass(frozen=True)
class JobOptions:
    """The resolved options, as the job row stores them."""

    model: str
    seed: int
    adapters: list[dict[str, Any]] = field(default_factory=list)  # [{"id", "scale", "type"}], in request order
    callback_url: str | None = None
    controls: list[dict[str, Any]] = field(default_factory=list)  # ControlRef dumps; conditions still as sent
    grounding: dict[str, Any] | None = None  # {"boxes": [{"phrase", "box"}], "fraction"}
    sample_size: int | None = None  # the model's native image size (not stored: it fills the sizes left out)
    domain: Domain = "general"  # what the model was trained on (not stored: it fills the defaults that follow it)


def resolve_model(spec: MethodSpec, name: str | None, settings: Settings) -> ModelOut:
    """The base model must exist and be able to run this method (unnamed: the default, or one that can)."""
    model_name = name or model_for(settings.models_dir, settings.default_model, spec.kind)
    refused = refusal(settings.models_dir, model_name)
    if refused is not None:
        raise invalid("model", refused)
    model = find_model(settings.models_dir, model_name, settings.default_model)
    if model is None:
        raise not_found("model", model_name)
    if model.family not in spec.families:
        raise invalid(
            "model",
            f"{model_name} is a {model.family} model; {spec.kind} runs on {', '.join(spec.families)} models only "
            f"(GET /v1/models lists each model's methods)",
        )
    missing = [c for c in spec.requires if c not in model.capabilities]
    if missing:
        raise invalid("model", f"{model_name} lacks {', '.join(missing)} needed by {spec.kind}")
    return model


def resolve_adapters(session: Session, tenant_id: str, refs: list[AdapterRef], model_name: str) -> list[dict[str, Any]]:
    """Each adapter must be the tenant's and trained for `model_name`; returns them as the job stores them."""
    resolved = []
    tokens: dict[str, int] = {}  # token -> the index of the adapter that brings it
    for index, ref in enumerate(refs):
        row = get_adapter(session, tenant_id, ref.id)
        if row is None:
            raise invalid(f"adapters[{index}].id", f"adapter {ref.id!r} not found")
        for token in row.tokens or []:
            if token in tokens:
                raise invalid(
                    f"adapters[{index}].id",
                    f"adapter {ref.id!r} brings token {token!r}, as adapters[{tokens[token]}] does: "
                    "one token can mean one concept per job",
                )
            tokens[token] = index
        if row.base_model != model_name:
            raise invalid(
                f"adapters[{index}].id",
                f"adapter {ref.id!r} was trained for base model {row.base_model!r}, this job runs on {model_name!r}",
            )
        resolved.append({"id": row.id, "scale": ref.scale, "type": row.type})
    return resolved


def resolve_controls(request: JobRequest, model_name: str, settings: Settings) -> list[dict[str, Any]]:
    """Each control model must exist and fit the job's base model (its family, then its structure: SDXL's control
    models on SDXL bases only, and only they there); a T2I-Adapter takes no step range."""
    if not isinstance(request, ControlledRequest):
        return []
    base = find_model(settings.models_dir, model_name, settings.default_model)
    resolved = []
    for index, ref in enumerate(request.controls):
        name = f"controls[{index}].model"
        control = find_control(settings.models_dir, ref.model)
        if control is None:
            raise invalid(name, f"control model {ref.model!r} not found (GET /v1/models lists them)")
        misfit = control_misfit(settings.models_dir, ref.model, model_name)
        if misfit is not None:
            family = base.family if base is not None else "unknown"
            raise invalid(
                name,
                f"{ref.model} ({control.kind}, family {control.family}) does not fit base model {model_name} "
                f"(family {family}): {misfit}",
            )
        if control.kind == "t2i-adapter" and (ref.start, ref.end) != (0.0, 1.0):
            raise invalid(
                f"controls[{index}].start", "a T2I-Adapter acts on every step: start and end are ControlNets'"
            )
        resolved.append(ref.model_dump(mode="json"))
    return resolved


def resolve_grounding(request: JobRequest, model_name: str, settings: Settings) -> dict[str, Any] | None:
    """Grounding needs a base model with GLIGEN's gated layers."""
    if not isinstance(request, ControlledRequest) or not request.grounding:
        return None
    base = find_model(settings.models_dir, model_name, settings.default_model)
    if base is None or "gligen" not in base.capabilities:
        raise invalid(
            "grounding", f"base model {model_name} has no GLIGEN layers (capability `gligen` in GET /v1/models)"
        )
    if base.family == "sdxl":  # GLIGEN's grounding tokens are one text encoder's; SDXL cross-attends to two
        raise invalid("grounding", f"GLIGEN grounding on SDXL base models ({model_name}) is not supported")
    return {
        "boxes": [box.model_dump(mode="json") for box in request.grounding],
        "fraction": request.grounding_fraction,
    }


def resolve_options(
    spec: MethodSpec, request: JobRequest, tenant_id: str, session: Session, settings: Settings
) -> JobOptions:
    """The request's job options checked and resolved (a 422 or 404 names the field at fault)."""
    found = resolve_model(spec, request.model, settings)
    model = found.name
    check_callback_url(request.callback_url, settings)
    return JobOptions(
        model=model,
        sample_size=found.sample_size,
        domain=found.domain or "general",
        seed=request.seed,
        adapters=resolve_adapters(session, tenant_id, request.adapters, model),
        callback_url=str(request.callback_url) if request.callback_url else None,
        controls=resolve_controls(request, model, settings),
        grounding=resolve_grounding(request, model, settings),
    )
