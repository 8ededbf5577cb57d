"""Checks the worker used to make only after a 201 (issue 14), now made at submission with nothing stored: a prompt
longer than the model's text encoder takes, a training token that is already a word of the model, and two
adapters that bring one token to the same job. The API counts tokens without transformers (api/text_checks.py);
the count must be the worker's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import CLIPTokenizer

from api.text_checks import _clip_from_vocabulary, count_tokens, tokenizers_of
from store.adapters import save_adapter
from store.db import session_scope
from store.settings import Settings
from store.tables import Adapter, Job
from tests.api.test_hardening_2 import TEXT_TO_IMAGE, count, error_of
from tests.conftest import ZOO_MODEL
from tests.service.test_adapters_e2e import star_images

PROMPTS = [
    "a red circle",
    "A  Large RED circle, at the top-left!!",
    "résumé café naïve 123 4567",
    "it's a dog's life; they'll've",
    "<s1> star and <s2>_1 twice",
    "emoji 🙂 test",
    "a " * 40,
    "tab\tand\nnewline",
    "x" * 100,
    "UPPER lower MiXeD 3.14 -- (brackets) [and] {braces}",
]
LONG = "a large red circle at the top left " * 4  # 34 tokens: the zoo model takes 32


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab.json and merges.txt"])
def test_the_api_counts_tokens_as_the_worker_does(source: str) -> None:
    folder = ZOO_MODEL / "tokenizer"
    reference = CLIPTokenizer.from_pretrained(str(folder))
    if source == "tokenizer.json":
        tokenizer = tokenizers_of(ZOO_MODEL)[0][0]
    else:  # what a model without tokenizer.json (SD 1.5 as published) gets
        tokenizer = _clip_from_vocabulary(folder, json.loads((folder / "tokenizer_config.json").read_text()))
    for prompt in PROMPTS:
        expected = reference(prompt, truncation=False)["input_ids"]
        assert tokenizer.encode(prompt).ids == expected, prompt
        assert count_tokens(tokenizer, prompt) == len(expected)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": LONG}, "prompt"),
        ({"prompt": "a red circle", "negative_prompt": LONG}, "negative_prompt"),
    ],
)
def test_a_prompt_longer_than_the_model_takes_is_a_422(
    client: TestClient,
    settings: Settings,
    tenant: tuple[str, str],
    auth: dict[str, str],
    body: dict[str, Any],
    field: str,
) -> None:
    error = error_of(client.post(TEXT_TO_IMAGE, json={**body, "steps": 2}, headers=auth), 422)
    assert error["details"][0]["field"] == field
    assert "34 tokens" in error["message"] and "at most 32" in error["message"]
    assert count(settings, Job, tenant[0]) == 0


def test_a_prompt_at_the_limit_is_accepted(client: TestClient, auth: dict[str, str]) -> None:
    prompt = " ".join(["red"] * 30)  # 30 words + start + end = 32
    assert client.post(TEXT_TO_IMAGE, json={"prompt": prompt, "steps": 1}, headers=auth).status_code == 201


@pytest.mark.parametrize("token", ["circle", "Circle", "red"])
def test_a_training_token_that_is_already_a_word_is_a_422(
    client: TestClient, settings: Settings, tenant: tuple[str, str], auth: dict[str, str], token: str
) -> None:
    body = {"images": star_images(), "token": token, "class_word": "diamond", "steps": 4}
    error = error_of(client.post("/v1/trainings/textual-inversion", json=body, headers=auth), 422)
    assert error["details"][0]["field"] == "token" and "already a word" in error["message"]
    assert count(settings, Job, tenant[0]) == 0


def test_two_adapters_with_one_token_in_a_job_is_a_422(
    client: TestClient, app: Any, settings: Settings, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    ids = []
    with session_scope(settings.database_url) as session:
        for name in ("first", "second"):
            row = save_adapter(
                session,
                app.state.artifacts,
                tenant_id=tenant[0],
                name=name,
                type="textual-inversion",
                tokens=["<same>"],
                base_model=settings.default_model,
                data=b"unused",
                training={},
                metrics={},
            )
            ids.append(row.id)
    body = {"prompt": "a <same>", "steps": 1, "adapters": [{"id": ids[0]}, {"id": ids[1]}]}
    error = error_of(client.post(TEXT_TO_IMAGE, json=body, headers=auth), 422)
    assert error["details"][0]["field"] == "adapters[1].id" and "'<same>'" in error["message"]
    assert count(settings, Job, tenant[0]) == 0
    assert count(settings, Adapter, tenant[0]) == 2


def test_the_model_folder_without_tokenizers_checks_nothing(tmp_path: Path) -> None:
    assert tokenizers_of(tmp_path) == ()
