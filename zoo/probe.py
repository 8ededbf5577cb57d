"""Read a UNet-stage checkpoint's samples with the oracle: ``python zoo/probe.py --run NAME --unet-dir DIR``.

The quick measure the ablations and the learning curve are compared by: fixed test-split prompts
(one-object and two-object scenes from fixed seeds, canonical captions), a fixed initial noise per
prompt, DDIM sampling at a fixed step count and guidance, and the oracle's per-attribute reading. It
uses the checkpoint's EMA weights (what export ships) unless ``--raw``. Each call appends one line to
``<run>/<unet-dir>/probe.jsonl``: step, wall time of training, and the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from bench.harness import accuracy, grid, scenes  # noqa: E402
from bench.quality import load_model  # noqa: E402
from models.common.components import Components  # noqa: E402
from models.common.latents import decode, randn, tensor_to_images  # noqa: E402
from models.common.sampling import ddim_sample  # noqa: E402
from models.common.text import encode_prompts  # noqa: E402
from models.shapes.world import caption  # noqa: E402
from zoo.configs import SD15_SCHEDULER, ZooConfig, build_text_encoder, build_unet, build_vae, latent_size  # noqa: E402
from zoo.runs import latest_checkpoint, load_checkpoint, run_dir  # noqa: E402

PROBE_SEED = 777


def load_components(run: Path, unet_dir: str, raw: bool, step: int | None = None) -> tuple[Components, dict]:
    """The run's VAE and tokenizer with the UNet stage's weights (EMA unless ``raw``) at ``step`` (newest
    when None); also returns the checkpoint's step and wall time."""
    manifest = json.loads((run / "manifest.json").read_text())
    config = ZooConfig.from_dict(manifest["config"])
    tokenizer = CLIPTokenizer.from_pretrained(str(run / "tokenizer"))
    path = run / unet_dir / f"ckpt-{step:07d}.pt" if step else latest_checkpoint(run / unet_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run / unet_dir}")
    state = load_checkpoint(path)
    text_encoder = build_text_encoder(
        config.text, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    unet = build_unet(config.unet, config.text.hidden_size, latent_size(config.vae))
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        weights = (
            state[name]
            if raw
            else {key[len(name) + 1 :]: value for key, value in state["ema"].items() if key.startswith(name + ".")}
        )
        module.load_state_dict(weights)
        module.eval()
    vae = AutoencoderKL.from_pretrained(str(run / "vae" / "final")).eval()
    components = Components(unet, vae, text_encoder, tokenizer, dict(SD15_SCHEDULER))
    return components, {"step": state["step"], "wall_s": state["wall_s"]}


@torch.no_grad()
def sample(
    components: Components, prompts: list[str], steps: int, guidance: float, batch: int = 32
) -> list[Image.Image]:
    """One image per prompt; prompt i starts from the noise of seed PROBE_SEED + i."""
    images: list[Image.Image] = []
    side = latent_size(ZooConfig().vae)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generators = [torch.Generator().manual_seed(PROBE_SEED + start + i) for i in range(len(chunk))]
        noise = torch.cat([randn((1, 4, side, side), g, components.device, components.dtype) for g in generators])
        scheduler = components.ddim()
        scheduler.set_timesteps(steps)
        cond = encode_prompts(components.text_encoder, components.tokenizer, chunk)
        uncond = encode_prompts(components.text_encoder, components.tokenizer, [""] * len(chunk))
        latents = ddim_sample(
            components.unet,
            scheduler,
            noise * scheduler.init_noise_sigma,
            scheduler.timesteps,
            cond,
            uncond,
            guidance,
            lambda step, total: None,
        )
        images += tensor_to_images(decode(components.vae, latents))
    return images


def probe(components: Components, n_one: int, n_two: int, steps: int, guidance: float) -> tuple[dict, list]:
    """Oracle figures on fixed one- and two-object prompts, and the images with their prompts."""
    figures: dict[str, float] = {}
    shown = []
    for label, count, n_objects, seed in (("one", n_one, 1, 11), ("two", n_two, 2, 12)):
        if count == 0:
            continue
        expected = scenes("test", count, seed, n_objects)
        prompts = [caption(scene) for scene in expected]
        images = sample(components, prompts, steps, guidance)
        all_right, attributes = accuracy(expected, images)
        figures[f"{label}_all"] = round(all_right, 1)
        figures.update({f"{label}_{name}": round(value, 1) for name, value in attributes.items()})
        shown += list(zip(images[:16], prompts[:16], strict=True))
    return figures, shown


@torch.no_grad()
def vae_roundtrip(vae: AutoencoderKL, n: int) -> dict[str, float]:
    """Oracle agreement (%) between ``n`` test scenes and their VAE round trips, overall and per attribute."""
    from models.common.latents import encode, images_to_tensor
    from models.shapes.world import render

    expected = scenes("test", n, 0, None)
    originals = [Image.fromarray(render(scene).image) for scene in expected]
    decoded: list[Image.Image] = []
    for start in range(0, n, 50):
        decoded += tensor_to_images(decode(vae, encode(vae, images_to_tensor(originals[start : start + 50]))))
    all_right, attributes = accuracy(expected, decoded)
    return {"vae_all": round(all_right, 1), **{f"vae_{k}": round(v, 1) for k, v in attributes.items()}}


def probe_vae(run: Path, vae_dir: str, n: int) -> None:
    """Round-trip figures of every VAE checkpoint (and final) of a VAE stage not yet probed."""
    manifest = json.loads((run / "manifest.json").read_text())
    config = ZooConfig.from_dict(manifest["config"])
    log = run / vae_dir / "probe.jsonl"
    done = {json.loads(line)["step"] for line in log.read_text().splitlines()} if log.exists() else set()
    for path in sorted((run / vae_dir).glob("ckpt-*.pt")):
        state = load_checkpoint(path)
        if state["step"] in done:
            continue
        vae = build_vae(config.vae).eval()
        vae.load_state_dict(state["vae"])
        # The scaling factor only scales latents; encode and decode undo each other's, so it is left at 1.
        record = {"step": state["step"], "wall_s": state["wall_s"], "n": n, **vae_roundtrip(vae, n)}
        with log.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--model", default="", help="probe this exported diffusers folder instead of a checkpoint")
    parser.add_argument("--unet-dir", default="unet")
    parser.add_argument("--vae-dir", default="", help="instead: the VAE round trip of this VAE stage's checkpoints")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    parser.add_argument("--n-one", type=int, default=54)
    parser.add_argument("--n-two", type=int, default=36)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default="", help="write a grid of the first samples to this PNG")
    parser.add_argument(
        "--watch",
        type=int,
        default=0,
        help="probe every new checkpoint whose step is a multiple of this, until the stage's last step is probed",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = run_dir(args.run)
    if args.vae_dir:
        probe_vae(run, args.vae_dir, 200)
        return
    if args.watch:
        watch(run, args)
        return
    if args.model:
        components, info = load_model(Path(args.model)), {"step": 0, "wall_s": 0.0, "model": args.model}
    else:
        components, info = load_components(run, args.unet_dir, args.raw, args.step)
    probe_and_record(run, args, components, info)


def probe_and_record(run: Path, args: argparse.Namespace, components: Components, info: dict) -> None:
    """Probe ``components`` and append the figures to the stage's probe.jsonl."""
    started = time.monotonic()
    figures, shown = probe(components, args.n_one, args.n_two, args.steps, args.guidance)
    record = {
        **info,
        "weights": "raw" if args.raw else "ema",
        "steps": args.steps,
        "guidance": args.guidance,
        "n_one": args.n_one,
        "n_two": args.n_two,
        **figures,
        "probe_s": round(time.monotonic() - started, 1),
    }
    with (run / args.unet_dir / "probe.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    if args.grid:
        images, prompts = zip(*shown, strict=True)
        grid(list(images), list(prompts)).save(args.grid)


def watch(run: Path, args: argparse.Namespace) -> None:
    """Probe each checkpoint of ``args.unet_dir`` at multiples of ``args.watch`` as training writes it."""
    manifest = json.loads((run / "manifest.json").read_text())
    last = manifest[args.unet_dir]["steps"]
    log = run / args.unet_dir / "probe.jsonl"
    done = {json.loads(line)["step"] for line in log.read_text().splitlines()} if log.exists() else set()
    while last not in done:
        for path in sorted((run / args.unet_dir).glob("ckpt-*.pt")):
            step = int(path.stem.split("-")[1])
            if step % args.watch == 0 and step not in done:
                try:
                    components, info = load_components(run, args.unet_dir, args.raw, step)
                except (FileNotFoundError, RuntimeError, EOFError):
                    continue  # deleted or still being written
                probe_and_record(run, args, components, info)
                done.add(step)
        time.sleep(20)


if __name__ == "__main__":
    main(sys.argv[1:])
