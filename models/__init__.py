"""Atelier's science: pure functions and small modules of torch/diffusers.

What every module here keeps to:
- No web, queue, database or settings imports (e.g. fastapi, celery, sqlalchemy, pydantic_settings, api, worker,
  store; the import-linter contract "models is pure" in pyproject.toml lists them and enforces it). Files,
  storage, job state and retries are the worker's; a method sees only objects in memory.
- A method is one module (in generation/, editing/, personalization/ or classification/) exposing a frozen
  dataclass `Params` and `run(components, params, inputs, *, generator, callback, ...)` that returns a
  `MethodOutput` (models/common/components.py); the method registry names the module as a spec's `runner`.
  Training methods also take `checkpoints`, and adapter types expose `apply` (models/personalization/common.py).
- The loaded base model (`Components`) is shared by every job of a worker: a method leaves it exactly as it
  found it (it trains copies, or installs layers, tokens and processors in context managers that restore them).
- Every random draw comes from a seeded generator, so a job is reproducible: the job's `generator`, generators
  seeded from the job's params, or a fixed seed where a result must not depend on the job (class images,
  Perfusion's caption corpus).
- Bad values raise ValueError naming the field; `callback(step, total)` reports progress and may raise to cancel.
Shared pieces live in common/ (checks, latents, sampling, inversion, attention, masks, metrics, progress) and,
for training, in personalization/training.py and personalization/concepts.py.
"""
