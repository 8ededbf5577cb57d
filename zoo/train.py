"""Train the bundled ShapesWorld model zoo: ``python zoo/train.py <stage> --run NAME``.

Stages, each resumable and seeded (``all`` runs the missing ones in order; ``make zoo`` calls it):

    tokenizer  CLIP-format BPE tokenizer from the world's vocabulary
    data       render training and held-out scenes, tokenize their captions
    vae        train AutoencoderKL (--resume continues from the newest checkpoint)
    latents    cache VAE posterior means of the training scenes, set scaling_factor
    text       pre-train CLIPTextModel to read every attribute the caption states (zoo/train_text.py)
    unet       train UNet2DConditionModel, with the text encoder from scratch jointly, or from the
               text stage (--text-init text) frozen (--text-lr-mult 0) or slowed (--text-lr-mult 0.1)
    export     write zoo/shapes-sd-tiny/ (diffusers layout, safetensors) and its README.md
    pack       copy what a resume on a fresh machine needs into zoo/checkpoints/<--pack> (committed)
    unpack     lay such a pack out as the run; then data, latents and unet --resume continue it

Runs live in zoo/_runs/<name>/ (git-ignored). CPU by default, CUDA when present.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

# Idle OpenMP threads must sleep, not spin: on a shared 2-core machine spinning threads made a VAE step
# 6-10x slower (0.5 s -> 6 s measured) whenever another process held a core. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from zoo.configs import PRESETS, ZooConfig, build_text_encoder, build_unet, count_parameters, latent_size  # noqa: E402
from zoo.data import empty_token_ids, encode_latents, load_data, render_scenes, save_data, tokenize  # noqa: E402
from zoo.export import export_run  # noqa: E402
from zoo.resume import pack, unpack  # noqa: E402
from zoo.runs import run_dir  # noqa: E402
from zoo.tokenizer import build_tokenizer  # noqa: E402
from zoo.train_text import TextTrainParams, train_text_encoder  # noqa: E402
from zoo.train_unet import UnetTrainParams, make_eval_batch, train_unet  # noqa: E402
from zoo.train_vae import VaeTrainParams, train_vae  # noqa: E402

logger = logging.getLogger("zoo.train")
DEFAULT_OUT = REPO_ROOT / "zoo" / "shapes-sd-tiny"
EVAL_SEED_OFFSET = 1_000_003


def read_manifest(run: Path) -> dict[str, Any]:
    """The run's manifest (empty if the run is new)."""
    path = run / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(run: Path, manifest: dict[str, Any]) -> None:
    """Persist the manifest."""
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def record_command(run: Path, argv: list[str]) -> None:
    """Append the command line to the manifest, so the model card can list how the model was made."""
    manifest = read_manifest(run)
    manifest.setdefault("commands", []).append("python zoo/train.py " + shlex.join(argv))
    write_manifest(run, manifest)


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def stage_tokenizer(run: Path, args: argparse.Namespace) -> CLIPTokenizer:
    """Stage 1: build the tokenizer and fix the model sizes in the manifest."""
    from models.shapes.world import vocabulary

    manifest = read_manifest(run)
    if "config" in manifest and manifest.get("preset") != args.preset:
        raise ValueError(f"run {run.name} uses preset {manifest.get('preset')!r}, not {args.preset!r}")
    config = PRESETS[args.preset]
    tokenizer = build_tokenizer(vocabulary(), run / "tokenizer", model_max_length=config.text.max_length)
    manifest.update({"preset": args.preset, "config": config.to_dict()})
    write_manifest(run, manifest)
    return tokenizer


def stage_data(run: Path, args: argparse.Namespace) -> None:
    """Stage 2: render and tokenize the training and held-out scenes."""
    tokenizer = CLIPTokenizer.from_pretrained(str(run / "tokenizer"))
    train = tokenize(tokenizer, render_scenes(args.n_scenes, args.data_seed, args.n_variants))
    save_data(train, run / "data.npz")
    held_out = tokenize(tokenizer, render_scenes(args.n_eval, args.data_seed + EVAL_SEED_OFFSET, 1))
    save_data(held_out, run / "eval.npz")
    manifest = read_manifest(run)
    manifest["data"] = {
        "n_scenes": args.n_scenes,
        "n_variants": args.n_variants,
        "seed": args.data_seed,
        "n_eval": args.n_eval,
        "example_captions": train.captions[0],
    }
    write_manifest(run, manifest)


def stage_vae(run: Path, args: argparse.Namespace) -> None:
    """Stage 3: train the VAE and save it in diffusers format under vae/final."""
    config = ZooConfig.from_dict(read_manifest(run)["config"])
    params = VaeTrainParams(
        steps=args.vae_steps,
        batch_size=args.vae_batch_size,
        seed=args.seed,
        lr=args.vae_lr,
        edge_weight=args.vae_edge_weight,
        init=args.vae_init,
        decoder_only=args.vae_decoder_only,
    )
    cached = None
    if params.decoder_only:
        # The latents stage's cache holds exactly the init encoder's means of these images.
        cached = torch.load(run / "latents.pt", weights_only=True)["latents"]
    vae = train_vae(
        config.vae,
        params,
        load_data(run / "data.npz").images,
        load_data(run / "eval.npz").images,
        run / args.vae_dir,
        run / args.vae_dir / "metrics.jsonl",
        args.resume,
        pick_device(args.device),
        cached,
    )
    if params.decoder_only:  # keep the scaling factor the cached latents were normalised with
        vae.register_to_config(scaling_factor=read_manifest(run)["scaling_factor"])
    vae.save_pretrained(str(run / args.vae_dir / "final"), safe_serialization=True)
    manifest = read_manifest(run)
    manifest[args.vae_dir] = asdict(params)
    manifest["vae_params"] = count_parameters(vae)
    write_manifest(run, manifest)


def stage_latents(run: Path, args: argparse.Namespace) -> None:
    """Stage 4: cache latents of all scenes and set the VAE's scaling_factor to 1 / their std."""
    vae = AutoencoderKL.from_pretrained(str(run / "vae" / "final"))
    latents = encode_latents(vae, load_data(run / "data.npz").images)
    eval_latents = encode_latents(vae, load_data(run / "eval.npz").images)
    scaling_factor = float(1.0 / latents.std())
    torch.save(
        {"latents": latents, "eval_latents": eval_latents, "scaling_factor": scaling_factor},
        run / "latents.pt",
    )
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(str(run / "vae" / "final"), safe_serialization=True)
    manifest = read_manifest(run)
    manifest["scaling_factor"] = scaling_factor
    manifest["latent_mean"] = float(latents.mean())
    write_manifest(run, manifest)
    logger.info(
        "cached %s latents, std %.4f -> scaling_factor %.5f",
        tuple(latents.shape),
        1 / scaling_factor,
        scaling_factor,
    )


def stage_text(run: Path, args: argparse.Namespace) -> None:
    """Stage 5: pre-train the text encoder on the captions alone; saved under text/final."""
    config = ZooConfig.from_dict(read_manifest(run)["config"])
    tokenizer = CLIPTokenizer.from_pretrained(str(run / "tokenizer"))
    train, held_out = load_data(run / "data.npz"), load_data(run / "eval.npz")
    assert train.token_ids is not None and held_out.token_ids is not None
    params = TextTrainParams(seed=args.seed, **({"steps": args.text_steps} if args.text_steps else {}))
    torch.manual_seed(args.seed)
    text_encoder = build_text_encoder(
        config.text, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    accuracy = train_text_encoder(
        text_encoder,
        params,
        train.token_ids,
        train.captions,
        empty_token_ids(tokenizer),
        held_out.token_ids,
        held_out.captions,
        run / "metrics.jsonl",
    )
    text_encoder.save_pretrained(str(run / "text" / "final"), safe_serialization=True)
    manifest = read_manifest(run)
    manifest["text"] = {**asdict(params), "held_out_all_heads": accuracy}
    write_manifest(run, manifest)


def stage_unet(run: Path, args: argparse.Namespace) -> None:
    """Stage 5: train UNet + text encoder on the cached latents."""
    manifest = read_manifest(run)
    config = ZooConfig.from_dict(manifest["config"])
    tokenizer = CLIPTokenizer.from_pretrained(str(run / "tokenizer"))
    cache = torch.load(run / "latents.pt", weights_only=True)
    scale = cache["scaling_factor"]
    train, held_out = load_data(run / "data.npz"), load_data(run / "eval.npz")
    empty_ids = torch.from_numpy(empty_token_ids(tokenizer))
    assert train.token_ids is not None and held_out.token_ids is not None
    eval_batch = make_eval_batch(cache["eval_latents"] * scale, torch.from_numpy(held_out.token_ids[:, 0]), empty_ids)
    device = pick_device(args.device)

    torch.manual_seed(args.seed)
    text_encoder = build_text_encoder(
        config.text, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    unet = build_unet(config.unet, config.text.hidden_size, latent_size(config.vae))
    logger.info("UNet %d params, text encoder %d params", count_parameters(unet), count_parameters(text_encoder))
    chosen = {f.name: getattr(args, f.name) for f in fields(UnetTrainParams) if f.name != "seed"}
    params = UnetTrainParams(seed=args.seed, **{name: value for name, value in chosen.items() if value is not None})
    if params.text_init:
        # The pre-trained encoder replaces the fresh one (drawn first all the same, so the UNet's
        # initial weights do not depend on the choice).
        text_encoder = CLIPTextModel.from_pretrained(str(run / params.text_init / "final"))
    out_dir = run / args.unet_dir
    manifest = read_manifest(run)
    manifest[args.unet_dir] = asdict(params)
    write_manifest(run, manifest)
    train_unet(
        unet,
        text_encoder,
        params,
        cache["latents"] * scale,
        torch.from_numpy(train.token_ids),
        empty_ids,
        eval_batch.to(device),
        out_dir,
        out_dir / "metrics.jsonl",
        args.resume,
        device,
        stop_after=args.stop_after,
    )


def stage_pack(run: Path, args: argparse.Namespace) -> None:
    """Write what a resume on another machine needs into zoo/checkpoints/<--pack> (zoo/resume.py)."""
    out = pack(run, args.unet_dir, args.pack)
    logger.info("packed %s/%s into %s", run.name, args.unet_dir, out)


def stage_unpack(run: Path, args: argparse.Namespace) -> None:
    """Lay zoo/checkpoints/<--pack> out as this run; then run data, latents and unet --resume."""
    info = unpack(args.pack, run)
    logger.info("unpacked %s at step %d into %s/%s", args.pack, info["step"], run.name, info["unet_dir"])


def stage_export(run: Path, args: argparse.Namespace) -> None:
    """Stage 6: write the diffusers directory and model card."""
    export_run(run, Path(args.out), args.unet_dir, use_ema=not args.no_ema)


STAGES = {
    "tokenizer": stage_tokenizer,
    "data": stage_data,
    "vae": stage_vae,
    "latents": stage_latents,
    "text": stage_text,
    "unet": stage_unet,
    "export": stage_export,
    "pack": stage_pack,
    "unpack": stage_unpack,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line: one stage (or ``all``) and its options; unset options keep the dataclass defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, "all"])
    parser.add_argument("--run", default="shapes-sd-tiny", help="run name under zoo/_runs/")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--n-scenes", type=int, default=40000)
    parser.add_argument("--n-variants", type=int, default=4)
    parser.add_argument("--n-eval", type=int, default=64)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-edge-weight", type=float, default=0.0)
    parser.add_argument("--vae-init", default="", help="VAE stage: fine-tune this AutoencoderKL folder")
    parser.add_argument("--vae-decoder-only", action="store_true", help="VAE stage: train the decoder alone")
    parser.add_argument("--vae-dir", default="vae", help="subdirectory of the VAE stage (A/B runs)")
    parser.add_argument("--text-steps", type=int, default=None, help="text stage: optimizer steps")
    parser.add_argument("--stop-after", type=int, default=None, help="UNet stage: stop at this step")
    parser.add_argument("--unet-dir", default="unet", help="subdirectory of the UNet stage (A/B runs)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--pack", default="shapes-sd-v2", help="pack/unpack: name under zoo/checkpoints/")
    parser.add_argument("--no-ema", action="store_true", help="export raw instead of EMA weights")
    for field in fields(UnetTrainParams):
        if field.name != "seed":
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)
    args = parser.parse_args(argv)
    return args


def main(argv: list[str]) -> None:
    """Run one stage, or all stages that have not finished yet."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    run = run_dir(args.run)
    file_handler = logging.FileHandler(run / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(file_handler)
    record_command(run, argv)
    if args.stage != "all":
        STAGES[args.stage](run, args)
        return
    done = {
        "tokenizer": (run / "tokenizer" / "vocab.json").exists(),
        "data": (run / "eval.npz").exists(),
        "vae": (run / "vae" / "final").exists(),
        "latents": (run / "latents.pt").exists(),
        "text": (run / "text" / "final").exists(),
        "unet": False,
        "export": False,
        "pack": True,
        "unpack": True,
    }
    args.resume = True
    for name, stage in STAGES.items():
        if not done[name]:
            logger.info("stage %s", name)
            stage(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
