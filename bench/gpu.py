"""`make bench-gpu`: seconds per image on the real Stable Diffusion 1.5 architecture.

UNet, VAE and text encoder are built from SD 1.5's published configs with random weights (timing does
not depend on weight values) and run through the worker's own code path (`load`-free `Components` +
`models.generation.text_to_image.run`): 512x512, 50 DDIM steps, classifier-free guidance, batch 1,
fp16 on CUDA. Variants: PyTorch SDPA, xformers (if importable), and SDPA + torch.compile of the UNet.
Published figures for comparison: 1.59 s (A100, SDPA), 1.11 s (H100 PCIe, compile), 0.57 s (H100 SXM,
ONNX Runtime).

    python -m bench.gpu            # needs a CUDA device
    python -m bench.gpu --smoke    # the same code path on the CPU at 64x64, 2 steps (a check, not a figure)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bench.common import ROOT, machine, write_results
from models.common.components import Components
from models.generation import text_to_image

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
SD15_TEXT = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_SCHEDULER: dict[str, Any] = {
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


def sd15_components(device: torch.device, dtype: torch.dtype) -> Components:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(SD15_TEXT)
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "zoo" / "shapes-sd-tiny" / "tokenizer")
    tokenizer.model_max_length = 77  # SD's sequence length (our vocabulary's ids fit in SD's table)
    for module in (unet, vae, text_encoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Components(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=SD15_SCHEDULER
    )


def seconds_per_image(components: Components, size: int, steps: int, repeats: int) -> list[float]:
    params = text_to_image.Params(prompt="a large red circle at the center", steps=steps, width=size, height=size)
    text_to_image.run(components, params, generator=torch.Generator("cpu").manual_seed(0))  # warm-up
    times = []
    for i in range(repeats):
        if components.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        text_to_image.run(components, params, generator=torch.Generator("cpu").manual_seed(i))
        if components.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench-gpu needs a CUDA device (use --smoke to check the code path on the CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size, steps, repeats = (64, 2, 1) if args.smoke else (512, 50, args.repeats)
    components = sd15_components(device, dtype)
    results: dict[str, Any] = {"machine": machine(), "device": str(device), "size": size, "steps": steps}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    from diffusers.models.attention_processor import AttnProcessor2_0

    components.unet.set_attn_processor(AttnProcessor2_0())
    results["sdpa_s"] = statistics.median(seconds_per_image(components, size, steps, repeats))
    try:
        components.unet.enable_xformers_memory_efficient_attention()
        results["xformers_s"] = statistics.median(seconds_per_image(components, size, steps, repeats))
    except Exception as exc:  # xformers not installed or not built for this GPU
        results["xformers_s"] = None
        results["xformers_error"] = f"{type(exc).__name__}: {exc}"[:200]
    components.unet.set_attn_processor(AttnProcessor2_0())
    if not args.smoke:
        components.unet = torch.compile(components.unet, mode="max-autotune", fullgraph=True)  # type: ignore[assignment]
        results["compile_s"] = statistics.median(seconds_per_image(components, size, steps, repeats))
    fmt = lambda v: f"{v:.3f} s" if isinstance(v, float) else "n/a"  # noqa: E731
    markdown = (
        f"| variant ({results.get('gpu', device)}, {size}x{size}, {steps} DDIM steps, CFG, batch 1, {dtype}) "
        f"| s / image |\n|---|---|\n| PyTorch SDPA | {fmt(results['sdpa_s'])} |\n"
        f"| xformers | {fmt(results.get('xformers_s'))} |\n| SDPA + torch.compile | {fmt(results.get('compile_s'))} |\n"
    )
    write_results("gpu-smoke" if args.smoke else "gpu", results, markdown)
    sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
