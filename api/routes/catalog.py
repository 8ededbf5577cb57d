"""What this server can do: its methods and its base models."""

from __future__ import annotations

from fastapi import APIRouter

from api.catalog import list_models
from api.deps import SettingsDep, TenantDep
from api.errors import error_responses
from api.schemas import MethodOut, ModelOut
from contract.registry import methods

router = APIRouter(prefix="/v1", tags=["catalog"], responses=error_responses(401))


@router.get("/methods", response_model=list[MethodOut])
def get_methods(_: TenantDep) -> list[MethodOut]:
    """Every job kind with its route, queue, backbones and parameter schema."""
    return [
        MethodOut(
            kind=spec.kind,
            route=spec.path,
            summary=spec.summary,
            queue=spec.queue,
            backbones=list(spec.backbones),
            requires=list(spec.requires),
            families=list(spec.families),
            paper=spec.paper,
            image_fields=list(spec.image_fields),
            image_list_fields=list(spec.image_list_fields),
            parameters=spec.request.model_json_schema(),
        )
        for spec in methods().values()
    ]


@router.get("/models", response_model=list[ModelOut])
def get_models(_: TenantDep, settings: SettingsDep) -> list[ModelOut]:
    """Base models installed on this server and their capabilities."""
    return list_models(settings.models_dir, settings.default_model)
