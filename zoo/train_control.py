"""Train a ShapesWorld control model on an exported base model:

    python zoo/train_control.py --condition canny                      # zoo/shapes-controlnet-canny
    python zoo/train_control.py --condition mask                       # zoo/shapes-controlnet-mask
    python zoo/train_control.py --kind t2i-adapter --condition sketch  # zoo/shapes-t2i-adapter-sketch

A ControlNet (Zhang et al. 2023) is copied from the base UNet's encoder (zero convolutions at zero); a T2I-Adapter
(Mou et al. 2023) is a small network trained from scratch whose features are added inside the encoder. Either is
trained with the base's epsilon loss while the base UNet and text encoder stay frozen; half the captions are
dropped (ControlNet sec. 3.2), so the model learns to read the condition alone. Conditions come from the world
(models/shapes/conditions.py): `canny` edges of the scene's image, the objects' `mask`, their outlines (`sketch`).

The base is any diffusers folder (``--base``, the bundled zoo by default); retraining the base means running this
again with the same command. The output is a diffusers ``ControlNetModel`` or ``T2IAdapter`` folder that loads in
``StableDiffusionControlNetPipeline`` / ``StableDiffusionAdapterPipeline``, with an ``atelier.json`` naming its
condition and base (what ``GET /v1/models`` shows). Checkpoints (``--work``) make a run resumable (``--resume``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel  # noqa: E402

from models.shapes.conditions import CONDITIONS, scene_condition  # noqa: E402
from models.shapes.world import caption, render, sample_scene  # noqa: E402
from zoo.addon_training import AddonLoop, FrozenBase, Schedule  # noqa: E402

logger = logging.getLogger("zoo.train_control")
KINDS = ("controlnet", "t2i-adapter")


@dataclass(frozen=True)
class ControlTrainParams:
    condition: str = "canny"
    kind: str = "controlnet"
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3  # the paper's 1e-5 is for a 361M-parameter copy; the tiny copy takes a larger step
    warmup: int = 100
    caption_dropout: float = 0.5  # sec. 3.2: half the prompts replaced by empty strings
    n_scenes: int = 8000
    seed: int = 0
    checkpoint_every: int = 250
    ema_decay: float = 0.0  # > 0: save the moving average of the weights (AddonLoop)


def render_conditioned(n_scenes: int, seed: int, condition: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scenes of the train split: images (N, 64, 64, 3) uint8, conditions (N, 64, 64, 3) uint8, captions."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    rng = np.random.default_rng([seed, 7])
    images = np.empty((n_scenes, 64, 64, 3), dtype=np.uint8)
    conditions = np.empty_like(images)
    captions: list[str] = []
    for index in range(n_scenes):
        scene = sample_scene(rng, split="train")
        rendered = render(scene)
        images[index] = rendered.image
        conditions[index] = scene_condition(rendered, condition)
        captions.append(caption(scene))
    return images, conditions, captions


def controlnet_for(unet: UNet2DConditionModel, latent_factor: int) -> ControlNetModel:
    """A ControlNet copied from `unet`, its condition embedding downsampling by the VAE's factor."""
    levels = int(np.log2(latent_factor)) + 1
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(16 * 2**i for i in range(levels)))


def adapter_for(unet: UNet2DConditionModel, latent_factor: int) -> T2IAdapter:
    """A T2I-Adapter with one feature map per encoder level of `unet`, downsampling by the VAE's factor."""
    channels = list(unet.config.block_out_channels)
    return T2IAdapter(3, channels, num_res_blocks=2, downscale_factor=latent_factor, adapter_type="full_adapter")


def unet_extras(
    model: ControlNetModel | T2IAdapter,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    cond: torch.Tensor,
) -> dict[str, object]:
    """The UNet's extra arguments from the control model being trained."""
    if isinstance(model, T2IAdapter):
        return {"down_intrablock_additional_residuals": list(model(cond))}
    down, mid = model(noisy, timesteps, embeds, controlnet_cond=cond, return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def train_controlnet(
    base: Path, out: Path, work: Path, params: ControlTrainParams, resume: bool, init: Path | None = None
) -> ControlNetModel | T2IAdapter:
    """Train a ControlNet or T2I-Adapter (`params.kind`) for the base model in `base`; save it (diffusers format)
    to `out`. `init`: a saved control model of the same kind to start from (a warm start, e.g. the bundled one,
    when a run continues on a machine without its checkpoints) instead of a fresh copy."""
    if params.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {params.kind!r}")
    # 1. The frozen base and the data: latents of the scenes, their conditions and caption states
    frozen = FrozenBase.load(base)
    images, conditions, captions = render_conditioned(params.n_scenes, params.seed, params.condition)
    latents = frozen.latents(images)
    factor = images.shape[1] // latents.shape[-1]
    hidden, _ = frozen.encode([*captions, ""])
    empty, hidden = hidden[-1], hidden[:-1]
    condition_pixels = torch.from_numpy(conditions).permute(0, 3, 1, 2)  # uint8, scaled per batch

    # 2. The control model, its loop, and a resume
    torch.manual_seed(params.seed)
    unet = frozen.unet
    if init is not None:
        controlnet = (ControlNetModel if params.kind == "controlnet" else T2IAdapter).from_pretrained(str(init)).train()
        logger.info("warm start from %s", init)
    else:
        controlnet = (controlnet_for if params.kind == "controlnet" else adapter_for)(unet, factor).train()
    schedule = Schedule(params.steps, params.lr, params.warmup, params.checkpoint_every, params.ema_decay)
    loop = AddonLoop(work, schedule, list(controlnet.parameters()), params.seed, 11, logger)
    if resume:
        loop.resume(controlnet, "controlnet")
    logger.info(
        "%s params %s, %d trainable parameters", params.kind, asdict(params), sum(p.numel() for p in loop.trainable)
    )

    # 3. Train: the base's epsilon loss with the control model's residuals or features added
    for step in range(loop.start, params.steps):
        index = loop.numpy_rng.integers(0, len(latents), params.batch_size)
        drop = torch.from_numpy(loop.numpy_rng.random(params.batch_size) < params.caption_dropout)
        embeds = torch.where(drop[:, None, None], empty[None], hidden[index])
        noisy, timesteps, noise = loop.noised(latents[index])
        cond = condition_pixels[index].float() / 255.0
        prediction = unet(noisy, timesteps, embeds, **unet_extras(controlnet, noisy, timesteps, embeds, cond)).sample
        loss = (prediction - noise).pow(2).mean()
        loop.step(step, loss, lambda: {"controlnet": controlnet.state_dict()})

    # 4. Save in diffusers' format (the moving average, when one was kept)
    loop.use_average()
    controlnet.eval().save_pretrained(str(out), safe_serialization=True)
    config_path = out / "config.json"  # a warm start's config names the folder it was loaded from: not ours to ship
    config = json.loads(config_path.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # What GET /v1/models shows for it: its condition type and the base model it was trained on.
    notes: dict[str, object] = {
        "kind": params.kind, "condition": params.condition, "base_model": base.name, "steps": params.steps
    }
    if params.ema_decay:
        notes["ema_decay"] = params.ema_decay
    if init is not None:  # the steps count from the model it started from, whatever that one learned
        prior = json.loads((init / "atelier.json").read_text()) if (init / "atelier.json").exists() else {}
        before = int(prior.get("steps", 0))
        notes.update(
            steps=before + params.steps,
            warm_start={"condition": prior.get("condition"), "steps_before": before, "steps": params.steps},
        )
    (out / "atelier.json").write_text(json.dumps(notes, indent=2) + "\n")
    logger.info("saved %s", out)
    return controlnet


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, default="controlnet")
    parser.add_argument("--condition", choices=CONDITIONS, default="canny")
    parser.add_argument("--base", default=str(REPO_ROOT / "zoo" / "shapes-sd-tiny"))
    parser.add_argument("--out", default=None, help="default: zoo/shapes-<kind>-<condition>")
    parser.add_argument("--work", default=None, help="checkpoints; default: zoo/_runs/<kind>-<condition>")
    parser.add_argument("--steps", type=int, default=ControlTrainParams.steps)
    parser.add_argument("--batch-size", type=int, default=ControlTrainParams.batch_size)
    parser.add_argument("--n-scenes", type=int, default=ControlTrainParams.n_scenes)
    parser.add_argument("--lr", type=float, default=ControlTrainParams.lr)
    parser.add_argument("--ema", type=float, default=0.0, help="moving-average decay of the saved weights (0: none)")
    parser.add_argument(
        "--caption-dropout",
        type=float,
        default=ControlTrainParams.caption_dropout,
        help="share of empty captions (the paper's 0.5; a ShapesWorld colour is in the caption only)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init", default=None, help="a saved control model to start from (a warm start)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    params = ControlTrainParams(
        condition=args.condition,
        kind=args.kind,
        steps=args.steps,
        batch_size=args.batch_size,
        n_scenes=args.n_scenes,
        lr=args.lr,
        ema_decay=args.ema,
        caption_dropout=args.caption_dropout,
    )
    out = Path(args.out or REPO_ROOT / "zoo" / f"shapes-{args.kind}-{args.condition}")
    work = Path(args.work or REPO_ROOT / "zoo" / "_runs" / f"{args.kind}-{args.condition}")
    init = Path(args.init) if args.init else None
    train_controlnet(Path(args.base), out, work, params, args.resume, init)


if __name__ == "__main__":
    main(sys.argv[1:])
