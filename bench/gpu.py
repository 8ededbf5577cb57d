"""`make bench-gpu`: seconds per image, peak memory, training steps and the classifier's speed on a GPU worker.

Random-weight models in the exact SD 1.5 and SDXL shapes (timing does not depend on weight values) are written as
diffusers folders and loaded through the worker's own loader (`worker.runtime.ModelCache`, with the worker's
`DevicePolicy`: attention, VAE tiling, compile), then run through the methods' own `run(...)` under the worker's
per-job memory settings (`worker.memory.job_memory`), as a job would:

- text-to-image, 30 DDIM steps, classifier-free guidance, batch 1, fp16: SD 1.5 at 512, SDXL at 1024, each with
  PyTorch SDPA, xformers (where it imports), SDPA + torch.compile of the UNet (SD 1.5; SDXL when time allows) and
  SDPA + model-level CPU offload; seconds per image (median) and peak allocated memory;
- one LoRA training step and one DreamBooth step on SD 1.5 at 512 in fp16 (seconds per step, peak memory; LoRA's
  must fit 12 GB);
- the Diffusion Classifier's UNet evaluations per second (SD 1.5, 512).

SDXL needs the loader's and methods' SDXL support; where that fails, its rows say why and the rest still runs.
The whole run is sized for one H200 within 8 minutes (estimates beside each section); a time guard skips what
would not finish in `--budget` seconds (default 420, leaving a minute for start-up, a 20-second hard stop and the
results) and says so in the results.

    python -m bench.gpu            # needs a CUDA device; writes bench/results/gpu.json and gpu.md
    python -m bench.gpu --smoke    # the same code at tiny widths on the CPU, 64 px, 2 steps (a check, not a figure)

Published figures to compare: SD 1.5, 50 steps at 512, about 1.1 s on an H100 PCIe with compile (diffusers'
optimisation guides); SDXL on an H100 SXM about 2 images/s in MLPerf Inference 4.1 (TensorRT, FP8).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from bench.common import ROOT, machine, write_results
from models.classification import diffusion_classifier
from models.common.components import Components
from models.generation import text_to_image
from models.personalization import dreambooth, lora
from worker.memory import job_memory
from worker.runtime import DevicePolicy, ModelCache

SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


CLIP_VOCABULARY = 49408  # CLIP's token table (the zoo tokenizer's ids fit in it): the in-memory SD 1.5 model's


@dataclass(frozen=True)
class Shape:
    """A model family's published architecture (or, for --smoke, the same structure at tiny widths)."""

    name: str
    size: int  # native image side, pixels
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: list[dict[str, Any]]  # one CLIP text config per encoder (SDXL: two, the second with a projection)
    extra_index: dict[str, Any] = field(default_factory=dict)


def sd15(smoke: bool) -> Shape:
    widths = (32, 32, 64, 64) if smoke else (320, 640, 1280, 1280)
    text_width = 64 if smoke else 768
    unet = {
        "sample_size": 8 if smoke else 64,
        "layers_per_block": 1 if smoke else 2,
        "block_out_channels": widths,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": text_width,
        "attention_head_dim": 8,
        "norm_num_groups": 16 if smoke else 32,
    }
    text = {
        "hidden_size": text_width,
        "intermediate_size": 4 * text_width,
        "num_hidden_layers": 1 if smoke else 12,
        "num_attention_heads": 4 if smoke else 12,
        "hidden_act": "quick_gelu",
        "projection_dim": text_width,
    }
    return Shape("sd15", 64 if smoke else 512, unet, vae_config(smoke, 64 if smoke else 512, 0.18215), [text])


def sdxl(smoke: bool) -> Shape:
    widths = (32, 64, 64) if smoke else (320, 640, 1280)
    text_widths = (32, 64) if smoke else (768, 1280)
    unet = {
        "sample_size": 8 if smoke else 128,
        "layers_per_block": 1 if smoke else 2,
        "block_out_channels": widths,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 1, 1) if smoke else (1, 2, 10),
        "attention_head_dim": (2, 4, 4) if smoke else (5, 10, 20),
        "cross_attention_dim": sum(text_widths),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8 if smoke else 256,
        "projection_class_embeddings_input_dim": text_widths[1] + 6 * (8 if smoke else 256),
        "norm_num_groups": 16 if smoke else 32,
    }
    texts = [
        {
            "hidden_size": text_widths[0],
            "intermediate_size": 4 * text_widths[0],
            "num_hidden_layers": 1 if smoke else 12,
            "num_attention_heads": 4 if smoke else 12,
            "hidden_act": "quick_gelu",
            "projection_dim": text_widths[0],
        },
        {
            "hidden_size": text_widths[1],
            "intermediate_size": 4 * text_widths[1],
            "num_hidden_layers": 1 if smoke else 32,
            "num_attention_heads": 4 if smoke else 20,
            "hidden_act": "gelu",
            "projection_dim": text_widths[1],
        },
    ]
    vae = vae_config(smoke, 64 if smoke else 1024, 0.13025)
    return Shape("sdxl", 64 if smoke else 1024, unet, vae, texts, {"force_zeros_for_empty_prompt": True})


def vae_config(smoke: bool, size: int, scaling: float) -> dict[str, Any]:
    return {
        "latent_channels": 4,
        "layers_per_block": 1 if smoke else 2,
        "sample_size": size,
        "block_out_channels": (16, 16, 32, 32) if smoke else (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "norm_num_groups": 8 if smoke else 32,
        "scaling_factor": scaling,
    }


def write_model(shape: Shape, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
    """A diffusers folder of random weights in `shape`, built on `device` (fast on a GPU) and saved in `dtype`."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "zoo" / "shapes-sd-tiny" / "tokenizer")
    tokenizer.model_max_length = 77  # SD's sequence length (the zoo's ids fit in SD's table)
    with torch.device(device):
        parts: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel(**shape.unet),
            "vae": AutoencoderKL(**shape.vae),
        }
        for index, text in enumerate(shape.text):
            config = CLIPTextConfig(
                vocab_size=len(tokenizer),  # the training methods add tokens to exactly this table
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **text,
            )
            name = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
            parts[name] = CLIPTextModel(config) if index == 0 else CLIPTextModelWithProjection(config)
    for name, module in parts.items():
        module.to(dtype).save_pretrained(folder / name)  # type: ignore[operator]
    for index in range(len(shape.text)):
        tokenizer.save_pretrained(folder / ("tokenizer" if index == 0 else f"tokenizer_{index + 1}"))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    index_name = "StableDiffusionXLPipeline" if len(shape.text) > 1 else "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": index_name, **shape.extra_index}))
    del parts
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sd15_components(device: torch.device, dtype: torch.dtype) -> Components:
    """The SD 1.5-shaped random model in memory, without a folder (bench/groups/sparse_cache.py's second model)."""
    shape = sd15(smoke=False)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shape.unet)
    vae = AutoencoderKL(**shape.vae)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=CLIP_VOCABULARY, max_position_embeddings=77, **shape.text[0])
    )
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "zoo" / "shapes-sd-tiny" / "tokenizer")
    tokenizer.model_max_length = 77  # SD's sequence length (our vocabulary's ids fit in SD's table)
    for module in (unet, vae, text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=dict(SCHEDULER)
    )


class OutOfTime(Exception):
    """Raised in the main thread when the run passes its budget plus a grace (`Budget`'s hard stop)."""


class Budget:
    """The run's time guard: a section runs only if its estimate fits in what is left; and a hard stop, should an
    estimate be wrong, that ends the section in hand (recorded as its error) so that the results are still written."""

    def __init__(self, seconds: float, grace: float = 20.0) -> None:
        self.deadline = time.monotonic() + seconds
        self.skipped: list[str] = []
        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, self._stop)
            signal.alarm(max(1, int(seconds + grace)))

    def _stop(self, signum: int, frame: Any) -> None:
        self.deadline = time.monotonic()  # every later section is skipped
        raise OutOfTime("stopped at the bench's time limit")

    def close(self) -> None:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)

    def allows(self, name: str, estimate: float) -> bool:
        left = self.deadline - time.monotonic()
        if estimate > left:
            self.skipped.append(f"{name} (estimated {estimate:.0f} s, {max(left, 0):.0f} s left)")
            return False
        return True


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured(device: torch.device, work: Callable[[], Any]) -> tuple[float, int | None, Any]:
    """(seconds, peak allocated bytes on CUDA or None, result) of `work()`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak, result


def text_to_image_row(
    components: Components, size: int, steps: int, repeats: int, device: torch.device, offload: bool = False
) -> dict[str, Any]:
    """Seconds per image (median of `repeats`, after one warm-up that also pays any compilation) and peak memory."""
    params = text_to_image.Params(prompt="a large red circle at the center", steps=steps, width=size, height=size)

    def one(seed: int) -> Any:
        with job_memory(components, offload=offload, device=device, training=False):
            return text_to_image.run(components, params, generator=torch.Generator("cpu").manual_seed(seed))

    warm_up, _, _ = measured(device, lambda: one(0))
    times: list[float] = []
    peaks: list[int] = []
    for index in range(repeats):
        seconds, peak, _ = measured(device, lambda index=index: one(index + 1))  # type: ignore[misc]
        times.append(seconds)
        peaks += [peak] if peak is not None else []
    return {
        "s_per_image": round(statistics.median(times), 4),
        "first_s": round(warm_up, 2),
        "peak_gib": round(max(peaks) / 2**30, 2) if peaks else None,
    }


def training_row(components: Components, kind: str, size: int, steps: int, device: torch.device) -> dict[str, Any]:
    """One training job of `steps` steps (LoRA or DreamBooth, batch 1, no prior images) at `size`: seconds per step
    of its loop, and peak memory of the whole job."""
    images = [Image.new("RGB", (size, size), colour) for colour in ("red", "blue")]
    generator = torch.Generator("cpu").manual_seed(0)

    def train() -> Any:
        with job_memory(components, offload=False, device=device, training=True):
            if kind == "lora":
                params: Any = lora.Params(token="<bench>", class_word="circle", steps=steps, batch_size=1)
                return lora.run(components, params, {"images": images}, generator=generator)
            params = dreambooth.Params(
                token="<bench>", class_word="circle", steps=steps, batch_size=1, prior_preservation=False
            )
            return dreambooth.run(components, params, {"images": images}, generator=generator)

    seconds, peak, output = measured(device, train)
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    return {
        # the loop's own time: "train_seconds" where a method also reports the whole job's, else "seconds"
        "s_per_step": round(float(output.metrics.get("train_seconds", output.metrics["seconds"])) / steps, 4),
        "job_s": round(seconds, 2),
        "peak_gib": round(peak / 2**30, 2) if peak is not None else None,
        # what the allocator held at most (allocated plus its cache): the figure to hold against a 12 GiB card
        "peak_reserved_gib": round(reserved / 2**30, 2) if reserved is not None else None,
        "fits_12_gib": reserved <= 12 * 2**30 if reserved is not None else None,
    }


def classifier_row(components: Components, size: int, device: torch.device, smoke: bool) -> dict[str, Any]:
    """UNet evaluations per second of one Diffusion Classifier job (10 classes, the default adaptive schedule)."""
    names = ["circle", "square", "triangle", "star", "heart", "hexagon", "cross", "diamond", "moon", "ring"]
    params = diffusion_classifier.Params(
        class_names=names[:3] if smoke else names,
        samples_per_stage=(2, 2) if smoke else (4, 28),
        keep_per_stage=(2,) if smoke else (5,),
    )
    image = Image.new("RGB", (size, size), "red")

    def classify() -> Any:
        generator = torch.Generator("cpu").manual_seed(0)
        with job_memory(components, offload=False, device=device, training=False):
            return diffusion_classifier.run(components, params, {"image": image}, generator=generator)

    seconds, peak, output = measured(device, classify)
    evaluations = int(output.result["unet_evaluations"])
    return {"evaluations": evaluations, "per_s": round(evaluations / seconds, 1), "seconds": round(seconds, 2)}


def policy(device: torch.device, dtype: torch.dtype, attention: str = "sdpa", compile: str = "off") -> DevicePolicy:
    return DevicePolicy(device, dtype, attention, vae_tiling="auto", compile=compile)


def load(models: Path, name: str, devices: DevicePolicy) -> Components:
    """Through the worker's own cache and loader (a fresh cache per variant: the variant is the policy)."""
    return ModelCache(models, devices).get(name)


def guarded(results: dict[str, Any], key: str, work: Callable[[], dict[str, Any]]) -> None:
    try:
        results[key] = work()
    except Exception as exc:  # e.g. xformers not importable, SDXL not supported by this checkout
        results[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def loaded_variants(
    rows: dict[str, Any],
    budget: Budget,
    models: Path,
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    repeats: int,
    estimates: tuple[float, float],
) -> None:
    """The text-to-image rows that load the model again with another worker policy: xformers attention, then the
    compiled UNet, each run when its estimate (seconds) fits the budget."""
    variants = (("xformers", policy(device, dtype, "xformers")), ("compile", policy(device, dtype, compile="unet")))
    for (key, devices), estimate in zip(variants, estimates, strict=True):
        if budget.allows(f"{shape.name} {key}", estimate):
            guarded(rows, key, partial(variant_row, models, shape, devices, steps, repeats, device))


def variant_row(
    models: Path, shape: Shape, devices: DevicePolicy, steps: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    return text_to_image_row(load(models, shape.name, devices), shape.size, steps, repeats, device)


def run(smoke: bool, repeats: int, budget: Budget, models: Path, results: dict[str, Any]) -> None:
    """Every section, its rows written into `results` as they come (a hard stop keeps what was measured)."""
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.float16
    steps = 2 if smoke else 30
    results.update({"machine": machine(), "device": str(device), "steps": steps, "dtype": str(dtype)})
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    # 1. SD 1.5-shaped at 512 (estimates on an H200: write+load 20 s, each variant ~10 s, compile ~90 s)
    shape = sd15(smoke)
    rows: dict[str, Any] = {"size": shape.size}
    results[shape.name] = rows
    write_model(shape, models / shape.name, device, dtype)
    components = load(models, shape.name, policy(device, dtype))
    guarded(rows, "sdpa", lambda: text_to_image_row(components, shape.size, steps, repeats, device))
    guarded(rows, "sdpa_offload", lambda: text_to_image_row(components, shape.size, steps, 1, device, offload=True))
    if budget.allows("sd15 training", 60):
        guarded(rows, "lora_step", lambda: training_row(components, "lora", shape.size, 3, device))
        guarded(rows, "dreambooth_step", lambda: training_row(components, "dreambooth", shape.size, 3, device))
    if budget.allows("sd15 classifier", 30):
        guarded(rows, "classifier", lambda: classifier_row(components, shape.size, device, smoke))
    del components
    if not smoke:
        loaded_variants(rows, budget, models, shape, device, dtype, steps, repeats, (30, 150))
    shutil.rmtree(models / shape.name, ignore_errors=True)

    # 2. SDXL-shaped at 1024 (estimates: write+load 60 s, each variant ~20 s, compile ~200 s)
    shape = sdxl(smoke)
    rows = {"size": shape.size}
    results[shape.name] = rows
    if budget.allows("sdxl", 120):
        try:
            write_model(shape, models / shape.name, device, dtype)
            components = load(models, shape.name, policy(device, dtype))
        except Exception as exc:
            rows["error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            guarded(rows, "sdpa", lambda: text_to_image_row(components, shape.size, steps, repeats, device))
            guarded(
                rows, "sdpa_offload", lambda: text_to_image_row(components, shape.size, steps, 1, device, offload=True)
            )
            del components
            if not smoke:
                loaded_variants(rows, budget, models, shape, device, dtype, steps, repeats, (60, 240))


def markdown(results: dict[str, Any]) -> str:
    def cell(row: Any, key: str, unit: str) -> str:
        if not isinstance(row, dict):
            return "n/a"
        if "error" in row:
            return "failed"
        value = row.get(key)
        return f"{value} {unit}" if value is not None else "n/a"

    lines = [
        f"GPU bench ({results.get('gpu', results['device'])}, {results['steps']} DDIM steps, CFG, batch 1, "
        f"{results['dtype']})",
        "",
        "| model | variant | s / image | peak GiB | first run s |",
        "|---|---|---|---|---|",
    ]
    for name in ("sd15", "sdxl"):
        model = results.get(name, {})
        for variant in ("sdpa", "xformers", "compile", "sdpa_offload"):
            row = model.get(variant)
            if row is None:
                continue
            lines.append(
                f"| {name} {model.get('size')} | {variant} | {cell(row, 's_per_image', 's')} | "
                f"{cell(row, 'peak_gib', '')} | {cell(row, 'first_s', 's')} |"
            )
        if "error" in model:
            lines.append(f"| {name} | not run | {model['error']} | | |")
    sd = results.get("sd15", {})
    lines += [
        "",
        f"| training (sd15 {sd.get('size')}, batch 1) | s / step | peak GiB | peak reserved GiB | fits 12 GiB |",
        "|---|---|---|---|---|",
    ]
    for kind in ("lora_step", "dreambooth_step"):
        if kind in sd:
            row = sd[kind]
            lines.append(
                f"| {kind} | {cell(row, 's_per_step', 's')} | {cell(row, 'peak_gib', '')} | "
                f"{cell(row, 'peak_reserved_gib', '')} | {cell(row, 'fits_12_gib', '')} |"
            )
    if "classifier" in sd:
        lines += ["", f"Diffusion Classifier: {cell(sd['classifier'], 'per_s', 'UNet evaluations / s')}"]
    errors = [
        f"- {name} {variant}: {row['error']}"
        for name in ("sd15", "sdxl")
        for variant, row in results.get(name, {}).items()
        if isinstance(row, dict) and "error" in row
    ]
    skipped = [f"- skipped: {item}" for item in results.get("skipped", [])]
    skipped += [f"- {results['stopped']}"] if "stopped" in results else []
    return "\n".join(lines + ([""] + errors if errors else []) + ([""] + skipped if skipped else [])) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budget", type=float, default=420.0, help="seconds; sections that would overrun are skipped (8 min in all)"
    )
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench-gpu needs a CUDA device (use --smoke to check the code path on the CPU)")
    started = time.monotonic()
    results: dict[str, Any] = {}
    budget = Budget(args.budget)
    try:
        with tempfile.TemporaryDirectory(prefix="atelier-bench-gpu-") as folder:
            run(args.smoke, 1 if args.smoke else args.repeats, budget, Path(folder), results)
    except OutOfTime as exc:  # outside a guarded section (writing or loading a model)
        results["stopped"] = str(exc)
    finally:
        budget.close()
    results["skipped"] = budget.skipped
    results["total_s"] = round(time.monotonic() - started, 1)
    text = markdown(results)
    write_results("gpu-smoke" if args.smoke else "gpu", results, text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
