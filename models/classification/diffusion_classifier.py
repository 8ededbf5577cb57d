"""Diffusion Classifier (Li et al., "Your Diffusion Model is Secretly a Zero-Shot Classifier", ICCV 2023).

A text-to-image model scores a class prompt c on an image x by its denoising error
    err(c) = E_{t, eps} || eps - eps_theta(x_t, t, c) ||^2,   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
and the class with the smallest error wins (sec. 3.1, eq. 6: p(c_i | x) = softmax_i(-err(c_i)) with the
squared error summed over the latent's dimensions). Implemented as in the paper:
- one Monte Carlo plan of (timestep, noise) pairs per job, the same for every class (sec. 3.2: "use the
  same (t, eps) for every class", which cancels most of the estimate's variance in the comparison) and,
  here, for every image of the job, so a result does not depend on the other images of the request;
- timesteps spread uniformly over [t_min, t_max): sample j has u_j = frac(1/2 + j / phi), t_j = t_min +
  floor(u_j (t_max - t_min)). Every prefix of this (Weyl) sequence is spread evenly over the range, so
  stage k of the adaptive schedule and the naive protocol at any budget all use "evenly spaced" timesteps;
- classes evaluated in batches: one UNet forward takes the same noisy latent x_{t_j} with many class
  embeddings (items are (sample, class) pairs, `batch_size` per forward);
- the adaptive schedule (Algorithm 2): stage 1 scores every class with `samples_per_stage[0]` samples,
  keeps the `keep_per_stage[0]` best, stage 2 adds `samples_per_stage[1]` samples for the survivors, and
  so on; one stage with no keep list is the naive protocol (the same budget for every class);
- error weighting: "uniform" (the paper's choice, sec. 5.3) or "vlb", the weights of the DDPM variational
  bound's L_{t-1} term, beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) with sigma_t^2 = beta_t;
- the error is measured in the model's own target, the objective it was trained on: eps for an eps-prediction
  model, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 for a v-prediction one (SD 2.x 768), through
  `models.common.prediction.training_target`. "vlb" then multiplies its weights by abar_t (eps - eps_hat =
  sqrt(abar_t) (v - v_hat)), so it still weights the bound's noise error.
Only conditional errors are needed (no guidance). Not implemented: the L1 / Huber error metrics of the
paper's ablation, and fitting a timestep-weighting on held-out data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from models.common.checks import check_image
from models.common.components import Components, MethodOutput, ProgressCallback, no_progress
from models.common.latents import encode, images_to_tensor, randn
from models.common.prediction import epsilon_error_scale, training_target
from models.common.text import check_prompt, encode_prompts

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 1 / phi: the Weyl sequence's step
WEIGHTINGS = ("uniform", "vlb")


@dataclass(frozen=True)
class Params:
    """Classes are `prompts`, or `class_names` put into `template` ("a {} on a light background")."""

    prompts: Sequence[str] = ()
    class_names: Sequence[str] = ()
    template: str = "{}"
    samples_per_stage: Sequence[int] = (4, 28)
    keep_per_stage: Sequence[int] = (5,)
    t_min: int = 0
    t_max: int = 1000
    error_weighting: str = "uniform"
    batch_size: int = 64


@dataclass(frozen=True)
class Plan:
    """The shared Monte Carlo plan: timesteps (N,) long, noises (N, C, h, w), weights (N,) float32."""

    timesteps: torch.Tensor
    noises: torch.Tensor
    weights: torch.Tensor


@dataclass
class Estimate:
    """Per-class running sums over the samples a class got, for one image."""

    weighted_error: torch.Tensor  # (K,) sum_j w_j err_cj
    weight: torch.Tensor  # (K,) sum_j w_j
    samples: torch.Tensor  # (K,) long: samples each class got
    stage_reached: torch.Tensor  # (K,) long: the last stage a class took part in (0-based)
    evaluations: int = 0
    stage_errors: list[dict[int, float]] = field(default_factory=list)

    @property
    def error(self) -> torch.Tensor:
        """(K,) weighted mean squared error per latent dimension; inf for a class with no sample."""
        return torch.where(self.weight > 0, self.weighted_error / self.weight.clamp_min(1e-12), torch.inf)


def class_prompts(params: Params) -> list[str]:
    """The prompt of every class: `prompts`, or each class name put into `template`."""
    if params.prompts and params.class_names:
        raise ValueError("give either prompts or class_names, not both")
    if params.class_names:
        if params.template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one {{}}, got {params.template!r}")
        return [params.template.format(name) for name in params.class_names]
    return list(params.prompts or ())


def class_labels(params: Params) -> list[str]:
    """What the result calls each class: its name, or its prompt."""
    return list(params.class_names) if params.class_names else list(params.prompts or ())


def check_schedule(n_classes: int, samples_per_stage: Sequence[int], keep_per_stage: Sequence[int]) -> None:
    """Raise ValueError unless the stages are well formed: >= 1 sample each, one keep per stage but the
    last, keeps >= 1 and non-increasing."""
    if not samples_per_stage:
        raise ValueError("samples_per_stage needs at least one stage")
    if any(n < 1 for n in samples_per_stage):
        raise ValueError(f"samples_per_stage must all be >= 1, got {list(samples_per_stage)}")
    if len(keep_per_stage) != len(samples_per_stage) - 1:
        raise ValueError(
            f"keep_per_stage needs one entry per stage but the last ({len(samples_per_stage) - 1}), "
            f"got {len(keep_per_stage)}"
        )
    if any(k < 1 for k in keep_per_stage) or any(
        b > a for a, b in zip(keep_per_stage, keep_per_stage[1:], strict=False)
    ):
        raise ValueError(f"keep_per_stage must be >= 1 and non-increasing, got {list(keep_per_stage)}")
    if n_classes < 2:
        raise ValueError(f"at least 2 classes are needed, got {n_classes}")


def stage_sizes(n_classes: int, keep_per_stage: Sequence[int], n_stages: int) -> list[int]:
    """Classes evaluated in each stage: all of them, then min(keep, classes left) after each stage."""
    sizes = [n_classes]
    for keep in keep_per_stage[: n_stages - 1]:
        sizes.append(min(keep, sizes[-1]))
    return sizes


def planned_evaluations(n_classes: int, samples_per_stage: Sequence[int], keep_per_stage: Sequence[int]) -> int:
    """UNet evaluations per image of a schedule: sum over stages of classes evaluated x samples added."""
    sizes = stage_sizes(n_classes, keep_per_stage, len(samples_per_stage))
    return sum(size * n for size, n in zip(sizes, samples_per_stage, strict=True))


def timestep_sequence(n: int, t_min: int, t_max: int) -> torch.Tensor:
    """(n,) long: t_j = t_min + floor(frac(1/2 + j / phi) (t_max - t_min)); every prefix is evenly spread."""
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
    fractions = torch.remainder(0.5 + torch.arange(n, dtype=torch.float64) * GOLDEN, 1.0)
    return (t_min + torch.floor(fractions * (t_max - t_min))).long().clamp(t_min, t_max - 1)


def timestep_weights(components: Components, timesteps: torch.Tensor, weighting: str) -> torch.Tensor:
    """(N,) float32 weights of each sample's error: 1 ("uniform"), or the DDPM bound's
    beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) with sigma_t^2 = beta_t ("vlb"), scaled to mean 1. The bound
    weights the noise's error; for a model with another target (v) the weight carries the factor that turns
    that target's error into the noise's (`epsilon_error_scale`)."""
    if weighting == "uniform":
        return torch.ones(len(timesteps), dtype=torch.float32)
    if weighting != "vlb":
        raise ValueError(f"error_weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    scheduler = components.ddim()
    betas = scheduler.betas.double()[timesteps]
    alphas = 1.0 - betas
    alphas_cumprod = scheduler.alphas_cumprod.double()[timesteps]
    weights = betas / (2.0 * alphas * (1.0 - alphas_cumprod)) * epsilon_error_scale(scheduler, timesteps)
    return (weights / weights.mean()).float()


def make_plan(
    components: Components, params: Params, latent_shape: tuple[int, ...], generator: torch.Generator
) -> Plan:
    """The (t, eps) pairs every class and image shares: as many as a class can get (the sum of the stages)."""
    n = sum(params.samples_per_stage)
    timesteps = timestep_sequence(n, params.t_min, params.t_max)
    noises = randn((n, *latent_shape), generator, components.device, components.dtype)
    return Plan(timesteps, noises, timestep_weights(components, timesteps, params.error_weighting))


def sample_errors(
    components: Components,
    clean: torch.Tensor,
    embeddings: torch.Tensor,
    plan: Plan,
    samples: Sequence[int],
    classes: Sequence[int],
    batch_size: int,
    callback: ProgressCallback = no_progress,
) -> torch.Tensor:
    """|| y_j - f_theta(x_{t_j}, t_j, c) ||^2 / dims for every sample j in `samples` and class c in `classes`, with
    y_j the model's target for (x_0, eps_j, t_j): eps_j, or the velocity for a v-prediction model.

    clean: (1, C, h, w) latent of the image; embeddings: (K, L, D) of all classes. Items (j, c) go through the
    UNet `batch_size` at a time, sample-major, so one forward holds one noisy latent x_{t_j} with many class
    prompts. callback(done, total) after each forward, counting items. Returns (len(samples), len(classes)).
    """
    scheduler = components.ddim()
    pairs = [(j, c) for j in samples for c in classes]
    errors = torch.empty(len(pairs), dtype=torch.float32)
    noisy_cache: dict[int, torch.Tensor] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        for j, _ in chunk:
            if j not in noisy_cache:
                noisy_cache[j] = scheduler.add_noise(clean, plan.noises[j : j + 1], plan.timesteps[j : j + 1])
        noisy = torch.cat([noisy_cache[j] for j, _ in chunk])
        timesteps = plan.timesteps[[j for j, _ in chunk]].to(components.device)
        states = embeddings[[c for _, c in chunk]]
        predicted = components.unet(noisy, timesteps, encoder_hidden_states=states).sample
        target = training_target(scheduler, clean, plan.noises[[j for j, _ in chunk]], timesteps)
        errors[start : start + len(chunk)] = (target.float() - predicted.float()).pow(2).flatten(1).mean(1).cpu()
        callback(start + len(chunk), len(pairs))
    return errors.reshape(len(samples), len(classes))


def classify_latent(
    components: Components,
    clean: torch.Tensor,
    embeddings: torch.Tensor,
    plan: Plan,
    params: Params,
    callback: ProgressCallback = no_progress,
) -> Estimate:
    """The adaptive schedule (Algorithm 2) for one image's latent `clean` (1, C, h, w) over K classes.

    Stage s adds samples [sum(samples_per_stage[:s]), sum(samples_per_stage[:s+1])) of the plan for the
    classes still in, then keeps the keep_per_stage[s] with the smallest error so far. callback(evaluations
    done, evaluations planned) after each UNet forward.
    """
    n_classes = embeddings.shape[0]
    sizes = stage_sizes(n_classes, params.keep_per_stage, len(params.samples_per_stage))
    total = planned_evaluations(n_classes, params.samples_per_stage, params.keep_per_stage)
    estimate = Estimate(
        weighted_error=torch.zeros(n_classes, dtype=torch.float64),
        weight=torch.zeros(n_classes, dtype=torch.float64),
        samples=torch.zeros(n_classes, dtype=torch.long),
        stage_reached=torch.zeros(n_classes, dtype=torch.long),
    )
    alive = list(range(n_classes))
    first = 0
    for stage, n_new in enumerate(params.samples_per_stage):
        if stage > 0:  # keep the best classes so far (smallest error; ties by class index)
            error = estimate.error
            alive = sorted(alive, key=lambda c: (float(error[c]), c))[: sizes[stage]]
        samples = list(range(first, first + n_new))
        done = estimate.evaluations

        def report(step: int, stage_total: int, done: int = done) -> None:
            callback(done + step, total)

        errors = sample_errors(components, clean, embeddings, plan, samples, alive, params.batch_size, report)
        weights = plan.weights[samples].double()
        estimate.weighted_error[alive] += (weights[:, None] * errors.double()).sum(0)
        estimate.weight[alive] += weights.sum()
        estimate.samples[alive] += n_new
        estimate.stage_reached[alive] = stage
        estimate.evaluations += len(samples) * len(alive)
        estimate.stage_errors.append({c: float(estimate.error[c]) for c in alive})
        first += n_new
    return estimate


def ranking(estimate: Estimate, latent_dims: int) -> tuple[list[int], torch.Tensor]:
    """Classes best first (the later the stage a class reached, the better; then the smaller its error),
    and scores: softmax over classes of -latent_dims * error, the paper's eq. 6 with the squared error
    summed over the latent's dimensions (each class at its own estimate)."""
    error = estimate.error
    order = sorted(range(len(error)), key=lambda c: (-int(estimate.stage_reached[c]), float(error[c]), c))
    scores = torch.softmax(-latent_dims * error.double(), dim=0)
    return order, scores


@torch.no_grad()
def run(
    components: Components,
    params: Params,
    inputs: dict[str, object],
    *,
    generator: torch.Generator,
    callback: ProgressCallback = no_progress,
) -> MethodOutput:
    """Rank the classes for `inputs["image"]` (one PIL image) or each of `inputs["images"]` (a list).

    result: {"classes", "results": [one per image: {"predicted", "predicted_index", "ranking": [{"class",
    "index", "prompt", "error", "score", "samples", "stage"}, ...] best first, "unet_evaluations",
    "seconds"}], "unet_evaluations", "seconds"}. Progress counts UNet evaluations over all images.
    """
    # 1. Check inputs
    started = time.perf_counter()
    images = _input_images(inputs)
    prompts = class_prompts(params)
    labels = class_labels(params)
    check_schedule(len(prompts), params.samples_per_stage, params.keep_per_stage)
    if params.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {params.batch_size}")
    limit = int(components.scheduler_config.get("num_train_timesteps", 1000))
    if not 0 <= params.t_min < params.t_max <= limit:
        raise ValueError(f"need 0 <= t_min < t_max <= {limit}, got t_min={params.t_min}, t_max={params.t_max}")
    if params.error_weighting not in WEIGHTINGS:
        raise ValueError(f"error_weighting must be one of {WEIGHTINGS}, got {params.error_weighting!r}")
    for index, prompt in enumerate(prompts):
        check_prompt(components.tokenizer, prompt, f"class {index} prompt")
    for index, image in enumerate(images):
        check_image(components, image, f"image {index}")
    if len({image.size for image in images}) > 1:
        raise ValueError(f"images must all have the same size, got {sorted({image.size for image in images})}")
    per_image = planned_evaluations(len(prompts), params.samples_per_stage, params.keep_per_stage)

    # 2. Encode the class prompts (K, L, D) and the images (B, C, h, w)
    embeddings = encode_prompts(components.text_encoder, components.tokenizer, prompts)
    latents = encode(components.vae, images_to_tensor(images))

    # 3. One (t, eps) plan for every class and every image
    plan = make_plan(components, params, tuple(latents.shape[1:]), generator)

    # 4. The adaptive schedule per image
    results = []
    for index in range(len(images)):
        image_started = time.perf_counter()

        def report(step: int, total: int, done: int = index * per_image) -> None:
            callback(done + step, per_image * len(images))

        estimate = classify_latent(components, latents[index : index + 1], embeddings, plan, params, report)
        order, scores = ranking(estimate, latents[0].numel())
        results.append(
            {
                "predicted": labels[order[0]],
                "predicted_index": order[0],
                "ranking": [
                    {
                        "class": labels[c],
                        "index": c,
                        "prompt": prompts[c],
                        "error": round(float(estimate.error[c]), 6),
                        "score": float(scores[c]),
                        "samples": int(estimate.samples[c]),
                        "stage": int(estimate.stage_reached[c]) + 1,
                    }
                    for c in order
                ],
                "unet_evaluations": estimate.evaluations,
                "seconds": round(time.perf_counter() - image_started, 4),
            }
        )

    # 5. The answer
    evaluations = sum(int(r["unet_evaluations"]) for r in results)  # type: ignore[call-overload]
    seconds = round(time.perf_counter() - started, 4)
    result = {"classes": labels, "results": results, "unet_evaluations": evaluations, "seconds": seconds}
    metrics: dict[str, float | int | str] = {
        "classes": len(prompts),
        "images": len(images),
        "stages": len(params.samples_per_stage),
        "unet_evaluations": evaluations,
        "unet_evaluations_per_image": per_image,
    }
    return MethodOutput(result=result, metrics=metrics)


def _input_images(inputs: dict[str, object]) -> list[Image.Image]:
    """`inputs["images"]` (a list) or `inputs["image"]` as a list; ValueError if neither or both."""
    single, many = inputs.get("image"), inputs.get("images")
    if (single is None) == (not many):
        raise ValueError("give either image or images (a non-empty list), not both")
    given: list[object] = [single] if single is not None else list(many)  # type: ignore[call-overload]
    images = [image for image in given if isinstance(image, Image.Image)]
    if len(images) != len(given):
        raise ValueError("images must be PIL images")
    return images
