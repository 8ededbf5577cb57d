"""`make bench-quality`: every method measured against the ShapesWorld oracle.

Each module in `bench/groups/` is one group: `NAME` and `run(ctx) -> GroupResult` with rows (figure,
target, cases, seconds per case) and image grids; a new method adds a module there. Writes
`bench/results/quality.{json,md}` (or `quality-<groups>.*` for a subset) and PNG grids beside them.

    python -m bench.quality                   # every group
    python -m bench.quality --groups zoo --n 50
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import bench.groups
from bench.common import RESULTS, machine
from bench.harness import BenchContext, GroupResult, Row
from models.common.components import Components


def groups() -> dict[str, Callable[[BenchContext], GroupResult]]:
    found = {}
    for info in sorted(pkgutil.iter_modules(bench.groups.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"bench.groups.{info.name}")
        found[module.NAME] = module.run
    return found


def load_model(folder: Path) -> Components:
    from worker.runtime import DevicePolicy, load_components

    torch.set_num_threads(1)  # as the worker does
    return load_components(folder, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))


def markdown(rows: list[Row]) -> str:
    lines = [
        "| group | measure | figure | target | met | cases | s / case | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        figure = f"{r.figure:.1f}%" if r.unit == "%" else f"{r.figure:.3f} {r.unit}"
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        per = f"{r.seconds_per_case:.3f}" if r.seconds_per_case is not None else "-"
        lines.append(f"| {r.group} | {r.name} | {figure} | {r.target} | {met} | {r.cases} | {per} | {r.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from store.settings import get_settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = groups()
    parser.add_argument("--groups", nargs="*", default=list(available), choices=list(available))
    parser.add_argument("--n", type=int, default=200, help="cases per measure (the issues ask for >= 200)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the settings' default)")
    args = parser.parse_args(argv)
    settings = get_settings()
    folder = args.model or settings.models_dir / settings.default_model
    ctx = BenchContext(components=load_model(folder), n=args.n, seed=args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    for name in args.groups:
        started = time.perf_counter()
        result = available[name](ctx)
        rows += result.rows
        extra[name] = {**result.extra, "wall_seconds": round(time.perf_counter() - started, 1)}
        for key, image in result.grids.items():
            image.save(RESULTS / f"{key}.png")
    data = {
        "machine": machine(),
        "model": str(folder.name),
        "n": args.n,
        "seed": args.seed,
        "rows": [asdict(r) for r in rows],
        "extra": extra,
    }
    suffix = "" if set(args.groups) == set(available) else "-" + "-".join(args.groups)
    (RESULTS / f"quality{suffix}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"quality{suffix}.md").write_text(markdown(rows))
    sys.stdout.write(markdown(rows))


if __name__ == "__main__":
    main()
