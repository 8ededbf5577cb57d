"""Learning curves and the ablation table of zoo UNet runs, from their ``probe.jsonl`` files.

    python zoo/curves.py --run v2 --dirs abl-frozen abl-plain --out bench/results/zoo_v2_ablations.png

Plots, per run directory, the oracle's per-attribute accuracy on one-object prompts and the share of
one- and two-object samples with everything right, against training steps; prints a markdown table of
the last probe of each directory (what the model card's ablation table is made from).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PANELS = (
    ("one_shape", "shape (one object)"),
    ("one_color", "colour (one object)"),
    ("one_size", "size (one object)"),
    ("one_position", "position (one object)"),
    ("one_all", "one object: all right"),
    ("two_all", "two objects: all right"),
)


def read_probes(path: Path) -> list[dict]:
    """Probe records sorted by step (the last record of a step wins)."""
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def plot(series: dict[str, list[dict]], out: Path) -> None:
    """One panel per measure, one line per run directory."""
    figure, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for axis, (key, title) in zip(axes.flat, PANELS, strict=True):
        for label, records in series.items():
            values = [r.get(key, float("nan")) for r in records]
            axis.plot([r["step"] for r in records], values, marker="o", label=label)
        axis.set_title(title)
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("UNet optimizer steps")
    axes[0][0].set_ylabel("% right (oracle)")
    axes[1][0].set_ylabel("% right (oracle)")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)


def table(series: dict[str, list[dict]]) -> str:
    """Markdown rows of each directory's last probe."""
    lines = [
        "| variant | steps | wall (min) | shape | colour | size | position | one object all | two objects all |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, records in series.items():
        r = records[-1]
        lines.append(
            f"| {label} | {r['step']} | {r['wall_s'] / 60:.0f} | {r['one_shape']:.0f}% | {r['one_color']:.0f}% "
            f"| {r['one_size']:.0f}% | {r['one_position']:.0f}% | {r['one_all']:.0f}% | {r.get('two_all', 0):.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--dirs", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    run = REPO_ROOT / "zoo" / "_runs" / args.run
    series = {name: read_probes(run / name / "probe.jsonl") for name in args.dirs}
    plot(series, Path(args.out))
    print(table(series))


if __name__ == "__main__":
    main(sys.argv[1:])
