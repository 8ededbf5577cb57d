"""Progress reporting across the stages of one job (inversion then sampling, optimisation then generation)."""

from __future__ import annotations

from models.common.components import ProgressCallback


def offset_progress(callback: ProgressCallback, done: int, total: int) -> ProgressCallback:
    """A stage's callback that reports its step k as step `done + k` of the whole job's `total`."""

    def report(step: int, stage_total: int) -> None:
        callback(done + step, total)

    return report
