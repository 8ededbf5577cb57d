"""Do a UNet's visual tokens know where they are? ``python zoo/position_probe.py [--model DIR]``.

GLIGEN's gated self-attention (zoo/train_gligen.py) can only send a phrase's token to the cells inside its box if a
cell's token carries its own position to compare with the box's Fourier embedding: diffusers' UNet adds no
positional encoding, so whatever position a token knows comes from the convolutions' zero padding. This probe reads
the tokens entering every transformer block (what the gated layers see) for noised test-split scenes at a few
timesteps, fits a ridge regression from a token to its cell's (x, y) on half of the images, and prints R^2 on the
other half: near 1, the tokens know their position; near 0, they do not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from PIL import Image  # noqa: E402

from bench.harness import scenes  # noqa: E402
from models.common.latents import encode, images_to_tensor  # noqa: E402
from models.common.text import encode_prompts  # noqa: E402
from models.shapes.world import caption, render  # noqa: E402
from worker.runtime import DevicePolicy, load_components  # noqa: E402


def position_r2(tokens: torch.Tensor) -> tuple[float, float]:
    """R^2 of a ridge probe from tokens (B, N, C) on an s x s map to their cells' (x, y): fit on the first half of
    the batch, scored on the second."""
    batch, count, channels = tokens.shape
    side = round(count**0.5)
    rows, cols = np.divmod(np.arange(count), side)
    target = np.stack([cols, rows], 1) / (side - 1)
    half = batch // 2
    features = tokens.double().numpy()
    train = np.c_[features[:half].reshape(-1, channels), np.ones(half * count)]
    test = np.c_[features[half:].reshape(-1, channels), np.ones((batch - half) * count)]
    ridge = 1e-2 * len(train) * np.eye(channels + 1)
    fit = np.linalg.solve(train.T @ train + ridge, train.T @ np.tile(target, (half, 1)))
    truth = np.tile(target, (batch - half, 1))
    r2 = 1 - ((test @ fit - truth) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)
    return float(r2[0]), float(r2[1])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "zoo" / "shapes-sd-tiny"))
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--timesteps", default="950,800,500")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    components = load_components(Path(args.model), DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))
    unet = components.unet
    blocks = [(name, module) for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)]
    seen: dict[str, torch.Tensor] = {}
    for name, module in blocks:
        module.register_forward_pre_hook(
            lambda _m, a, k, name=name: seen.__setitem__(name, (a[0] if a else k["hidden_states"]).detach()),
            with_kwargs=True,
        )
    cases = scenes("test", args.images, 5, None)
    clean = encode(components.vae, images_to_tensor([Image.fromarray(render(scene).image) for scene in cases]))
    text = encode_prompts(components.text_encoder, components.tokenizer, [caption(scene) for scene in cases])
    scheduler = components.ddim()
    for timestep in (int(value) for value in args.timesteps.split(",")):
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(timestep))
        with torch.no_grad():
            unet(scheduler.add_noise(clean, noise, torch.tensor([timestep])), timestep, encoder_hidden_states=text)
        readings = []
        for name, _ in blocks:
            r2_x, r2_y = position_r2(seen[name])
            side = round(seen[name].shape[1] ** 0.5)
            readings.append(f"{name.rsplit('.transformer_blocks', 1)[0]} ({side}x{side}): x {r2_x:.2f}, y {r2_y:.2f}")
        print(f"t = {timestep}: " + "; ".join(readings))


if __name__ == "__main__":
    main(sys.argv[1:])
