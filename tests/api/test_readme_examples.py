"""The README's "API by example" block, run as written: every curl command in it is parsed and sent to the API,
and each must get a 2xx. Only what a reader substitutes is substituted: the key, the server, and the ids the
placeholders stand for (`file_...`: an uploaded image; `adp_...`: the reader's adapters, distinct within one
command; `job_...`: a job made by an earlier example), plus the files the examples upload (`input.png`, ...).

The API runs on a database and a filesystem broker of its own that no worker reads, so every job stays queued:
the test checks what the README promises of the requests (accepted, the right status), not the jobs' results.
"""

from __future__ import annotations

import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from store.settings import Settings
from tests.api.test_adapters_api import lora_file, ti_file
from tests.conftest import ADMIN_KEY, make_tenant, own_database

ROOT = Path(__file__).resolve().parents[2]
SERVER = "http://testserver"

def readme_commands() -> list[list[str]]:
    """The shell commands of the README's first `sh` block under "The API by example", continuation lines joined,
    one per `;`-separated command, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The API by example") :]
    block = section[section.index("```sh\n") + len("```sh\n") :]
    block = block[: block.index("```")]
    joined = block.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        command: list[str] = []
        for word in shlex.split(line, comments=True):
            if word.endswith(";"):
                commands.append([*command, word[:-1]])
                command = []
            else:
                command.append(word)
        if command:
            commands.append(command)
    return commands


@dataclass
class Request:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    stream: bool = False


def parse_curl(words: list[str], folder: Path) -> Request:
    """The request a curl command line makes (the options the README uses)."""
    assert words[0] == "curl", words
    request = Request("GET", "")
    index = 1
    while index < len(words):
        word = words[index]
        value = words[index + 1] if index + 1 < len(words) else ""
        if word in ("-s", "-N"):
            request.stream = request.stream or word == "-N"
        elif word == "-H":
            name, _, header = value.partition(":")
            request.headers[name.strip()] = header.strip()
            index += 1
        elif word == "-d":
            request.body = value
            request.method = "POST" if request.method == "GET" else request.method
            index += 1
        elif word in ("-F", "--form-string"):
            name, _, field_value = value.partition("=")
            if word == "-F" and field_value.startswith("@"):
                request.files[name] = folder / field_value[1:]
            elif word == "-F" and field_value.startswith("<"):
                raise AssertionError(f"-F {value!r} makes curl read a file; the README must use --form-string")
            else:
                request.form[name] = field_value
            request.method = "POST" if request.method == "GET" else request.method
            index += 1
        elif word == "-X":
            request.method = value
            index += 1
        elif word == "-o":
            index += 1
        elif word.startswith("-"):
            raise AssertionError(f"curl option {word!r} is not handled by this test")
        else:
            request.url = word
        index += 1
    return request


class Reader:
    """What a reader of the README has: a key, files, and the ids the examples returned."""

    def __init__(self, client: TestClient, key: str, folder: Path, adapters: list[str]) -> None:
        self.client, self.key, self.folder = client, key, folder
        self.adapters = adapters
        self.file_id = ""
        self.job_id = ""
        self.imported = ""

    def expand(self, command: list[str]) -> list[str]:
        """The command's words with the reader's values in place of variables and placeholders."""
        ids = iter(self.adapters)
        deleting = "DELETE" in command
        words = []
        for word in command:
            word = word.replace("$AUTH", f"Authorization: Bearer {self.key}")
            word = word.replace("$ATELIER", SERVER).replace("$ADMIN", ADMIN_KEY)
            word = word.replace("file_...", self.file_id or "file_...").replace("job_...", self.job_id or "job_...")
            if deleting and self.imported:  # delete the adapter the import example made
                word = word.replace("adp_...", self.imported)
            words.append(re.sub(r"adp_\.\.\.", lambda _: next(ids), word))
        return words

    def send(self, request: Request) -> tuple[int, Any]:
        url = request.url.removeprefix(SERVER)
        if request.stream:
            with self.client.stream(request.method, url, headers=request.headers) as response:
                first = next(response.iter_lines(), "")
                return response.status_code, first
        files = {name: (path.name, path.read_bytes()) for name, path in request.files.items()}
        response = self.client.request(
            request.method,
            url,
            headers=request.headers,
            content=request.body.encode() if request.body is not None else None,
            data=request.form or None,
            files=files or None,
        )
        try:
            payload: Any = response.json()
        except ValueError:
            payload = response.content[:200]
        return response.status_code, payload

    def remember(self, request: Request, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        identifier = str(payload.get("id", ""))
        if identifier.startswith("file_") and not self.file_id:
            self.file_id = identifier
        elif identifier.startswith("job_") and not self.job_id:
            self.job_id = identifier
        elif identifier.startswith("adp_") and request.files:
            self.imported = identifier


def white_square(size: int = 64) -> bytes:
    """A PNG of a white square on black, the zoo's size."""
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def reader(settings: Settings, tmp_path: Path) -> Iterator[Reader]:
    from api.main import create_app

    own = own_database(settings, "readme").model_copy(
        update={"broker_url": "filesystem://", "broker_dir": tmp_path / "broker"}  # no worker reads it
    )
    folder = tmp_path / "files"
    folder.mkdir()
    square = white_square()  # an image, a mask and an edge map at once
    for name in ("input.png", "photo.png"):
        (folder / name).write_bytes(square)
    (folder / "my_lora.safetensors").write_bytes(lora_file())
    _, key = make_tenant(own)
    with TestClient(create_app(own), raise_server_exceptions=False) as client:
        auth = {"Authorization": f"Bearer {key}"}
        adapters = []
        for data, kind, token in ((lora_file(), "lora", "<r1>"), (ti_file("<r2>"), "textual-inversion", "<r2>")):
            response = client.post(
                "/v1/adapters",
                headers=auth,
                files={"file": ("adapter.safetensors", data)},
                data={"type": kind, "token": token, "name": f"reader's {kind}"},
            )
            assert response.status_code == 201, response.text
            adapters.append(response.json()["id"])
        yield Reader(client, key, folder, adapters)


def test_every_readme_example_runs_as_written(reader: Reader) -> None:
    commands = readme_commands()
    assert len(commands) > 30, "the README's example block was not found whole"
    for command in commands:
        if command[0] == "export" or command[0].startswith("AUTH="):
            continue  # the reader's environment: substituted in `expand`
        request = parse_curl(reader.expand(command), reader.folder)
        status, payload = reader.send(request)
        reader.remember(request, payload)
        assert 200 <= status < 300, (shlex.join(command), status, payload)
