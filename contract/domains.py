"""What a base model was trained on, and the method defaults that depend on it.

Most defaults are the model's own (its native size, its prediction type) or the paper's. A few were tuned on the
ShapesWorld zoo (`models/shapes/`), a 3-million-parameter model that learns a concept in a few hundred steps at
rates a Stable Diffusion model would not survive; they apply to ShapesWorld models only. A base model folder says
it is one with an `atelier.json` holding `{"domain": "shapesworld"}` (the zoo's trainers write it); every other
model, a folder or a single file, is `general`.

A request field these tables name defaults to None ("left out"); the API fills it in from the table for the job's
model (`fill`), so the job records the value used. A runner's `Params` keeps the ShapesWorld value as its default
(the bench and the tests call runners in process on the zoo); a caller in process on another model passes the
values itself. The model code reads the domain (`Components.domain`) for the training captions and corpora
(`models/personalization/captions.py`). This module imports nothing of the API, the worker or the model code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

Domain = Literal["shapesworld", "general"]
NOTES_FILE = "atelier.json"

METHOD_DEFAULTS: dict[str, dict[Domain, dict[str, Any]]] = {
    # Imagic on Stable Diffusion (diffusers' community Imagic pipeline, the paper's recipe moved to SD): stage A
    # 500 Adam steps at 1e-3, stage B 1,000 at 2e-6. The zoo's: 100 at 2e-3, 150 at 6e-5 (bench group `imagic`).
    "imagic": {
        "general": {"embedding_steps": 500, "embedding_lr": 1e-3, "finetune_steps": 1000, "finetune_lr": 2e-6},
        "shapesworld": {"embedding_steps": 100, "embedding_lr": 2e-3, "finetune_steps": 150, "finetune_lr": 6e-5},
    },
    # DreamBooth on Stable Diffusion (diffusers' DreamBooth example): 400 steps at 5e-6.
    "dreambooth": {
        "general": {"steps": 400, "learning_rate": 5e-6},
        "shapesworld": {"steps": 200, "learning_rate": 2e-4},
    },
    # LoRA DreamBooth on Stable Diffusion (diffusers' LoRA example): 500 steps at 1e-4.
    "lora": {
        "general": {"steps": 500, "learning_rate": 1e-4},
        "shapesworld": {"steps": 300, "learning_rate": 1e-3},
    },
    # Custom Diffusion (Kumari et al. 2023, sec. 4): 250 steps at 8e-5 (batch 8) for one concept.
    "custom-diffusion": {
        "general": {"steps": 250, "learning_rate": 8e-5},
        "shapesworld": {"steps": 200, "learning_rate": 1e-3},
    },
    # Textual inversion (Gal et al. 2023, sec. 4.1 and appendix): 5,000 steps at a base rate of 5e-3.
    "textual-inversion": {
        "general": {"steps": 5000, "learning_rate": 5e-3},
        "shapesworld": {"steps": 300, "learning_rate": 5e-3},
    },
}
"""Per job kind and domain, the values of the fields a request leaves out (None)."""


def folder_domain(folder: Path) -> Domain:
    """The domain a model folder's `atelier.json` names; `general` without one (or with anything else in it)."""
    try:
        notes = json.loads((folder / NOTES_FILE).read_text())
    except (OSError, ValueError):
        return "general"
    domain = notes.get("domain") if isinstance(notes, dict) else None
    return "shapesworld" if domain == "shapesworld" else "general"


def mark(folder: Path, domain: Domain, **notes: Any) -> None:
    """Write `folder`'s `atelier.json`: its domain and any other notes (the zoo's trainers call this)."""
    (folder / NOTES_FILE).write_text(json.dumps({"domain": domain, **notes}, indent=2) + "\n")


def defaults(kind: str, domain: Domain) -> Mapping[str, Any]:
    """The defaults of `kind`'s fields that depend on the model's domain (empty for most kinds)."""
    return METHOD_DEFAULTS.get(kind, {}).get(domain, {})


def fill(kind: str, domain: Domain, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with each domain-dependent field left out (None or absent) set to its default; the rest as given."""
    filled = dict(params)
    for name, value in defaults(kind, domain).items():
        if filled.get(name) is None:
            filled[name] = value
    return filled


def left_out(kind: str, name: str) -> str:
    """The end of a domain-dependent field's description: its default on each domain."""
    general, shapes = (METHOD_DEFAULTS[kind][domain][name] for domain in ("general", "shapesworld"))
    return f" Left out: {general:g} on a general model, {shapes:g} on a ShapesWorld model (the zoo)."
