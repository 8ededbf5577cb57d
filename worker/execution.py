"""Running one job: claim, heartbeat, call the method, write outputs, write the terminal state.

This is the worker's whole logic; `worker/tasks.py` only hands it a job id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from contract.params.common import ADAPTER_NAME_FIELD
from contract.registry import methods
from contract.spec import MethodSpec
from models.common.activation_cache import ActivationCache, CacheHandle
from models.common.components import Components, MethodOutput
from models.personalization.apply import applied
from models.personalization.common import Adapter, read_metadata
from models.personalization.concepts import CLASS_IMAGES_SEED, generate_class_images
from store.adapters import adapter_id_for_job, adapter_key, checkpoint_key, get_adapter, read_adapter_file, save_adapter
from store.artifacts import ArtifactNotFound, ArtifactStore, StorageUnavailable
from store.files import get_file, output_key, store_output
from store.job_ends import redis_client
from store.jobs import Claim, ClaimReason, TenantCap, claim, finish, finished_by, heartbeat
from store.quotas import limits_for
from store.recordings import Holder, job_route_key, remember
from store.retry import DatabaseUnavailable, in_session, retrying
from store.settings import Settings
from store.tables import Job, JobState, Tenant
from worker.controls import job_controls
from worker.memory import forget_frames, job_memory, release_memory
from worker.owners import current_owner, owner_is_dead
from worker.runners import ClassImageRunner, ResumableRunner, Runner, load_runner, method_params
from worker.runtime import AdapterCache, ModelCache

log = logging.getLogger("atelier.worker")

RunOutcome = JobState | ClaimReason | Literal["lease_lost", "unrecorded"]
"""What `execute_job` reports: the state it wrote, why it did not run the job, that another worker took it, or
that the database failed through every retry of the terminal write (the job runs again after its lease)."""


class JobCanceled(Exception):
    """The client asked to cancel; raised from the step callback."""


class JobTimedOut(Exception):
    """The job ran past its time limit."""


class LeaseLost(Exception):
    """Another worker took the job over (our lease expired) or it ended: stop without writing."""


@dataclass
class WorkerContext:
    """What a worker process holds across jobs.

    `activations`: recorded UNet activations for sparse region edits, sized by `settings.activation_cache_bytes`
    and handed to every job as `inputs["activation_cache"]` (see `_prepare`); it lives as long as the process, so
    a restarted worker starts with it empty.
    """

    settings: Settings
    sessions: sessionmaker[Session]
    artifacts: ArtifactStore
    cache: ModelCache
    owner: str = field(default_factory=current_owner)
    adapters: AdapterCache = field(default_factory=AdapterCache)
    activations: ActivationCache = field(init=False)

    def __post_init__(self) -> None:
        self.activations = ActivationCache(self.settings.activation_cache_bytes)


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


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _output_files(output: MethodOutput) -> list[tuple[str, bytes, str, tuple[int, int] | None]]:
    """(name, bytes, content type, size) of every output file, in the job's order."""
    named = [(f"image-{i}.png", image) for i, image in enumerate(output.images)]
    named += [(f"{name}.png", image) for name, image in output.extra_images.items()]
    files = [(name, _png(image), "image/png", image.size) for name, image in named]
    return files + [(name, file.data, file.content_type, None) for name, file in output.files.items()]


def _write_outputs(ctx: WorkerContext, session: Session, job: Job, output: MethodOutput) -> list[str]:
    """Every output's bytes, then all their rows in one commit: a failed commit leaves no row of this attempt."""
    ids = [
        store_output(session, ctx.artifacts, job.tenant_id, job.id, name, data, content_type, size)
        for name, data, content_type, size in _output_files(output)
    ]
    session.commit()
    return ids


def _store_results_retrying(ctx: WorkerContext, job: Job, output: MethodOutput) -> list[str]:
    """`_store_results` through transient faults. If the database stays down, the bytes written are removed
    again, so no file is left without its row; only on a first attempt, because an earlier one's rows may
    point at the same deterministic keys."""
    try:
        return retrying("storing the outputs", lambda: _store_results(ctx, job, output))
    except DatabaseUnavailable:
        if job.attempts == 1:
            keys = [output_key(job.tenant_id, job.id, name) for name, *_ in _output_files(output)]
            if output.adapter is not None:
                keys.append(adapter_key(job.tenant_id, adapter_id_for_job(job.id)))
            for key in keys:
                try:
                    ctx.artifacts.delete(key)
                except StorageUnavailable:
                    log.warning("job %s: could not remove an output after the database failed", job.id)
        raise


class ArtifactCheckpoints:
    """A training job's last checkpoint, one safetensors file under a key derived from the job id.

    A new attempt of the same job (its worker died) finds it and resumes from its step."""

    def __init__(self, artifacts: ArtifactStore, key: str) -> None:
        self.artifacts, self.key = artifacts, key

    def load(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        try:
            data = self.artifacts.get(self.key)
        except ArtifactNotFound:
            return None
        step = int(read_metadata(data)["step"])
        log.info("resuming from the checkpoint at step %d (%s)", step, self.key)
        return step, load_safetensors(data)

    def save(self, step: int, state: dict[str, torch.Tensor]) -> None:
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
        data = save_safetensors(tensors, metadata={"step": str(step)})
        self.artifacts.put(self.key, data, "application/octet-stream")


def _load_adapters(
    ctx: WorkerContext, session: Session, job: Job
) -> tuple[list[tuple[Adapter, float]], list[tuple[str, str, float]]]:
    """The job's adapters, via the LRU cache, and what identifies each: (id, file sha256, scale). The API resolved
    them when the job was created (each the tenant's, for the job's base model); one may have been deleted since,
    which fails the job."""
    loaded: list[tuple[Adapter, float]] = []
    identities: list[tuple[str, str, float]] = []
    for index, ref in enumerate(job.adapters):
        row = get_adapter(session, job.tenant_id, str(ref["id"]))
        if row is None:
            raise ValueError(f"adapters[{index}].id: adapter {ref['id']} no longer exists")
        sha256 = str(row.files[0]["sha256"]) if row.files else ""

        def load(row: Any = row) -> Adapter:
            data = read_adapter_file(ctx.artifacts, row)
            metadata = {**read_metadata(data), "tokens": json.dumps(row.tokens), "base_model": row.base_model}
            return Adapter(type=row.type, tensors=load_safetensors(data), metadata=metadata)

        scale = float(ref.get("scale", 1.0))
        loaded.append((ctx.adapters.get(row.id, sha256, load), scale))
        identities.append((row.id, sha256, scale))
    return loaded, identities


def weights_identity(model: str, adapters: list[tuple[str, str, float]]) -> str:
    """What the base model computes with during a job, as a string: its name (a process loads a name once) and the
    adapters installed on it, each (id, sha256, scale). Part of the activation cache's keys."""
    return json.dumps([model, [list(adapter) for adapter in adapters]])


def _store_adapter(ctx: WorkerContext, session: Session, job: Job, output: MethodOutput) -> str:
    """The trained adapter as a registry row and file; idempotent by job id (a re-run overwrites)."""
    adapter = output.adapter
    assert adapter is not None
    adapter.metadata["base_model"] = job.model
    row = save_adapter(
        session,
        ctx.artifacts,
        tenant_id=job.tenant_id,
        name=str(job.params.get(ADAPTER_NAME_FIELD) or (adapter.tokens[0] if adapter.tokens else job.kind)),
        type=adapter.type,
        tokens=adapter.tokens,
        base_model=job.model,
        data=adapter.to_bytes(),
        training={"kind": job.kind, **job.params, "seed": job.seed},
        metrics=dict(output.metrics),
        job_id=job.id,
    )
    return row.id


def _class_images(
    ctx: WorkerContext, job: Job, runner: ClassImageRunner, params: Any, components: Components
) -> dict[str, Any]:
    """DreamBooth's prior images and Custom Diffusion's regularisation images, generated once per (base model,
    prompt, count, steps, guidance) and kept in the artifact store for every later job and tenant (they depend on
    the base model only). A model replaced on disk under the same name needs its `_shared/class-images/` cleared."""
    found: dict[str, Any] = {}
    for name, request in runner.class_image_requests(params).items():
        description = [job.model, dataclasses.asdict(request), CLASS_IMAGES_SEED]
        digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
        keys = [f"_shared/class-images/{digest}/{index}.png" for index in range(request.count)]
        try:
            found[name] = [Image.open(io.BytesIO(ctx.artifacts.get(key))).convert("RGB") for key in keys]
        except ArtifactNotFound:
            found[name] = generate_class_images(components, request)
            for key, image in zip(keys, found[name], strict=True):
                ctx.artifacts.put(key, _png(image), "image/png")
    return found


@dataclass
class Prepared:
    """Everything a job's method call needs, loaded before it runs."""

    runner: Runner
    components: Components
    params: Any
    inputs: dict[str, Any]
    adapters: list[tuple[Adapter, float]]  # installed on the base model while the method runs
    checkpoints: ArtifactCheckpoints | None  # where a resumable method keeps its last checkpoint
    conditions: dict[str, Image.Image] = field(default_factory=dict)  # control conditions as used, for the outputs
    training: bool = False  # a training-queue method: run with the whole model on the device, memory released after


@dataclass
class Ending:
    """How an attempt ended, for the terminal write."""

    state: JobState
    error_code: str = ""
    error_message: str = ""
    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None


def execute_job(ctx: WorkerContext, job_id: str, node: str | None = None) -> RunOutcome:
    """Run the job if this worker can claim it; returns what happened (for logs and tests). `node`: this worker's
    Celery node name, where follow-up edits of a recording it keeps are sent (`_note_recording`).

    Database work is retried through transient faults (`store.retry`): a job never fails because of a dropped
    connection the database survived."""
    # 1. Claim: a conditional update, so a duplicate message never runs a job twice.
    outcome = in_session(ctx.sessions, "claiming the job", lambda session: _claim(ctx, session, job_id))
    if outcome.reason != "claimed" or outcome.job is None:
        log.info("job %s not run: %s", job_id, outcome.reason)
        return outcome.reason
    job = outcome.job
    spec = methods()[job.kind]
    beat = Heartbeat(ctx, job_id)
    beat.start()
    try:  # the lease is renewed until the end is written
        ending = _attempt(ctx, job, spec, beat)  # 2-4: load, run, write outputs
        if spec.queue == "training":  # nothing of the job is referenced any more: return its memory
            log.info("job %s: memory after training %s", job_id, release_memory(ctx.cache.policy.device))
        if ending is None:
            log.warning("job %s: lease lost, leaving it to its new owner", job_id)
            return "lease_lost"
        _note_recording(ctx, job, ending, node)
        return _finish(ctx, job, spec, ending, beat.progress)  # 5. The guarded terminal write.
    finally:
        beat.stop_event.set()


def _note_recording(ctx: WorkerContext, job: Job, ending: Ending, node: str | None) -> None:
    """After a region edit whose recording this process's cache keeps, note this worker as its holder, so that
    follow-up edits of the image are sent here (store/recordings.py). Before the end is written: a client that
    sees the job succeed may send the next edit at once."""
    if node is None or ending.state != JobState.succeeded or not ending.metrics.get("activation_held"):
        return
    client, key = redis_client(ctx.settings.broker_url), job_route_key(job)
    if client is not None and key is not None:
        remember(client, key, Holder(node=node, owner=ctx.owner))


def _claim(ctx: WorkerContext, session: Session, job_id: str) -> Claim:
    """Claim it within its tenant's cap on running jobs (`store.quotas`)."""
    row = session.execute(select(Job.tenant_id).where(Job.id == job_id)).first()
    if row is None:
        return Claim(None, "not_found")
    limits = limits_for(session.get(Tenant, row.tenant_id), ctx.settings)
    cap = TenantCap(row.tenant_id, limits.max_running_jobs)
    lease = ctx.settings.job_lease_seconds
    outcome = claim(session, job_id, ctx.owner, lease, cap=cap)
    if outcome.reason == "held" and outcome.job is not None and owner_is_dead(outcome.job.lease_owner):
        # Its worker process died on this host (Celery re-queued the message): take it over now.
        dead = outcome.job.lease_owner
        log.warning("job %s: its worker %s is dead; taking it over", job_id, dead)
        outcome = claim(session, job_id, ctx.owner, lease, dead_owner=dead, cap=cap)
    return outcome


def _attempt(ctx: WorkerContext, job: Job, spec: MethodSpec, beat: Heartbeat) -> Ending | None:
    """Load, run and write the outputs; every failure becomes the job's error. None: the lease was lost."""
    started = time.perf_counter()
    try:
        prepared = retrying("loading the job's inputs", lambda: _prepare(ctx, job, spec))
        output, method_seconds = _run_method(ctx, job, prepared, beat)
        outputs = _store_results_retrying(ctx, job, output)
    except JobCanceled:
        return Ending(JobState.canceled)
    except (JobTimedOut, SoftTimeLimitExceeded) as exc:
        return Ending(JobState.failed, "timeout", str(exc) or "time limit exceeded")
    except LeaseLost:
        return None
    except ValueError as exc:
        return Ending(JobState.failed, "invalid_input", str(exc))
    except DatabaseUnavailable as exc:  # its message names the operation, never SQL
        log.exception("job %s: the database failed through the retries", job.id)
        forget_frames(exc)  # the log record keeps the traceback, not the method's tensors
        return Ending(JobState.failed, "database_unavailable", str(exc))
    except StorageUnavailable as exc:  # its message names the operation, never a path
        log.exception("job %s: artifact store failed", job.id)
        forget_frames(exc)
        return Ending(JobState.failed, "storage_unavailable", str(exc))
    except Exception as exc:
        log.exception("job %s failed", job.id)
        forget_frames(exc)
        return Ending(JobState.failed, "internal_error", f"{type(exc).__name__}: {exc}"[:500])
    metrics = {
        **output.metrics,
        "method_seconds": round(method_seconds, 4),
        "run_seconds": round(time.perf_counter() - started, 4),
    }
    return Ending(JobState.succeeded, outputs=outputs, metrics=metrics, result=output.result or None)


def _prepare(ctx: WorkerContext, job: Job, spec: MethodSpec) -> Prepared:
    """2. Load the model (cached), the inputs, the adapters and the method, as the spec declares them."""
    runner = load_runner(spec)
    components = ctx.cache.get(job.model)
    with ctx.sessions() as session:
        inputs = _load_inputs(ctx, session, job, spec.image_fields, spec.image_list_fields)
        adapters, identities = _load_adapters(ctx, session, job)

        def load_image(name: str, file_id: str) -> Image.Image:
            return _load_image(ctx, session, job, name, file_id)

        controls = job_controls(job, spec, inputs, ctx.cache, load_image)
    inputs.update(controls.inputs)
    params = method_params(runner, job.params)
    if spec.class_images:
        with _memory(ctx, components, training=False):
            inputs.update(_class_images(ctx, job, cast(ClassImageRunner, runner), params, components))
    if spec.adapters == "inputs":  # e.g. a merge job: the method reads them, nothing is installed
        inputs["adapters"], adapters, identities = adapters, [], []
    # The process's activation cache, for every job: a method that can reuse activations across jobs (region-edit)
    # reads it, the others ignore it. The handle names the weights as installed, which its keys must include.
    inputs["activation_cache"] = CacheHandle(ctx.activations, weights_identity(job.model, identities))
    checkpoints = None
    if spec.resumable:  # a resumed attempt finds the last checkpoint
        checkpoints = ArtifactCheckpoints(ctx.artifacts, checkpoint_key(job.tenant_id, job.id))
    training = spec.queue == "training"
    return Prepared(runner, components, params, inputs, adapters, checkpoints, controls.conditions, training)


def _memory(ctx: WorkerContext, components: Components, training: bool) -> contextlib.AbstractContextManager[None]:
    """The worker's memory settings for one job on `components` (worker/memory.py): CPU offload, and a training
    job's uncompiled UNet."""
    policy = ctx.cache.policy
    return job_memory(components, offload=policy.cpu_offload, device=policy.device, training=training)


def _run_method(ctx: WorkerContext, job: Job, prepared: Prepared, beat: Heartbeat) -> tuple[MethodOutput, float]:
    """3. Run it, with the job's adapters installed on the cached base model (and removed after, exactly).

    Returns the output and the seconds the method took."""
    generator = torch.Generator("cpu").manual_seed(job.seed)
    reporter = StepReporter(ctx, job.id, beat)
    components, params, inputs = prepared.components, prepared.params, prepared.inputs
    started = time.perf_counter()
    with _memory(ctx, components, prepared.training), applied(components, prepared.adapters):
        if prepared.checkpoints is not None:
            resumable = cast(ResumableRunner, prepared.runner)
            output = resumable.run(
                components, params, inputs, generator=generator, callback=reporter, checkpoints=prepared.checkpoints
            )
        else:
            output = prepared.runner.run(components, params, inputs, generator=generator, callback=reporter)
    seconds = time.perf_counter() - started
    output.extra_images.update(prepared.conditions)
    return output, seconds


def _store_results(ctx: WorkerContext, job: Job, output: MethodOutput) -> list[str]:
    """4. Write outputs under deterministic keys; a trained adapter becomes a registry row (id from the job)."""
    with ctx.sessions() as session:
        outputs = _write_outputs(ctx, session, job, output)
        if output.adapter is not None:
            output.result = {**output.result, "adapter_id": _store_adapter(ctx, session, job, output)}
    return outputs


def _finish(
    ctx: WorkerContext, job: Job, spec: MethodSpec, ending: Ending, progress: tuple[int, int] | None
) -> RunOutcome:
    """5. The terminal write, only if this worker still holds the job."""
    succeeded = ending.state == JobState.succeeded

    def write(session: Session) -> bool:
        written = finish(
            session,
            job.id,
            ctx.owner,
            ending.state,
            output_file_ids=ending.outputs if succeeded else None,
            metrics=ending.metrics if succeeded else None,
            result=ending.result,
            error_code=ending.error_code or None,
            error_message=ending.error_message or None,
            progress=progress,
        )
        # A retry after a commit whose reply was lost finds its own end already written.
        return written or finished_by(session, job.id, ctx.owner, ending.state)

    try:
        written = in_session(ctx.sessions, "writing the job's end", write)
    except DatabaseUnavailable:
        log.exception("job %s: its end could not be written; it runs again once its lease expires", job.id)
        return "unrecorded"
    if written and succeeded and spec.resumable:
        ctx.artifacts.delete(checkpoint_key(job.tenant_id, job.id))  # the adapter is stored; no resume is needed
    error = f" ({ending.error_code})" if ending.error_code else ""
    log.info("job %s %s%s", job.id, ending.state, error)
    return ending.state if written else "lease_lost"
