"""Running one job: claim, heartbeat, call the method, write outputs, write the terminal state.

This is the worker's whole logic; `worker/tasks.py` only hands it a job id.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api.registry import methods
from models.common.components import MethodOutput
from store.artifacts import ArtifactStore
from store.files import get_file, store_output
from store.jobs import claim, finish, heartbeat
from store.settings import Settings
from store.tables import Job, JobState
from worker.runtime import ModelCache

log = logging.getLogger("atelier.worker")


class JobCanceled(Exception):
    """The client asked to cancel; raised from the step callback."""


class JobTimedOut(Exception):
    """The job ran past its time limit."""


class LeaseLost(Exception):
    """Another worker took the job over (our lease expired) or it ended: stop without writing."""


@dataclass
class WorkerContext:
    """What a worker process holds across jobs."""

    settings: Settings
    sessions: sessionmaker[Session]
    artifacts: ArtifactStore
    cache: ModelCache
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


class Heartbeat(threading.Thread):
    """Beside the method, renews the lease, writes the latest progress and reads the cancel flag.

    One UPDATE ... RETURNING every `progress_interval` seconds, so a denoising step never waits for
    the database: the step callback only reads the flags this thread keeps.
    """

    def __init__(self, ctx: WorkerContext, job_id: str) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.ctx, self.job_id = ctx, job_id
        self.stop_event = threading.Event()
        self.lost = False
        self.cancel_requested = False
        self.progress: tuple[int, int] | None = None
        self._written: tuple[int, int] | None = None

    def run(self) -> None:
        settings = self.ctx.settings
        interval = max(min(settings.progress_interval, settings.job_lease_seconds / 3), 0.02)
        with self.ctx.sessions() as session:
            while not self.stop_event.wait(interval):
                progress = self.progress
                step, total = progress if progress and progress != self._written else (None, None)
                try:
                    state = heartbeat(session, self.job_id, self.ctx.owner, settings.job_lease_seconds, step, total)
                except Exception:
                    session.rollback()
                    log.warning("heartbeat for %s failed; retrying", self.job_id, exc_info=True)
                    continue
                self._written = progress
                if state is None:
                    self.lost = True
                    return
                self.cancel_requested = state


class StepReporter:
    """The method's per-step callback: checks cancel, lease and time limit; hands progress to the heartbeat."""

    def __init__(self, ctx: WorkerContext, job_id: str, beat: Heartbeat) -> None:
        self.ctx, self.job_id, self.beat = ctx, job_id, beat
        self.deadline = time.monotonic() + ctx.settings.job_soft_time_limit

    def __call__(self, step: int, total: int) -> None:
        self.beat.progress = (step, total)
        if self.beat.lost:
            raise LeaseLost(self.job_id)
        if self.beat.cancel_requested:
            raise JobCanceled()
        if time.monotonic() > self.deadline:
            raise JobTimedOut(f"ran past the {self.ctx.settings.job_soft_time_limit:.0f} s limit")


def _load_image(ctx: WorkerContext, session: Session, job: Job, name: str, file_id: str) -> Image.Image:
    row = get_file(session, job.tenant_id, file_id)
    if row is None:
        raise ValueError(f"{name}: file {file_id} no longer exists")
    return Image.open(io.BytesIO(ctx.artifacts.get(row.key))).convert("RGB")


def _load_inputs(
    ctx: WorkerContext, session: Session, job: Job, image_fields: tuple[str, ...], list_fields: tuple[str, ...]
) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for name in image_fields:
        if job.params.get(name):
            inputs[name] = _load_image(ctx, session, job, name, job.params[name])
    for name in list_fields:
        ids = job.params.get(name) or []
        inputs[name] = [_load_image(ctx, session, job, f"{name}[{i}]", file_id) for i, file_id in enumerate(ids)]
    return inputs


def _method_params(params_cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(params_cls)}
    return params_cls(**{k: v for k, v in values.items() if k in names})


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_outputs(ctx: WorkerContext, session: Session, job: Job, output: MethodOutput) -> list[str]:
    named = [(f"image-{i}.png", image) for i, image in enumerate(output.images)]
    named += [(f"{name}.png", image) for name, image in output.extra_images.items()]
    ids = [
        store_output(session, ctx.artifacts, job.tenant_id, job.id, name, _png(image), "image/png", image.size)
        for name, image in named
    ]
    ids += [
        store_output(session, ctx.artifacts, job.tenant_id, job.id, name, file.data, file.content_type, None)
        for name, file in output.files.items()
    ]
    return ids


def execute_job(ctx: WorkerContext, job_id: str) -> str:
    """Run the job if this worker can claim it; returns what happened (for logs and tests)."""
    # 1. Claim: a conditional update, so a duplicate message never runs a job twice.
    with ctx.sessions() as session:
        outcome = claim(session, job_id, ctx.owner, ctx.settings.job_lease_seconds)
    if outcome.reason != "claimed" or outcome.job is None:
        log.info("job %s not run: %s", job_id, outcome.reason)
        return outcome.reason
    job = outcome.job
    spec = methods()[job.kind]
    beat = Heartbeat(ctx, job_id)
    beat.start()
    started = time.perf_counter()
    state, error_code, error_message = JobState.failed, "internal_error", "internal error"
    outputs: list[str] = []
    metrics: dict[str, Any] = {}
    result: dict[str, Any] | None = None
    try:
        # 2. Load the model (cached), the inputs and the method.
        module = importlib.import_module(spec.runner)
        components = ctx.cache.get(job.model)
        with ctx.sessions() as session:
            inputs = _load_inputs(ctx, session, job, spec.image_fields, spec.image_list_fields)
        params = _method_params(module.Params, job.params)
        generator = torch.Generator("cpu").manual_seed(int(job.params.get("seed", 0)))

        # 3. Run it.
        reporter = StepReporter(ctx, job_id, beat)
        method_started = time.perf_counter()
        output: MethodOutput = module.run(components, params, inputs, generator=generator, callback=reporter)
        method_seconds = time.perf_counter() - method_started

        # 4. Write outputs under deterministic keys.
        with ctx.sessions() as session:
            outputs = _write_outputs(ctx, session, job, output)
        metrics = {
            **output.metrics,
            "method_seconds": round(method_seconds, 4),
            "run_seconds": round(time.perf_counter() - started, 4),
        }
        result = output.result or None
        state, error_code, error_message = JobState.succeeded, "", ""
    except JobCanceled:
        state, error_code, error_message = JobState.canceled, "", ""
    except (JobTimedOut, SoftTimeLimitExceeded) as exc:
        error_code, error_message = "timeout", str(exc) or "time limit exceeded"
    except LeaseLost:
        log.warning("job %s: lease lost, leaving it to its new owner", job_id)
        return "lease_lost"
    except ValueError as exc:
        error_code, error_message = "invalid_input", str(exc)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        error_code, error_message = "internal_error", f"{type(exc).__name__}: {exc}"[:500]
    finally:
        beat.stop_event.set()

    # 5. The guarded terminal write.
    with ctx.sessions() as session:
        written = finish(
            session,
            job_id,
            ctx.owner,
            state,
            output_file_ids=outputs if state == JobState.succeeded else None,
            metrics=metrics if state == JobState.succeeded else None,
            result=result,
            error_code=error_code or None,
            error_message=error_message or None,
            progress=beat.progress,
        )
    log.info("job %s %s%s", job_id, state, f" ({error_code})" if error_code else "")
    return str(state) if written else "lease_lost"
