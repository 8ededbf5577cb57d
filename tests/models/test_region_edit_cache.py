"""region-edit's activation cache (issue 15): follow-up edits of one image reuse its recorded activations.

A hit replays the stored recording instead of the record passes and must give the uncached sparse result bit for
bit; whatever the record pass depends on is in the key, the mask is not; the cache stays within its budget, evicts
least recently used first, stores nothing larger than the budget, and is off at 0. Zoo model, 64 px, 3 steps.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from models.common.activation_cache import ActivationCache, CacheHandle, cache_key, tensor_bytes
from models.common.components import Components, MethodOutput
from models.editing import region_edit
from models.shapes.world import render, sample_scene
from store.artifacts import artifact_store
from store.db import session_factory, session_scope
from store.files import store_input
from store.settings import Settings
from store.tables import Job, new_id, utcnow
from tests.conftest import make_tenant
from worker.execution import WorkerContext, execute_job, weights_identity
from worker.runtime import DevicePolicy, ModelCache

SIZE = 64
WEIGHTS = weights_identity("shapes-sd-tiny", [])


def scene_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(render(sample_scene(np.random.default_rng(seed), split="test")).image)


def corner_mask(corner: int) -> Image.Image:
    """A white square over one quadrant of the image (0: top left, 1: top right, 2: bottom left, 3: bottom right)."""
    pixels = np.zeros((SIZE, SIZE), dtype=np.uint8)
    half = SIZE // 2
    y, x = divmod(corner, 2)
    pixels[y * half : (y + 1) * half, x * half : (x + 1) * half] = 255
    return Image.fromarray(pixels)


def edit(
    components: Components,
    cache: ActivationCache | None,
    *,
    corner: int = 0,
    seed: int = 0,
    image_seed: int = 0,
    weights: str = WEIGHTS,
    **params: object,
) -> MethodOutput:
    """One region edit; `cache` None: no `inputs["activation_cache"]` at all (the method as it ran before)."""
    values: dict[str, object] = {"prompt": "a large blue circle at the top left", "strength": 0.8, "steps": 4}
    inputs: dict[str, object] = {"image": scene_image(image_seed), "mask": corner_mask(corner)}
    if cache is not None:
        inputs["activation_cache"] = CacheHandle(cache, weights)
    run_params = region_edit.Params(**{**values, **params})  # type: ignore[arg-type]
    return region_edit.run(components, run_params, inputs, generator=torch.Generator("cpu").manual_seed(seed))


def same(first: MethodOutput, second: MethodOutput) -> bool:
    """Bit-identical outputs: the edited image and the edited region."""
    return np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0])) and np.array_equal(
        np.asarray(first.extra_images["region"]), np.asarray(second.extra_images["region"])
    )


def test_a_second_edit_with_another_mask_is_a_hit_equal_to_the_uncached_run(components: Components) -> None:
    cache = ActivationCache(1 << 30)
    first = edit(components, cache, corner=0)
    second = edit(components, cache, corner=3)
    assert (first.metrics["activation_cache"], second.metrics["activation_cache"]) == ("miss", "hit")
    assert second.metrics["unet_record_seconds"] == 0.0 and float(first.metrics["unet_record_seconds"]) > 0
    assert len(cache) == 1 and cache.nbytes == first.metrics["activation_bytes"] == second.metrics["activation_bytes"]
    uncached = edit(components, None, corner=3)
    assert uncached.metrics["activation_cache"] == "off"
    assert same(second, uncached)
    assert not same(second, first)  # another mask, another edit
    # Replaying never modifies the stored recording: the first mask again, from the cache, is the first result.
    again = edit(components, cache, corner=0)
    assert again.metrics["activation_cache"] == "hit"
    assert same(again, first) and same(first, edit(components, None, corner=0))


def test_a_hit_skips_the_vae_and_text_encodings_of_the_original(
    components: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry keeps the original's latent and the prompts' conditioning with its recording: a hit encodes
    nothing, a miss encodes the image once and the prompt and negative prompt once each."""
    cache = ActivationCache(1 << 30)
    images: list[int] = []
    texts: list[int] = []
    encode = components.vae.encode
    monkeypatch.setattr(components.vae, "encode", lambda *a, **k: images.append(1) or encode(*a, **k))
    hook = components.text_encoder.register_forward_pre_hook(lambda *_: texts.append(1))
    try:
        miss = edit(components, cache, corner=0)
        assert (len(images), len(texts)) == (1, 2)
        hit = edit(components, cache, corner=3)
        assert hit.metrics["activation_cache"] == "hit" and (len(images), len(texts)) == (1, 2)
    finally:
        hook.remove()
    monkeypatch.undo()
    assert miss.metrics["activation_bytes"] == hit.metrics["activation_bytes"] == cache.nbytes
    assert same(hit, edit(components, None, corner=3))


def test_tile_margin_and_dilation_are_not_in_the_key(components: Components) -> None:
    """The record pass is dense and keeps whole layer outputs: the tiling settings do not change it."""
    cache = ActivationCache(1 << 30)
    edit(components, cache)
    changed: dict[str, Any] = {"tile": 2, "sparse_margin": 0, "dilation": 2}
    hit = edit(components, cache, corner=1, **changed)
    assert hit.metrics["activation_cache"] == "hit"
    assert same(hit, edit(components, None, corner=1, **changed))


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a small red square at the top left"},
        {"negative_prompt": "blurry"},
        {"guidance_scale": 5.0},
        {"seed": 1},
        {"strength": 0.6},
        {"steps": 5},
        {"image_seed": 1},
        {"weights": weights_identity("shapes-sd-tiny", [("adp_1", "ab" * 32, 1.0)])},
    ],
    ids=lambda change: next(iter(change)),
)
def test_what_the_record_pass_depends_on_makes_a_miss(components: Components, change: dict[str, object]) -> None:
    cache = ActivationCache(1 << 30)
    edit(components, cache)
    changed = edit(components, cache, corner=3, **change)  # type: ignore[arg-type]
    assert changed.metrics["activation_cache"] == "miss"
    assert len(cache) == 2


def test_lru_eviction_keeps_the_cache_within_its_budget(components: Components) -> None:
    """Room for two recordings: the least recently used one goes when a third comes."""
    entry = int(edit(components, None).metrics["activation_bytes"])
    cache = ActivationCache(2 * entry + entry // 2)
    statuses = []
    for seed in (0, 1, 0, 2, 1, 2):  # 0, 1 stored; 0 used; 2 evicts 1; 1 evicts 0; 2 still there
        statuses.append(edit(components, cache, seed=seed, corner=seed % 4).metrics["activation_cache"])
        assert cache.nbytes <= cache.budget_bytes and len(cache) <= 2
    assert statuses == ["miss", "miss", "hit", "miss", "miss", "hit"]
    assert cache.nbytes == 2 * entry


def test_lru_order_and_budget_with_plain_tensors() -> None:
    cache = ActivationCache(100)
    tensor = torch.zeros(10, dtype=torch.float32)  # 40 bytes
    assert tensor_bytes([[tensor], [(tensor, tensor[:5])]]) == 100
    assert cache.put("a", [tensor]) and cache.put("b", [tensor])
    assert cache.get("a") is not None  # "b" is now the least recently used
    assert cache.put("c", [tensor])
    assert "b" not in cache and "a" in cache and "c" in cache and cache.nbytes == 80
    assert not cache.put("huge", [torch.zeros(26)])  # 104 bytes > the budget: refused, nothing evicted
    assert "huge" not in cache and len(cache) == 2 and cache.nbytes == 80
    assert cache.put("a", [tensor[:5]]) and cache.nbytes == 60  # replacing an entry counts it once


def test_a_recording_over_the_budget_is_not_stored(components: Components) -> None:
    entry = int(edit(components, None).metrics["activation_bytes"])
    cache = ActivationCache(entry - 1)
    outputs = [edit(components, cache, corner=corner) for corner in (0, 0)]
    assert [output.metrics["activation_cache"] for output in outputs] == ["miss", "miss"]
    assert len(cache) == 0 and cache.nbytes == 0
    assert same(outputs[0], edit(components, None))


@pytest.mark.parametrize("sparse", [True, False])
def test_budget_zero_is_off_and_changes_nothing(components: Components, sparse: bool) -> None:
    """Budget 0 (and any dense job) leaves the method as it was: no lookup, no copy, the same output."""
    cache = ActivationCache(0)
    output = edit(components, cache, sparse=sparse)
    assert output.metrics["activation_cache"] == "off" and len(cache) == 0
    assert same(output, edit(components, None, sparse=sparse))
    if not sparse:  # a dense job never stores, whatever the budget
        big = ActivationCache(1 << 30)
        assert edit(components, big, sparse=False).metrics["activation_cache"] == "off" and len(big) == 0


def test_a_negative_budget_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="budget must be at least 0 bytes"):
        ActivationCache(-1)
    with pytest.raises(ValidationError, match="activation_cache_bytes"):
        Settings(activation_cache_bytes=-1)


def test_the_worker_context_holds_one_cache_sized_by_the_settings() -> None:
    settings = Settings(activation_cache_bytes=12345)
    ctx = WorkerContext(settings=settings, sessions=None, artifacts=None, cache=None)  # type: ignore[arg-type]
    assert isinstance(ctx.activations, ActivationCache) and ctx.activations.budget_bytes == 12345


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_worker_shares_its_cache_across_jobs_and_a_restart_empties_it(settings: Settings) -> None:
    """Through `execute_job`: the second edit of one image (another mask) is a hit; a new process is a miss."""
    torch.set_num_threads(1)  # as the worker does (ATELIER_TORCH_THREADS)
    models = ModelCache(settings.models_dir, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))

    def worker() -> WorkerContext:
        return WorkerContext(
            settings=settings,
            sessions=session_factory(settings.database_url),
            artifacts=artifact_store(settings),
            cache=models,
        )

    ctx = worker()
    tenant_id, _ = make_tenant(settings)
    with session_scope(settings.database_url) as session:
        image, *masks = (
            store_input(session, ctx.artifacts, tenant_id, png(picture), "image/png", picture.size, "upload").id
            for picture in (scene_image(), corner_mask(0), corner_mask(3))
        )

    def run(ctx: WorkerContext, mask: str) -> object:
        params = {"image": image, "mask": mask, "prompt": "a large blue circle", "strength": 0.8, "steps": 4}
        with session_scope(settings.database_url) as session:
            job = Job(
                id=new_id("job"),
                tenant_id=tenant_id,
                kind="region-edit",
                queue="inference",
                model=settings.default_model,
                seed=0,
                params=params,
                max_attempts=3,
                published_at=utcnow(),
                publish_count=5,  # the reconciler of a live test worker, if one runs, leaves it to this test
            )
            session.add(job)
            job_id = job.id
        assert execute_job(ctx, job_id) == "succeeded"
        with session_scope(settings.database_url) as session:
            return session.get(Job, job_id).metrics["activation_cache"]  # type: ignore[union-attr]

    assert [run(ctx, masks[0]), run(ctx, masks[1])] == ["miss", "hit"]
    assert run(worker(), masks[1]) == "miss"  # a restarted worker starts with an empty cache


def test_keys_and_weights_identities_separate_their_parts() -> None:
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert cache_key(1, "x") != cache_key("1", "x") and cache_key(b"x") != cache_key("x")
    assert weights_identity("m", [("adp_1", "s", 1.0)]) != weights_identity("m", [("adp_1", "s", 0.5)])
