"""One settings object for the API and the worker, read from the environment.

`models/` never sees this: the worker passes what a method needs as arguments.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Atelier configuration. Every field is an environment variable `ATELIER_<NAME>` unless noted."""

    model_config = SettingsConfigDict(env_prefix="ATELIER_", extra="ignore")

    # Persistence and transport
    database_url: str = Field(
        default=f"sqlite:///{ROOT / 'var' / 'atelier.db'}",
        validation_alias=AliasChoices("DATABASE_URL", "ATELIER_DATABASE_URL"),
        description="SQLAlchemy URL: postgresql+psycopg://… in production, sqlite:///… embedded.",
    )
    broker_url: str = Field(
        default="filesystem://",
        validation_alias=AliasChoices("CELERY_BROKER_URL", "ATELIER_BROKER_URL"),
        description="Celery broker: redis://… in production; filesystem:// needs no server.",
    )
    broker_dir: Path = Field(default=ROOT / "var" / "broker", description="Folder of the filesystem broker.")
    artifact_store: Literal["local", "s3"] = "local"
    artifacts_dir: Path = ROOT / "var" / "artifacts"
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_prefix: str = ""

    # Models and devices
    models_dir: Path = Field(default=ROOT / "zoo", description="Folder of diffusers-format base model folders.")
    default_model: str = "shapes-sd-tiny"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    attention: Literal["sdpa", "xformers"] = Field(
        default="sdpa",
        description="The UNet's attention: PyTorch's scaled dot-product attention, or xformers' memory-efficient "
        "attention (the GPU image installs it; a worker without it refuses to start).",
    )
    vae_tiling: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="on: the VAE decodes a batch one image at a time and an image larger than the model's native size "
        "from overlapping tiles of that size (encodes likewise), so large images fit in less memory; off: whole "
        "images; auto: on with a CUDA device, off on the CPU.",
    )
    cpu_offload: Literal["off", "model"] = Field(
        default="off",
        description="model: the text encoder(s), UNet and VAE rest in CPU memory and each is moved to the GPU only "
        "while a job uses it (training jobs move the whole model for the job); the model cache's budget then counts "
        "CPU memory. Needs a CUDA device (a CPU worker refuses to start with it).",
    )
    compile: Literal["off", "unet"] = Field(
        default="off",
        description="unet: torch.compile the UNet when a model is loaded (the first job at each image size pays the "
        "compilation; training jobs run it uncompiled). Not with ATELIER_CPU_OFFLOAD=model.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        default="default", description="torch.compile's mode with ATELIER_COMPILE=unet."
    )
    allow_downloads: bool = False
    torch_threads: int = Field(
        default=1,
        ge=0,
        description="CPU threads per worker process (0: torch's default). 1 is fastest for the tiny zoo model "
        "on a shared CPU; raise it for a large model on a CPU-only worker.",
    )
    model_cache_bytes: int = Field(
        default=0,
        ge=0,
        description="Per worker process: the most bytes of model weights (base and control models) kept loaded; "
        "the least recently used are dropped to stay within it (0: no limit). Size it to the device's memory less "
        "what jobs and the activation cache need: an SD 1.5 model is about 2.1 GB in fp16, SDXL about 7 GB. With "
        "ATELIER_CPU_OFFLOAD=model base models rest in CPU memory: size it to that.",
    )
    activation_cache_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="Per worker process: the most bytes of recorded UNet activations kept for sparse region edits "
        "of the same image (on the worker's device; 0 turns the cache off). One entry is one job's recording: "
        "about 3.8 MB per denoising step for the zoo model at 64 px, 57 MB at 256 px, 0.45 GiB for SD 1.5 at 512 px "
        "in fp16; see docs/sparse-cache.md.",
    )

    # Auth
    admin_key: str | None = None
    auth_disabled: bool = False
    dev_api_key: str | None = None

    # Limits
    max_request_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_image_side: int = 4096
    max_jobs_page: int = 100

    # Quotas (per tenant; an admin can override each for one tenant, `PATCH /v1/admin/tenants/{id}`)
    tenant_max_running_jobs: int = Field(
        default=2, ge=1, description="A tenant's jobs running at once; more wait in the queue, others go first."
    )
    tenant_max_active_jobs: int = Field(
        default=100, ge=1, description="A tenant's queued and running jobs together; a submission beyond is a 429."
    )
    tenant_submissions_per_minute: int = Field(
        default=120, ge=1, description="Jobs a tenant may create in any 60 s; beyond it a 429 with Retry-After."
    )
    max_job_cost: float = Field(
        default=800.0,
        gt=0,
        description="One job's denoising work: steps x images x (pixels / the model's native pixels). Over it, "
        "a 422 at submission. 800 is e.g. 50 steps of 4 images at 1024 x 1024 on a 512-pixel model.",
    )

    # Jobs
    job_lease_seconds: float = 6.0
    job_max_attempts: int = 3
    job_soft_time_limit: float = 1800.0
    job_hard_time_limit: float = 1900.0
    progress_interval: float = 0.25
    republish_after_seconds: float = Field(
        default=15.0,
        description="A queued job whose message a worker took but did not start, or whose broker cannot be "
        "inspected (the filesystem broker), is re-published after this many seconds (doubling with each "
        "re-publish, up to 16x).",
    )
    republish_grace_seconds: float = Field(
        default=3.0,
        description="A queued job published this long ago whose message the Redis broker no longer holds "
        "(in a queue or taken by a worker) is re-published: it was lost, e.g. in a broker restart.",
    )
    reconcile_interval: float = 2.0
    webhook_secret: str = "change-me"
    webhook_max_attempts: int = 5
    webhook_timeout: float = 5.0
    webhook_allow_private: str = Field(
        default="",
        description="Comma-separated hosts, addresses and CIDRs that webhooks may reach although they are not public "
        "(e.g. `hooks.internal,10.0.0.0/8`); every other private, loopback or link-local target is refused.",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests clear the cache after changing the environment)."""
    return Settings()
