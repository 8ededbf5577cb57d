"""The short form of `make chaos` (bench/chaos.py): every fault of issue 14 against real Postgres and a Redis of
its own, with the whole service in processes (API, two workers). It fails on any job lost, duplicated, stuck or
failed, any response without a status while the API lives, any spurious delivery in the fault-free run, and any
recovery slower than its target (15 s after a worker's death, 10 s after a broker restart)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from store.settings import ROOT, Settings


def test_the_short_chaos_run_meets_every_target(settings: Settings) -> None:
    if not settings.database_url.startswith("postgresql") or shutil.which("redis-server") is None:
        pytest.skip("needs Postgres and redis-server (CI has both)")
    # The service's own defaults (lease, reconciler timing), not the suite's shortened ones.
    env = {key: value for key, value in os.environ.items() if not key.startswith("ATELIER_")}
    env["DATABASE_URL"] = settings.database_url
    run = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--short", "--no-write"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    table = "\n".join(line for line in run.stdout.splitlines() if line.startswith("|"))
    assert run.returncode == 0, f"{table}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "| steady |" in table and "| database-drops |" in table
