"""Train a GLIGEN variant of a ShapesWorld base model: ``python zoo/train_gligen.py``.

GLIGEN (Li et al., CVPR 2023) inserts a gated self-attention layer in every transformer block of a frozen UNet and
a position net that turns (phrase, box) pairs into grounding tokens; only those new layers are trained, with the
base's epsilon loss (sec. 3.2). The gates start closed (tanh(0) = 0), so the untrained variant is the base model.

Data come from the world: each scene's objects give one grounding token each, the phrase "a small red circle" and
its box (the object's pixel bounds over the image side). Captions name the objects without their positions in
`positionless_fraction` of the samples, so the boxes must say where things go; grounding is dropped for
`grounding_dropout` of the samples and the caption for `caption_dropout` (the paper drops both, sec. 3.2).

The output is a full diffusers model folder (the base's VAE, text encoder, tokenizer and scheduler, the GLIGEN
UNet) that loads in ``StableDiffusionGLIGENPipeline`` and is listed by ``GET /v1/models`` with the `gligen`
capability. Checkpoints (``--work``) make a run resumable (``--resume``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention import GatedSelfAttentionDense  # noqa: E402

from contract.domains import folder_domain, mark  # noqa: E402
from models.control.gligen import MAX_OBJECTS  # noqa: E402
from models.shapes.world import caption, object_phrase, positionless_caption, render, sample_scene  # noqa: E402
from zoo.addon_training import AddonLoop, FrozenBase, Schedule  # noqa: E402

logger = logging.getLogger("zoo.train_gligen")


@dataclass(frozen=True)
class GligenTrainParams:
    steps: int = 3000
    batch_size: int = 16
    lr: float = 5e-4
    warmup: int = 100
    positionless_fraction: float = 0.7
    grounding_dropout: float = 0.1
    caption_dropout: float = 0.1
    n_scenes: int = 8000
    seed: int = 0
    checkpoint_every: int = 250
    gate: float = 0.0  # see gligen_variant
    box_weight: float = 0.0  # > 0: the loss counts latent cells inside the objects' boxes 1 + box_weight times
    high_noise: float = 0.0  # share of timesteps drawn from the noisier half, where the layout is decided
    contrast: float = 0.0  # > 0: weight of the contrastive term (see contrastive_term)
    contrast_margin: float = 0.1  # the share by which the boxes must lower the error inside them
    base_lr_scale: float = 0.0  # > 0: the base UNet's own layers train too, at this times the rate (the paper: 0)
    fusers: str = "all"  # "mid": only the middle block's gated layer learns, the others stay closed (new_parameters)


@dataclass
class GroundedData:
    images: np.ndarray  # (N, 64, 64, 3) uint8
    captions: list[str]  # canonical captions
    positionless: list[str]
    phrases: list[list[str]]  # per scene, one per object
    boxes: np.ndarray  # (N, MAX_OBJECTS, 4) float32 in [0, 1]
    counts: np.ndarray  # (N,) objects per scene


def render_grounded(n_scenes: int, seed: int) -> GroundedData:
    rng = np.random.default_rng([seed, 13])
    images = np.empty((n_scenes, 64, 64, 3), dtype=np.uint8)
    boxes = np.zeros((n_scenes, MAX_OBJECTS, 4), dtype=np.float32)
    counts = np.zeros(n_scenes, dtype=np.int64)
    captions, positionless, phrases = [], [], []
    for index in range(n_scenes):
        scene = sample_scene(rng, split="train")
        rendered = render(scene)
        images[index] = rendered.image
        count = len(scene.objects)
        boxes[index, :count] = np.asarray(rendered.boxes, dtype=np.float32) / 64.0
        counts[index] = count
        captions.append(caption(scene))
        positionless.append(positionless_caption(scene))
        phrases.append([object_phrase(obj) for obj in scene.objects])
    return GroundedData(images, captions, positionless, phrases, boxes, counts)


def box_cells(boxes: torch.Tensor, masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, size, size) float: 1 on the latent cells inside any box of a present object, else 0.

    boxes: (B, N, 4) normalised (x0, y0, x1, y1); masks: (B, N), 1 where the slot holds an object."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    inside_x = (centres[None, None] >= boxes[..., 0:1]) & (centres[None, None] < boxes[..., 2:3])  # (B, N, size)
    inside_y = (centres[None, None] >= boxes[..., 1:2]) & (centres[None, None] < boxes[..., 3:4])
    cells = inside_y[..., :, None] & inside_x[..., None, :] & (masks[..., None, None] > 0)  # (B, N, size, size)
    return cells.any(dim=1, keepdim=True).float()


def contrastive_term(
    with_boxes: torch.Tensor, without_boxes: torch.Tensor, cells: torch.Tensor, margin: float
) -> torch.Tensor:
    """A loss only the boxes can lower: per sample, relu(log e_with - log e_without + log(1 / (1 - margin))), where
    e_* is the mean squared error inside the objects' boxes with the grounding given and with it masked out (the
    same noisy input). It is zero once the boxes lower the error inside them by `margin`; the error without boxes
    is kept honest by the plain loss on that pass too, so the term cannot be met by predicting worse without them.

    with_boxes, without_boxes: (B, C, h, w) squared errors; cells: (B, 1, h, w) from `box_cells`. Samples with no
    boxed cell (grounding dropped) count zero."""
    area = cells.sum(dim=(1, 2, 3)) * with_boxes.shape[1]
    present = area > 0
    if not present.any():
        return with_boxes.new_zeros(())
    e_with = (with_boxes * cells).sum(dim=(1, 2, 3))[present] / area[present]
    e_without = (without_boxes * cells).sum(dim=(1, 2, 3))[present] / area[present]
    gap = torch.log(e_with + 1e-8) - torch.log(e_without + 1e-8) - float(np.log(1.0 - margin))
    return torch.relu(gap).sum() / len(with_boxes)


def gligen_variant(unet: UNet2DConditionModel, gate: float = 0.0) -> UNet2DConditionModel:
    """`unet` with GLIGEN's gated layers and position net added.

    gate 0 is diffusers' (and the paper's) init: gates closed (tanh(0) = 0), so the attention and feed-forward
    layers behind them get no gradient until the gates themselves have opened. Two runs on this model stayed near
    closed (|alpha| <= 0.11 after 750-1,250 steps) and learnt no grounding. gate > 0 instead opens the gates to
    tanh(gate) and zero-initialises the layers' output projections, ControlNet's zero-convolution trick: the
    variant is still exactly the base model at step 0, and the layers learn from the first step."""
    gated = UNet2DConditionModel.from_config(dict(unet.config) | {"attention_type": "gated"})
    missing = gated.load_state_dict(unet.state_dict(), strict=False).missing_keys
    unexpected = [name for name in missing if "fuser" not in name and "position_net" not in name]
    if unexpected:
        raise RuntimeError(f"the gated UNet lacks base weights: {unexpected[:3]}")
    if gate > 0:
        with torch.no_grad():
            for fuser in (module for module in gated.modules() if isinstance(module, GatedSelfAttentionDense)):
                fuser.alpha_attn.fill_(gate)
                fuser.alpha_dense.fill_(gate)
                for projection in (fuser.attn.to_out[0], fuser.ff.net[-1]):
                    projection.weight.zero_()
                    projection.bias.zero_()
    return gated


def new_parameters(unet: UNet2DConditionModel, fusers: str = "all") -> list[torch.nn.Parameter]:
    """The GLIGEN layers that learn. fusers "mid": only the middle block's (the 4x4 level of the zoo's UNet, the
    only one whose tokens carry their position: `zoo/position_probe.py`); every other gated layer is closed
    (alpha 0, tanh(0) = 0: no effect) and frozen, so the variant stays a stock diffusers GLIGEN UNet."""
    if fusers not in ("all", "mid"):
        raise ValueError(f"fusers must be 'all' or 'mid', not {fusers!r}")
    learning = []
    for name, module in unet.named_modules():
        if not isinstance(module, GatedSelfAttentionDense):
            continue
        if fusers == "mid" and not name.startswith("mid_block."):
            with torch.no_grad():
                module.alpha_attn.zero_()
                module.alpha_dense.zero_()
            continue
        learning.append(module)
    return [p for module in [*learning, unet.position_net] for p in module.parameters()]


def train_gligen(base: Path, out: Path, work: Path, params: GligenTrainParams, resume: bool) -> UNet2DConditionModel:
    """Train the GLIGEN layers of a variant of the base model in `base`; save the model folder to `out`."""
    # 1. The frozen base and the data
    frozen = FrozenBase.load(base)
    data = render_grounded(params.n_scenes, params.seed)
    latents = frozen.latents(data.images)
    with_position, _ = frozen.encode(data.captions)
    without_position, _ = frozen.encode(data.positionless)
    empty = frozen.encode([""])[0][0]
    unique = sorted({phrase for scene in data.phrases for phrase in scene})
    pooled = dict(zip(unique, frozen.encode(unique)[1], strict=True))
    phrase_embeds = torch.zeros(params.n_scenes, MAX_OBJECTS, int(frozen.unet.config.cross_attention_dim))
    for index, scene in enumerate(data.phrases):
        for slot, phrase in enumerate(scene):
            phrase_embeds[index, slot] = pooled[phrase]
    boxes = torch.from_numpy(data.boxes)
    object_masks = (torch.arange(MAX_OBJECTS)[None] < torch.from_numpy(data.counts)[:, None]).float()

    # 2. The GLIGEN variant: only its new layers learn
    torch.manual_seed(params.seed)
    gligen = gligen_variant(frozen.unet, params.gate).train()
    gligen.requires_grad_(False)
    trainable = new_parameters(gligen, params.fusers)
    new = {id(parameter) for parameter in trainable}
    base_layers = [p for p in gligen.parameters() if id(p) not in new] if params.base_lr_scale > 0 else []
    for parameter in [*trainable, *base_layers]:
        parameter.requires_grad_(True)
    schedule = Schedule(params.steps, params.lr, params.warmup, params.checkpoint_every)
    loop = AddonLoop(work, schedule, trainable, params.seed, 17, logger, base_layers, params.base_lr_scale)
    if resume:
        loop.resume(gligen, "unet")
    logger.info("GLIGEN params %s, %d trainable parameters", asdict(params), sum(p.numel() for p in trainable))

    # 3. Train
    rng = loop.numpy_rng
    contrast_sum = 0.0
    for step in range(loop.start, params.steps):
        index = torch.from_numpy(rng.integers(0, params.n_scenes, params.batch_size))
        positionless = torch.from_numpy(rng.random(params.batch_size) < params.positionless_fraction)
        drop_caption = torch.from_numpy(rng.random(params.batch_size) < params.caption_dropout)
        keep_grounding = torch.from_numpy(rng.random(params.batch_size) >= params.grounding_dropout)
        embeds = torch.where(positionless[:, None, None], without_position[index], with_position[index])
        embeds = torch.where(drop_caption[:, None, None], empty[None], embeds)
        noisy, timesteps, noise = loop.noised(latents[index], params.high_noise)
        grounding = {
            "boxes": boxes[index],
            "positive_embeddings": phrase_embeds[index],
            "masks": object_masks[index] * keep_grounding[:, None].float(),
        }
        prediction = gligen(noisy, timesteps, embeds, cross_attention_kwargs={"gligen": grounding}).sample
        error = (prediction - noise).pow(2)
        cells = box_cells(grounding["boxes"], grounding["masks"], error.shape[-1])
        contrast = None
        if params.contrast > 0:
            ungrounded = grounding | {"masks": torch.zeros_like(grounding["masks"])}
            without = gligen(noisy, timesteps, embeds, cross_attention_kwargs={"gligen": ungrounded}).sample
            error_without = (without - noise).pow(2)
            contrast = contrastive_term(error, error_without, cells, params.contrast_margin)
        if params.box_weight > 0:
            weight = 1 + params.box_weight * cells
            error = error * (weight / weight.mean(dim=(2, 3), keepdim=True))
        loss = error.mean()
        if contrast is not None:
            loss = loss + error_without.mean() + params.contrast * contrast
            contrast_sum += contrast.item()
            if (step + 1) % 50 == 0:
                logger.info("step %d contrastive term %.4f", step + 1, contrast_sum / 50)
                contrast_sum = 0.0
        loop.step(step, loss, lambda: {"unet": gligen.state_dict()})

    # 4. Save a full model folder: the base's other parts, the GLIGEN UNet
    if out.exists():
        shutil.rmtree(out)
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(base / part, out / part)
    index_file = json.loads((base / "model_index.json").read_text())
    (out / "model_index.json").write_text(
        json.dumps(index_file | {"_class_name": "StableDiffusionGLIGENPipeline"}, indent=2)
    )
    gligen.eval().save_pretrained(str(out / "unet"), safe_serialization=True)
    mark(out, folder_domain(base), kind="gligen", base_model=base.name, steps=params.steps)
    logger.info("saved %s", out)
    return gligen


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(REPO_ROOT / "zoo" / "shapes-sd-tiny"))
    parser.add_argument("--out", default=str(REPO_ROOT / "zoo" / "shapes-sd-gligen"))
    parser.add_argument("--work", default=str(REPO_ROOT / "zoo" / "_runs" / "gligen"))
    parser.add_argument("--steps", type=int, default=GligenTrainParams.steps)
    parser.add_argument("--batch-size", type=int, default=GligenTrainParams.batch_size)
    parser.add_argument("--n-scenes", type=int, default=GligenTrainParams.n_scenes)
    parser.add_argument("--lr", type=float, default=GligenTrainParams.lr)
    parser.add_argument("--gate", type=float, default=GligenTrainParams.gate, help="initial gate (see gligen_variant)")
    parser.add_argument("--box-weight", type=float, default=0.0, help="extra loss weight inside the boxes")
    parser.add_argument("--high-noise", type=float, default=0.0, help="share of t from the noisier half")
    parser.add_argument("--contrast", type=float, default=0.0, help="weight of the contrastive term")
    parser.add_argument(
        "--base-lr-scale", type=float, default=0.0, help="> 0: the base UNet trains too, at this times --lr"
    )
    parser.add_argument("--contrast-margin", type=float, default=GligenTrainParams.contrast_margin)
    parser.add_argument("--positionless", type=float, default=GligenTrainParams.positionless_fraction)
    parser.add_argument(
        "--fusers", choices=("all", "mid"), default="all", help="mid: only the middle block's gated layer learns"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    params = GligenTrainParams(
        steps=args.steps,
        batch_size=args.batch_size,
        n_scenes=args.n_scenes,
        lr=args.lr,
        gate=args.gate,
        box_weight=args.box_weight,
        high_noise=args.high_noise,
        positionless_fraction=args.positionless,
        contrast=args.contrast,
        contrast_margin=args.contrast_margin,
        base_lr_scale=args.base_lr_scale,
        fusers=args.fusers,
    )
    train_gligen(Path(args.base), Path(args.out), Path(args.work), params, args.resume)


if __name__ == "__main__":
    main(sys.argv[1:])
