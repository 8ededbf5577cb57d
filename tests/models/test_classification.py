"""Classification on the zoo model: the Diffusion Classifier (scores, determinism, the adaptive schedule's saving,
generated images classified as their prompt), the synthetic dataset archive, and the small CNN's PGD."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.classification import diffusion_classifier as dc
from models.classification import robust, synthetic_data
from models.common.components import Components
from models.generation import text_to_image
from models.shapes.world import Scene, ShapeObject, caption, render

SCENE = Scene((ShapeObject("circle", "red", "large", "center"),), "dark")
COLOURS = ("red", "green", "blue")
PROMPTS = [caption(Scene((ShapeObject("circle", c, "large", "center"),), "dark")) for c in COLOURS]
FAST = {"samples_per_stage": (2, 4), "keep_per_stage": (2,), "batch_size": 32}


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(render(SCENE).image)


def classify(components: Components, images: list[Image.Image], seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"prompts": PROMPTS, **FAST, **kwargs}
    out = dc.run(components, dc.Params(**values), {"images": images}, generator=gen(seed))
    return out.result


def without_times(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its wall-clock fields."""
    copy = json.loads(json.dumps(result))
    copy.pop("seconds")
    for item in copy["results"]:
        item.pop("seconds")
    return copy  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------
# The estimator's pieces


def test_timesteps_every_prefix_spread_over_the_range() -> None:
    timesteps = dc.timestep_sequence(64, 100, 900)
    assert timesteps.min() >= 100 and timesteps.max() < 900
    for n in (4, 8, 16, 64):  # each quarter of the range gets n/4 of the first n samples, give or take one
        quarters = torch.bincount((timesteps[:n] - 100) // 200, minlength=4)
        assert quarters.min() >= n // 4 - 1 and quarters.max() <= n // 4 + 1, (n, quarters.tolist())
    with pytest.raises(ValueError, match="need 0 <= t_min < t_max"):
        dc.timestep_sequence(4, 500, 500)


def test_vlb_weights(components: Components) -> None:
    timesteps = dc.timestep_sequence(16, 0, 1000)
    uniform = dc.timestep_weights(components, timesteps, "uniform")
    vlb = dc.timestep_weights(components, timesteps, "vlb")
    assert torch.equal(uniform, torch.ones(16))
    assert (vlb > 0).all() and float(vlb.mean()) == pytest.approx(1.0, rel=1e-5)
    order = timesteps.argsort()  # beta_t^2 / (2 beta_t alpha_t (1 - abar_t)) falls with t on SD's schedule
    assert float(vlb[order[0]]) > float(vlb[order[-1]])


def test_planned_evaluations() -> None:
    assert dc.planned_evaluations(36, (32,), ()) == 36 * 32
    assert dc.planned_evaluations(36, (4, 28), (5,)) == 36 * 4 + 5 * 28
    assert dc.planned_evaluations(3, (4, 28), (5,)) == 3 * 32  # keep is capped at the classes left
    assert dc.stage_sizes(10, (4, 2), 3) == [10, 4, 2]


def test_batched_classes_give_the_errors_of_single_forwards(components: Components, image: Image.Image) -> None:
    """One UNet forward for many class prompts at the same noisy latent = one forward per (sample, class)."""
    from models.common.latents import encode, images_to_tensor
    from models.common.text import encode_prompts

    with torch.no_grad():
        clean = encode(components.vae, images_to_tensor([image]))
        embeddings = encode_prompts(components.text_encoder, components.tokenizer, PROMPTS)
        plan = dc.make_plan(components, dc.Params(samples_per_stage=(3,), keep_per_stage=()), clean.shape[1:], gen(0))
        batched = dc.sample_errors(components, clean, embeddings, plan, range(3), range(3), batch_size=9)
        single = dc.sample_errors(components, clean, embeddings, plan, range(3), range(3), batch_size=1)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)
    assert (batched > 0).all()


# ------------------------------------------------------------------------------------------------
# The method


def test_scores_are_a_distribution_over_the_classes(components: Components, image: Image.Image) -> None:
    result = classify(components, [image])
    (answer,) = result["results"]
    ranking = answer["ranking"]
    assert sorted(item["index"] for item in ranking) == [0, 1, 2]
    assert [item["class"] for item in ranking] == [PROMPTS[item["index"]] for item in ranking]
    scores = [item["score"] for item in ranking]
    assert all(s >= 0 for s in scores) and sum(scores) == pytest.approx(1.0, abs=1e-9)
    assert answer["predicted_index"] == ranking[0]["index"] and answer["predicted"] == ranking[0]["class"]
    # The survivors of stage 1 come first, each with every sample; the others keep their stage-1 estimate
    assert [item["stage"] for item in ranking] == [2, 2, 1]
    assert [item["samples"] for item in ranking] == [6, 6, 2]
    survivors = [item["error"] for item in ranking[:2]]
    assert survivors == sorted(survivors)
    assert result["unet_evaluations"] == answer["unet_evaluations"] == 3 * 2 + 2 * 4


def test_classifier_is_deterministic_for_a_seed(components: Components, image: Image.Image) -> None:
    first, again = classify(components, [image], seed=3), classify(components, [image], seed=3)
    assert without_times(first) == without_times(again)
    other = classify(components, [image], seed=4)
    assert [i["error"] for i in other["results"][0]["ranking"]] != [i["error"] for i in first["results"][0]["ranking"]]


def test_images_share_one_plan(components: Components, image: Image.Image) -> None:
    """Each image's answer is the one it gets alone: the (t, eps) plan is the job's, not the image's."""
    other = Image.fromarray(render(Scene((ShapeObject("square", "blue", "small", "top left"),))).image)
    both = without_times(classify(components, [image, other]))
    alone = [without_times(classify(components, [im]))["results"][0] for im in (image, other)]
    for joint, single in zip(both["results"], alone, strict=True):  # equal up to batch-size float noise
        assert [i["index"] for i in joint["ranking"]] == [i["index"] for i in single["ranking"]]
        assert [i["error"] for i in joint["ranking"]] == pytest.approx(
            [i["error"] for i in single["ranking"]], rel=1e-3
        )
        assert joint["predicted"] == single["predicted"]
    assert both["unet_evaluations"] == 2 * alone[0]["unet_evaluations"]


def test_adaptive_schedule_spends_fewer_evaluations_than_naive(components: Components, image: Image.Image) -> None:
    """Same samples per surviving class (8); the adaptive schedule evaluates the dropped classes only in stage 1."""
    six = [caption(Scene((ShapeObject("circle", c, "large", "center"),), "dark")) for c in COLOURS] + [
        caption(Scene((ShapeObject(s, "red", "large", "center"),), "dark")) for s in ("square", "triangle", "diamond")
    ]
    seen: dict[str, list[tuple[int, int]]] = {"naive": [], "adaptive": []}
    outputs = {}
    for name, stages, keep in (("naive", (8,), ()), ("adaptive", (2, 6), (2,))):
        params = dc.Params(prompts=six, samples_per_stage=stages, keep_per_stage=keep, batch_size=8)
        outputs[name] = dc.run(
            components, params, {"image": image}, generator=gen(0), callback=lambda s, t, n=name: seen[n].append((s, t))
        )
    naive, adaptive = outputs["naive"], outputs["adaptive"]
    assert naive.metrics["unet_evaluations"] == 6 * 8 == seen["naive"][-1][0] == seen["naive"][-1][1]
    assert adaptive.metrics["unet_evaluations"] == 6 * 2 + 2 * 6 == seen["adaptive"][-1][0] == seen["adaptive"][-1][1]
    assert adaptive.metrics["unet_evaluations"] < naive.metrics["unet_evaluations"]
    steps = [s for s, _ in seen["adaptive"]]
    assert steps == sorted(steps) and 12 in steps  # progress is monotone and stage 1 ends on a report
    # The survivors' errors are those of the naive run: the same 8 samples of the shared plan
    naive_errors = {i["index"]: i["error"] for i in naive.result["results"][0]["ranking"]}
    for item in adaptive.result["results"][0]["ranking"][:2]:
        assert item["error"] == pytest.approx(naive_errors[item["index"]], rel=1e-5)


def test_cancel_from_the_callback_stops_the_job(components: Components, image: Image.Image) -> None:
    """The worker cancels by raising from the progress callback: no UNet forward runs after it."""
    calls: list[tuple[int, int]] = []

    def cancel(step: int, total: int) -> None:
        calls.append((step, total))
        raise KeyboardInterrupt  # stands in for the worker's JobCanceled

    params = dc.Params(prompts=PROMPTS, samples_per_stage=(4, 4), keep_per_stage=(2,), batch_size=3)
    with pytest.raises(KeyboardInterrupt):
        dc.run(components, params, {"image": image}, generator=gen(0), callback=cancel)
    assert calls == [(3, 3 * 4 + 2 * 4)]  # one forward of 3 items, then stopped


def test_generated_image_is_classified_as_its_prompt(components: Components) -> None:
    """Li et al.'s premise in a small fixture: an image drawn from class k's prompt (25 DDIM steps, guidance 7.5,
    seed 0) is classified as k among the three prompts, for each k."""
    images = []
    for prompt in PROMPTS:
        params = text_to_image.Params(prompt=prompt, steps=25, guidance_scale=7.5)
        images += text_to_image.run(components, params, generator=gen(0)).images
    result = classify(components, images, samples_per_stage=(16,), keep_per_stage=())
    assert [r["predicted_index"] for r in result["results"]] == [0, 1, 2], [
        [(i["index"], i["error"]) for i in r["ranking"]] for r in result["results"]
    ]


def test_class_names_with_a_template(components: Components, image: Image.Image) -> None:
    params = dc.Params(class_names=COLOURS, template="a large {} circle at the center on a dark background", **FAST)
    result = dc.run(components, params, {"image": image}, generator=gen(0)).result
    assert result["classes"] == list(COLOURS)
    assert {i["prompt"] for i in result["results"][0]["ranking"]} == set(PROMPTS)
    assert result["results"][0]["predicted"] in COLOURS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": PROMPTS[:1]}, "at least 2 classes are needed, got 1"),
        ({"prompts": (), "class_names": ("a", "b"), "template": "no slot"}, "template must contain exactly one"),
        ({"class_names": ("red", "blue")}, "give either prompts or class_names, not both"),
        ({"samples_per_stage": (2, 4), "keep_per_stage": ()}, "keep_per_stage needs one entry per stage"),
        ({"samples_per_stage": (0,), "keep_per_stage": ()}, r"samples_per_stage must all be >= 1"),
        ({"samples_per_stage": (1, 1, 1), "keep_per_stage": (1, 2)}, "non-increasing"),
        ({"t_min": 500, "t_max": 400}, r"need 0 <= t_min < t_max <= 1000"),
        ({"t_max": 1001}, r"need 0 <= t_min < t_max <= 1000"),
        ({"error_weighting": "huber"}, "error_weighting must be one of"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"prompts": [PROMPTS[0], "circle " * 40]}, "class 1 prompt is .* tokens"),
    ],
)
def test_classifier_rejects_bad_input(
    components: Components, image: Image.Image, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classify(components, [image], **kwargs)


def test_classifier_rejects_bad_images(components: Components, image: Image.Image) -> None:
    params = dc.Params(prompts=PROMPTS, **FAST)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image 0 size must be a multiple of 4, got 64x66"):
        dc.run(components, params, {"image": image.resize((64, 66))}, generator=gen(0))
    with pytest.raises(ValueError, match="images must all have the same size"):
        dc.run(components, params, {"images": [image, image.resize((32, 32))]}, generator=gen(0))
    with pytest.raises(ValueError, match="give either image or images"):
        dc.run(components, params, {"image": image, "images": [image]}, generator=gen(0))
    with pytest.raises(ValueError, match="give either image or images"):
        dc.run(components, params, {}, generator=gen(0))


# ------------------------------------------------------------------------------------------------
# The synthetic dataset


def dataset(components: Components, seed: int = 0, **kwargs: Any) -> Any:
    classes = [{"label": c, "prompt": p, "count": n} for c, p, n in zip(COLOURS[:2], PROMPTS[:2], (2, 1), strict=True)]
    values: dict[str, Any] = {"classes": classes, "steps": 4, "batch_size": 2, **kwargs}
    return synthetic_data.run(components, synthetic_data.Params(**values), generator=gen(seed))


def read(data: bytes) -> tuple[list[str], list[dict[str, Any]], dict[str, Image.Image]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        records = [json.loads(line) for line in archive.read("labels.jsonl").decode().splitlines()]
        images = {n: Image.open(io.BytesIO(archive.read(n))) for n in names if n.endswith(".png")}
    return names, records, images


def test_dataset_archive_labels_match_its_images(components: Components) -> None:
    out = dataset(components, pseudo_label=True, pseudo_label_samples_per_stage=(2,), pseudo_label_keep_per_stage=())
    archive = out.files[synthetic_data.ARCHIVE]
    assert archive.content_type == "application/zip" and not out.images
    names, records, images = read(archive.data)
    assert sorted(names) == sorted([r["file"] for r in records] + ["labels.jsonl"])
    assert [r["index"] for r in records] == [0, 1, 2] and [r["class_index"] for r in records] == [0, 0, 1]
    assert [r["label"] for r in records] == ["red", "red", "green"]
    assert [r["prompt"] for r in records] == [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    assert all(image.size == (64, 64) and image.format == "PNG" for image in images.values())
    assert len({r["seed"] for r in records}) == 3
    for record in records:
        assert record["pseudo_label"] == COLOURS[record["pseudo_label_index"]]
        assert record["agrees"] == (record["pseudo_label_index"] == record["class_index"])
        assert 0 < record["pseudo_label_score"] <= 1
    agreement = np.mean([r["agrees"] for r in records])
    assert out.result["agreement_rate"] == pytest.approx(agreement, abs=1e-4) == out.metrics["agreement_rate"]
    assert out.result["unet_evaluations"] == 3 * 2 * 2  # 3 images x 2 classes x 2 samples
    assert [c["count"] for c in out.result["classes"]] == [2, 1]


def test_dataset_is_deterministic_and_its_seeds_redraw_each_image(components: Components) -> None:
    """The same seed gives the same archive bytes; a batch-1 text-to-image job with a record's seed redraws it."""
    first, again = dataset(components, seed=5), dataset(components, seed=5)
    data = first.files[synthetic_data.ARCHIVE].data
    assert data == again.files[synthetic_data.ARCHIVE].data
    assert "agreement_rate" not in first.result
    _, records, images = read(data)
    record = records[2]
    params = text_to_image.Params(prompt=record["prompt"], steps=4, guidance_scale=7.5)
    (redrawn,) = text_to_image.run(components, params, generator=gen(record["seed"])).images
    difference = np.abs(np.asarray(images[record["file"]], dtype=np.int16) - np.asarray(redrawn, dtype=np.int16))
    assert difference.max() <= 1  # batch 1 on both sides; at most a rounding step


def test_dataset_progress_counts_generation_then_labelling(components: Components) -> None:
    seen: list[tuple[int, int]] = []
    classes = [{"label": c, "prompt": p, "count": 1} for c, p in zip(COLOURS[:2], PROMPTS[:2], strict=True)]
    params = synthetic_data.Params(
        classes=classes, steps=3, pseudo_label=True, pseudo_label_samples_per_stage=(1,), pseudo_label_keep_per_stage=()
    )
    synthetic_data.run(components, params, generator=gen(0), callback=lambda s, t: seen.append((s, t)))
    total = 2 * 3 + 2 * 2  # two batches of 3 steps, then 2 images x 2 classes x 1 sample
    assert seen[-1] == (total, total) and [s for s, _ in seen] == sorted(s for s, _ in seen)


def test_dataset_draws_a_personalized_concept_through_an_adapter(components: Components) -> None:
    """With a textual-inversion adapter installed (as the worker does for a job's `adapters`), a class prompt can
    name its token. Here the token's vector is the embedding of "red", so the images are the ones "red" draws."""
    from models.personalization.apply import applied
    from models.personalization.common import Adapter

    (red_id,) = components.tokenizer("red", add_special_tokens=False).input_ids
    vector = components.text_encoder.get_input_embeddings().weight[red_id].detach().clone()[None]
    adapter = Adapter("textual-inversion", {"<my-concept>": vector}, {"tokens": json.dumps(["<my-concept>"])})
    concept = PROMPTS[0].replace("red", "<my-concept>")
    with applied(components, [(adapter, 1.0)]):
        out = dataset(components, classes=[{"label": "mine", "prompt": concept, "count": 2}])
    reference = dataset(components, classes=[{"label": "mine", "prompt": PROMPTS[0], "count": 2}])
    _, records, images = read(out.files[synthetic_data.ARCHIVE].data)
    _, _, expected = read(reference.files[synthetic_data.ARCHIVE].data)
    assert records[0]["prompt"] == concept
    for name, image in images.items():
        difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected[name], dtype=np.int16))
        assert difference.max() <= 1, name
    assert "<my-concept>" not in components.tokenizer.get_vocab()  # the job left the model as it found it


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": []}, "classes needs at least one class"),
        ({"classes": [{"label": "a", "prompt": "a red circle", "count": 0}]}, r"classes\[0\].count must be"),
        ({"classes": [{"label": "a", "count": 1}]}, r"classes\[0\] needs a label and a prompt"),
        ({"classes": [{"label": "a", "prompt": "circle " * 40, "count": 1}]}, r"classes\[0\].prompt is .* tokens"),
        ({"pseudo_label": True, "classes": [{"label": "a", "prompt": "a red circle", "count": 1}]}, "pseudo_label"),
        ({"width": 62}, "width must be a multiple of 4"),
        ({"steps": 0}, "steps must be at least 1"),
    ],
)
def test_dataset_rejects_bad_input(components: Components, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataset(components, **kwargs)


# ------------------------------------------------------------------------------------------------
# The small CNN and PGD


def test_pgd_stays_in_the_ball_and_raises_the_loss() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(8, 3, 32, 32)
    labels = {"color": torch.arange(8) % 3}
    model = robust.train(pixels, labels, {"color": 3}, robust.TrainConfig(epochs=5, batch_size=8), seed=0)
    adversary = robust.Adversary(eps=4 / 255, alpha=1 / 255, steps=5)
    adversarial = robust.pgd(model, pixels, labels, adversary, gen(0))
    assert float((adversarial - pixels).abs().max()) <= 4 / 255 + 1e-6
    assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
    with torch.no_grad():
        assert robust.loss_of(model(adversarial), labels) > robust.loss_of(model(pixels), labels)


def test_training_is_deterministic_for_a_seed() -> None:
    pixels = torch.rand(16, 3, 32, 32, generator=gen(1))
    labels = {"color": torch.arange(16) % 4}
    config = robust.TrainConfig(epochs=2, batch_size=8, adversary=robust.Adversary(steps=2))
    first, again = (robust.train(pixels, labels, {"color": 4}, config, seed=7) for _ in range(2))
    assert torch.equal(robust.predict(first, pixels)["color"], robust.predict(again, pixels)["color"])
