"""The webhook target rule (contract/webhook_targets.py) and the worker's check at delivery: a private target is not
POSTed to, whatever the API accepted when the job was created (the name may point elsewhere now)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from sqlalchemy import update

from contract.webhook_targets import Allowlist, TargetRefused, TargetUnresolved, check_target, public
from store.db import session_scope
from store.settings import Settings
from store.tables import Job, JobState, utcnow
from tests.conftest import WEBHOOK_SECRET, free_port
from tests.service.test_execution import add_job

NOWHERE: dict[str, list[str]] = {}


def resolver(table: dict[str, list[str]]) -> Any:
    def lookup(host: str) -> list[str]:
        if host not in table:
            raise OSError(f"{host} does not resolve")
        return table[host]

    return lookup


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.8.9.10:81/x",
        "http://0.0.0.0/",
        "http://10.0.0.1/",
        "http://172.16.0.1/",
        "http://172.31.0.1/",
        "http://192.168.0.1/",
        "http://169.254.169.254/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://[::1]/",
        "http://[::]/",
        "http://[fc00::1]/",
        "http://[fdff::1]/",
        "http://[fe80::1]/",
        "http://[::ffff:10.0.0.1]/",
    ],
)
def test_non_public_addresses_are_refused(url: str) -> None:
    with pytest.raises(TargetRefused, match="not a public address"):
        check_target(url, Allowlist(), resolver(NOWHERE))


@pytest.mark.parametrize("url", ["http://8.8.8.8/", "https://1.1.1.1:8443/h", "http://[2606:4700:4700::1111]/"])
def test_public_addresses_pass_without_a_lookup(url: str) -> None:
    check_target(url, Allowlist(), resolver(NOWHERE))


def test_a_name_passes_only_when_every_address_is_public() -> None:
    table = {"ok.example": ["93.184.216.34", "2606:2800:220:1::1"], "mixed.example": ["93.184.216.34", "127.0.0.1"]}
    check_target("https://ok.example/h", Allowlist(), resolver(table))
    with pytest.raises(TargetRefused, match="'mixed.example' resolves to 127.0.0.1"):
        check_target("https://mixed.example/h", Allowlist(), resolver(table))
    with pytest.raises(TargetUnresolved, match="does not resolve"):
        check_target("https://gone.example/h", Allowlist(), resolver(table))
    with pytest.raises(TargetUnresolved):
        check_target("https://empty.example/h", Allowlist(), resolver({"empty.example": []}))


def test_numeric_host_forms_and_real_localhost_are_resolved_to_loopback() -> None:
    """The forms a URL parser may leave alone still reach 127.0.0.1 through getaddrinfo."""
    for url in ("http://localhost/", "http://2130706433/", "http://localhost./"):
        with pytest.raises(TargetRefused):
            check_target(url, Allowlist())


def test_the_allowlist_parses_hosts_addresses_and_networks() -> None:
    allow = Allowlist.parse(" 127.0.0.1 , Hooks.Internal., 10.0.0.0/8,,::1, [fd00::1]")
    assert allow.hosts == frozenset({"hooks.internal"})
    assert [str(n) for n in allow.networks] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "fd00::1/128"]
    check_target("http://127.0.0.1:9999/hook", allow, resolver(NOWHERE))
    check_target("http://HOOKS.internal/hook", allow, resolver(NOWHERE))  # by name: not resolved at all
    check_target("http://10.9.8.7/", allow, resolver(NOWHERE))
    check_target("http://[::1]/", allow, resolver(NOWHERE))
    check_target("http://relay.example/", allow, resolver({"relay.example": ["10.1.1.1"]}))
    for url in ("http://127.0.0.2/", "http://192.168.1.1/", "http://[fd00::2]/", "http://other.internal/"):
        with pytest.raises(ValueError):
            check_target(url, allow, resolver({"other.internal": ["172.16.1.1"]}))


def test_ipv4_mapped_addresses_are_judged_as_ipv4() -> None:
    import ipaddress

    assert public(ipaddress.ip_address("::ffff:8.8.8.8"))
    assert not public(ipaddress.ip_address("::ffff:192.168.0.1"))


# At delivery: the worker applies the same rule before it POSTs.


class _Receiver(BaseHTTPRequestHandler):
    calls: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802
        self.calls.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def receiver() -> Iterator[str]:
    _Receiver.calls = []
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/hook"
    server.shutdown()


@pytest.fixture()
def hooked_job(settings: Settings, tenant: tuple[str, str], receiver: str) -> Iterator[str]:
    """A job with a callback on 127.0.0.1 (allowlisted in the test environment), already canceled and never
    published: a worker alive in the session (started by another test) neither runs it nor calls back, which a job
    submitted through the API and canceled afterwards could not promise (its message could reach that worker first,
    and a worker that finds a job already ended sends its webhook)."""
    job_id = add_job(settings, tenant[0], "text-to-image", {"prompt": "a red circle", "steps": 2})
    with session_scope(settings.database_url) as session:
        now = utcnow()
        session.execute(
            update(Job).where(Job.id == job_id).values(state=JobState.canceled, finished_at=now, callback_url=receiver)
        )
    yield job_id
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(webhook_delivered_at=utcnow()))


def test_delivery_checks_the_target_again(settings: Settings, hooked_job: str) -> None:
    from worker.webhooks import deliver

    with session_scope(settings.database_url) as session:
        job = session.get(Job, hooked_job)
        assert job is not None
        with pytest.raises(TargetRefused):
            deliver(job, WEBHOOK_SECRET, 5.0, Allowlist())
        assert _Receiver.calls == []
        assert deliver(job, WEBHOOK_SECRET, 5.0, Allowlist.parse("127.0.0.1")) == 200
    assert len(_Receiver.calls) == 1


def test_the_webhook_task_gives_up_on_a_refused_target_at_once(
    settings: Settings, hooked_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No POST and no retry: the task ends `refused` (a retry would raise celery's Retry)."""
    import worker.tasks as tasks

    monkeypatch.setattr(tasks, "get_settings", lambda: settings.model_copy(update={"webhook_allow_private": ""}))
    assert tasks.deliver_webhook(hooked_job) == "refused"
    assert _Receiver.calls == []
    with session_scope(settings.database_url) as session:
        job = session.get(Job, hooked_job)
        assert job is not None and job.webhook_delivered_at is None and job.webhook_attempts == 1
