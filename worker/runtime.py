"""What a worker process owns: one device, and each base model loaded lazily once and cached."""

from __future__ import annotations

import gc
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import torch
from diffusers import AutoencoderKL, ControlNetModel, T2IAdapter, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from contract.domains import folder_domain
from models.common.activation_cache import tensor_bytes
from models.common.components import Components
from models.personalization.common import Adapter
from store.settings import Settings
from worker.memory import prepare

log = logging.getLogger("atelier.worker")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class DevicePolicy:
    """How a worker runs models: its device and dtype, attention, and the memory settings (worker/memory.py)."""

    device: torch.device
    dtype: torch.dtype
    attention: str
    threads: int = 0
    vae_tiling: str = "auto"  # auto | on | off
    cpu_offload: bool = False  # base models rest on the CPU; each module moves to `device` while used
    compile: str = "off"  # off | unet
    compile_mode: str = "default"

    @property
    def weights_device(self) -> torch.device:
        """Where a base model's weights rest between uses: the CPU with offload, else the device."""
        return torch.device("cpu") if self.cpu_offload else self.device


def device_policy(settings: Settings) -> DevicePolicy:
    """CUDA -> fp16 and SDPA attention (xformers when installed and chosen); CPU -> fp32."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("ATELIER_DEVICE=cuda but no CUDA device is available")
    use_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if settings.dtype == "auto":
        dtype = torch.float16 if use_cuda else torch.float32
    else:
        dtype = DTYPES[settings.dtype]
    if not use_cuda and dtype == torch.float16:
        raise RuntimeError("fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    if settings.cpu_offload == "model" and settings.compile != "off":
        raise RuntimeError(
            "ATELIER_COMPILE=unet and ATELIER_CPU_OFFLOAD=model do not go together: the offload hooks installed for "
            "each job would make torch.compile recompile the UNet for every job; choose one"
        )
    if settings.cpu_offload == "model" and not use_cuda:
        raise RuntimeError(
            "ATELIER_CPU_OFFLOAD=model offloads a CUDA device's models to the CPU; this worker has no CUDA device "
            "(set ATELIER_CPU_OFFLOAD=off)"
        )
    if settings.attention == "xformers":
        require_xformers()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return DevicePolicy(
        device=device,
        dtype=dtype,
        attention=settings.attention,
        threads=torch.get_num_threads(),
        vae_tiling=settings.vae_tiling,
        cpu_offload=settings.cpu_offload == "model",
        compile=settings.compile,
        compile_mode=settings.compile_mode,
    )


def require_xformers() -> None:
    """RuntimeError, at the worker's start, when ATELIER_ATTENTION=xformers but xformers cannot be imported."""
    try:
        import xformers.ops  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"ATELIER_ATTENTION=xformers but xformers cannot be imported ({exc}); install it (the GPU image has it) "
            "or set ATELIER_ATTENTION=sdpa"
        ) from exc


def weights_variant(folder: Path) -> str | None:
    """`"fp16"` when `folder` holds only fp16-variant weights (diffusers' `variant="fp16"` layout, such as
    `diffusion_pytorch_model.fp16.safetensors`), else None: the plain files, preferred when both are there."""
    names = [path.name for path in folder.glob("*.safetensors")]
    return "fp16" if names and all(".fp16" in name for name in names) else None


def load_components(folder: Path, policy: DevicePolicy, allow_downloads: bool = False) -> Components:
    """Load a diffusers-format model folder (safetensors only, plain or fp16 variant) onto the policy's device;
    an SDXL folder's second text encoder and tokenizer too (`text_encoder_2`, `tokenizer_2`)."""
    common = {"torch_dtype": policy.dtype, "use_safetensors": True, "local_files_only": not allow_downloads}
    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", variant=weights_variant(folder / "unet"), **common
    )
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", variant=weights_variant(folder / "vae"), **common)
    text_encoder = CLIPTextModel.from_pretrained(
        folder, subfolder="text_encoder", variant=weights_variant(folder / "text_encoder"), **common
    )
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=not allow_downloads)
    text_encoder_2, tokenizer_2 = None, None
    if (folder / "text_encoder_2").is_dir():
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", variant=weights_variant(folder / "text_encoder_2"), **common
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(
            folder, subfolder="tokenizer_2", local_files_only=not allow_downloads
        )
    index = json.loads((folder / "model_index.json").read_text())
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        # StableDiffusionXLPipeline's default when the folder's index does not say
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", text_encoder_2 is not None)),
        domain=folder_domain(folder),
    )
    return place(components, policy)


def place(components: Components, policy: DevicePolicy) -> Components:
    """Put loaded components on the policy's device for inference: eval mode, no gradients, the chosen attention
    (a folder's and a single file's alike)."""
    modules = [components.unet, components.vae, components.text_encoder, components.text_encoder_2]
    for module in modules:
        if module is None:
            continue
        module.to(policy.weights_device)
        module.eval()
        module.requires_grad_(False)
    if policy.attention == "xformers":
        components.unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        components.unet.set_attn_processor(AttnProcessor2_0())
    prepare(
        components,
        vae_tiling=policy.vae_tiling,
        compile=policy.compile,
        compile_mode=policy.compile_mode,
        device=policy.device,
    )
    return components


CONTROL_CLASSES: dict[str, type[ControlNetModel] | type[T2IAdapter]] = {
    "ControlNetModel": ControlNetModel,
    "T2IAdapter": T2IAdapter,
}


def load_control(folder: Path, policy: DevicePolicy, allow_downloads: bool = False) -> ControlNetModel | T2IAdapter:
    """Load a ControlNet or T2I-Adapter folder (diffusers format, safetensors only, plain or fp16 variant) onto the
    policy's device."""
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if class_name not in CONTROL_CLASSES:
        raise ValueError(f"{folder.name} is not a ControlNet or T2I-Adapter (its config names {class_name!r})")
    model = CONTROL_CLASSES[class_name].from_pretrained(
        folder,
        torch_dtype=policy.dtype,
        use_safetensors=True,
        local_files_only=not allow_downloads,
        variant=weights_variant(folder),
    )
    model.to(policy.device)
    model.eval()
    model.requires_grad_(False)
    return model


def model_bytes(model: Components | ControlNetModel | T2IAdapter) -> int:
    """Bytes of a loaded model's parameters and buffers (what it holds on its device)."""
    if isinstance(model, Components):
        modules = [model.unet, model.vae, model.text_encoder, model.text_encoder_2]
    else:
        modules = [model]
    return sum(tensor_bytes([*module.parameters(), *module.buffers()]) for module in modules if module is not None)


Loaded: TypeAlias = Components | ControlNetModel | T2IAdapter


class ModelCache:
    """Base models and control models by name, loaded on first use, kept within a memory budget.

    budget_bytes: the most bytes of weights kept at once (`ATELIER_MODEL_CACHE_BYTES`; 0: no limit). After a load
    the least recently used models are dropped until the rest fit; a model larger than the whole budget is still
    loaded (the job needs it) and everything else dropped. A dropped model's memory is returned once the last job
    using it lets go (on CUDA the allocator's cache is emptied too). One lock per model name: a slow load of one model
    never holds up a job on another, and two jobs asking for one model load it once."""

    def __init__(
        self, models_dir: Path, policy: DevicePolicy, allow_downloads: bool = False, budget_bytes: int = 0
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"model cache budget must be at least 0 bytes (0: no limit), got {budget_bytes}")
        self.models_dir = models_dir
        self.policy = policy
        self.allow_downloads = allow_downloads
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[Loaded, int]] = OrderedDict()
        self._guard = threading.Lock()  # the entries and the per-model locks; never held while loading
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self.loads = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the models kept now."""
        with self._guard:
            return sum(size for _, size in self._entries.values())

    def names(self) -> list[str]:
        """The kept models' names, least recently used first."""
        with self._guard:
            return [name for _, name in self._entries]

    def control(self, name: str) -> ControlNetModel | T2IAdapter:
        folder = self.models_dir / name
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"control model {name!r} not found in {self.models_dir}")
        model = self._get(("control", name), lambda: load_control(folder, self.policy, self.allow_downloads))
        assert not isinstance(model, Components)
        return model

    def get(self, name: str) -> Components:
        """Base model `name`: a diffusers folder, else a single-file checkpoint `<name>.safetensors`."""
        folder = self.models_dir / name
        if (folder / "model_index.json").is_file():
            model = self._get(("base", name), lambda: load_components(folder, self.policy, self.allow_downloads))
        else:
            from worker.single_file import find_checkpoint, load_checkpoint  # it builds on this module

            model = self._get(
                ("base", name),
                lambda: load_checkpoint(find_checkpoint(self.models_dir, name), self.models_dir, self.policy),
            )
        assert isinstance(model, Components)
        return model

    def _get(self, key: tuple[str, str], load: Callable[[], Loaded]) -> Loaded:
        with self._guard:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found[0]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # this model only
            with self._guard:
                found = self._entries.get(key)  # loaded by another thread while this one waited
                if found is not None:
                    self._entries.move_to_end(key)
                    return found[0]
            log.info("loading %s model %s on %s (%s)", key[0], key[1], self.policy.device, self.policy.dtype)
            model = load()
            size = model_bytes(model)
            with self._guard:
                self._entries[key] = (model, size)
                self.loads += 1
                dropped = self._evict(keep=key)
        if dropped:
            self._release(dropped)
        return model

    def _evict(self, keep: tuple[str, str]) -> list[str]:
        """Drop least recently used entries (never `keep`) until the rest fit the budget; under `_guard`."""
        if not self.budget_bytes:
            return []
        dropped: list[str] = []
        total = sum(size for _, size in self._entries.values())
        for key in list(self._entries):
            if total <= self.budget_bytes:
                break
            if key == keep:
                continue
            total -= self._entries.pop(key)[1]
            dropped.append(key[1])
            self.evictions += 1
        if total > self.budget_bytes:
            log.warning("model %s alone (%d bytes) exceeds the model cache budget (%d)", keep[1], total,
                        self.budget_bytes)
        return dropped

    def _release(self, dropped: list[str]) -> None:
        log.info("model cache: dropped %s (least recently used) to stay within %d bytes", dropped, self.budget_bytes)
        gc.collect()
        if self.policy.device.type == "cuda":
            torch.cuda.empty_cache()


class AdapterCache:
    """Parsed adapters (CPU tensors) by id and checksum, most recently used kept, at most `capacity` of them.

    The base model stays loaded in `ModelCache`; a job's adapters are installed on it and removed after the job
    (`models.personalization.apply.applied`), so switching adapters never reloads the base model."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, adapter_id: str, sha256: str, load: Callable[[], Adapter]) -> Adapter:
        key = (adapter_id, sha256)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        adapter = load()
        with self._lock:
            self._items[key] = adapter
            self._items.move_to_end(key)
            self.loads += 1
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return adapter

    def __len__(self) -> int:
        return len(self._items)
