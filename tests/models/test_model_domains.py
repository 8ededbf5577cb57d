"""The words a training job uses follow its model: ShapesWorld's on the zoo, plain English photo captions on any
other model (before, every model trained and built Perfusion's covariance on ShapesWorld captions), and the
domain comes from the model folder (`contract/domains.py`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.domains import METHOD_DEFAULTS, fill, folder_domain
from models.common import text
from models.common.components import Components
from models.personalization import custom_diffusion, custom_diffusion_merge, perfusion, training
from models.personalization.captions import caption_corpus, context_prompts, templates
from tests.conftest import ZOO_MODEL
from tests.families import save_folder, sd1_components
from tests.models.test_personalization_db_cd_pf import gen, star_images
from worker.runtime import DevicePolicy, load_components

WORLD_WORDS = {word for line in caption_corpus("shapesworld", 3000, seed=7) for word in line.split()}
NEW_WORDS = {"<pf>", "circle"}  # the test concept's token and class word


def shapesworld_worded(prompt: str) -> bool:
    return all(word in WORLD_WORDS | NEW_WORDS for word in prompt.split())


@pytest.fixture(scope="module")
def sd1() -> Components:
    torch.set_num_threads(1)
    return sd1_components()


def encoded_prompts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every prompt the personalization code sends to a text encoder from now on (the real encoder still runs)."""
    seen: list[str] = []
    real = text.encode_prompts

    def spy(encoder: Any, tokenizer: Any, prompts: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.extend(prompts)
        return real(encoder, tokenizer, prompts, *args, **kwargs)

    for module in (training, perfusion, custom_diffusion):
        monkeypatch.setattr(module, "encode_prompts", spy)
    return seen


def test_the_zoo_is_shapesworld_and_any_other_model_general(components: Components, sd1: Components, tmp_path: Path):
    assert components.domain == "shapesworld" and folder_domain(ZOO_MODEL) == "shapesworld"
    folder = save_folder(sd1, tmp_path / "sd1")
    assert folder_domain(folder) == "general"
    assert load_components(folder, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa")).domain == "general"
    (folder / "atelier.json").write_text("not json")
    assert folder_domain(folder) == "general"


@pytest.mark.parametrize("model", ["zoo", "sd1"])
def test_perfusion_trains_and_builds_its_covariance_in_the_models_words(
    model: str, components: Components, sd1: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Perfusion job encodes its covariance corpus, its context captions and its training captions: on the zoo
    every one is ShapesWorld-worded; on an SD 1.5-shaped model none is (each has a word ShapesWorld lacks), but for
    "a <class word>" (key locking's) and "a <token>", which are the same in every domain."""
    target = components if model == "zoo" else sd1
    seen = encoded_prompts(monkeypatch)
    params = perfusion.Params(token="<pf>", class_word="circle", steps=2, batch_size=2)
    perfusion.run(target, params, {"images": star_images()}, generator=gen(0))
    assert len(seen) > 400  # the corpus (400), the contexts (32), the class word, the training captions
    worded = [shapesworld_worded(prompt) for prompt in seen if prompt not in ("a circle", "a <pf>")]
    assert all(worded) if model == "zoo" else not any(worded)


def test_training_captions_and_corpora_per_domain() -> None:
    draw: Callable[[str], list[str]] = lambda domain: training.training_prompts(  # noqa: E731
        "<s1> dog",
        64,
        torch.Generator().manual_seed(0),
        domain,  # type: ignore[arg-type]
    )
    general, shapes = draw("general"), draw("shapesworld")
    assert {p.replace("<s1> dog", "{concept}") for p in general} <= set(templates("general"))
    assert all(p.startswith(("a photo", "a rendering", "a cropped", "the photo", "a close-up", "a dark", "a bright",
                             "a good", "a rendition")) for p in general)  # fmt: skip
    assert {p.replace("<s1> dog", "{concept}") for p in shapes} == set(templates("shapesworld"))
    corpus = caption_corpus("general")
    assert len(corpus) == 400 and len(set(corpus)) > 300 and corpus == caption_corpus("general")
    assert not any(shapesworld_worded(c) for c in corpus)
    assert all(c.count("<s1>") == 1 for c in context_prompts("general", "<s1>"))
    assert all("<s1>" in c for c in context_prompts("shapesworld", "<s1>"))


@pytest.mark.parametrize("family", ["sd1", "sd2v"])
def test_custom_diffusion_merge_regularises_on_the_models_corpus(
    family: str, sd1: Components, sd2v: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge's regularisation captions on SD 1.5- and 2.x-shaped models are the general corpus; the merge
    runs where its constraint rows repeat (their small text encoders; it failed on a singular matrix before)."""
    sd1 = sd1 if family == "sd1" else sd2v
    seen = encoded_prompts(monkeypatch)
    merge_params = custom_diffusion_merge.Params(regularization_captions=20)
    images = star_images()
    adapters = []
    for token in ("<c1>", "<c2>"):
        params = custom_diffusion.Params(token=token, class_word="circle", steps=1, regularization=False)
        adapters.append(custom_diffusion.run(sd1, params, {"images": images}, generator=gen(1)).adapter)
    seen.clear()
    merged = custom_diffusion_merge.run(sd1, merge_params, {"adapters": adapters}, generator=gen(2))
    assert set(caption_corpus("general", 20)) <= set(seen)
    assert merged.adapter is not None and all(torch.isfinite(t).all() for t in merged.adapter.tensors.values())


def test_domain_defaults_fill_only_what_is_left_out() -> None:
    assert set(METHOD_DEFAULTS) == {"imagic", "dreambooth", "lora", "custom-diffusion", "textual-inversion"}
    for kind, table in METHOD_DEFAULTS.items():
        assert set(table) == {"general", "shapesworld"} and set(table["general"]) == set(table["shapesworld"]), kind
    assert fill("dreambooth", "general", {"steps": None, "other": 1}) == {
        "steps": 400,
        "learning_rate": 5e-6,
        "other": 1,
    }
    assert fill("dreambooth", "general", {"steps": 9, "learning_rate": 1e-3}) == {"steps": 9, "learning_rate": 1e-3}
    assert fill("sdedit", "general", {"strength": None}) == {"strength": None}
