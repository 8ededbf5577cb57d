"""`make chaos`: the job model under faults, against real Postgres and a Redis of its own.

It starts a Redis server on a free port, a fresh database (`<database>_chaos`) on the Postgres of
`DATABASE_URL`, the API (uvicorn) and two Celery workers, then runs one experiment per fault while a client
submits jobs (each with an Idempotency-Key, retried as a careful client retries) and a poller polls them:

| experiment | fault |
|---|---|
| steady | none: nothing may be re-sent (spurious deliveries) |
| pool-kill | SIGKILL of the pool process running a job, several times |
| worker-kill | SIGKILL of a whole worker (as if its machine died); a replacement starts |
| broker-restart | Redis killed and restarted empty while jobs are queued |
| database-drops | every connection of the service ended (`pg_terminate_backend`) every 0.5 s for a while |
| api-kill | the API SIGKILLed and restarted while jobs are submitted |

Each row counts, from the database and the client's records: jobs lost (a 201, or a key the client gave up
on, with no job that ended), duplicated (more than one job for one key, or a job run more than once where no
fault explains it), stuck (not ended by the deadline), failed (any job that failed: every fault here is one the
store survives), responses without a status (a connection dropped mid-request; refused connections while the
API is down are counted apart), spurious deliveries (re-sent messages in the fault-free run) and the recovery
time (kill -> the job claimed again; broker restart -> the first job started). `--short` (also run by
`make test`) does the same with fewer jobs. Writes `bench/results/chaos.{json,md}` (`chaos-short` for the
short form) and exits 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from bench.common import free_port, machine, spawn, stop, wait_http, wait_log, write_results

TERMINAL = {"succeeded", "failed", "canceled"}
TARGETS = {"worker_recovery_s": 15.0, "broker_recovery_s": 10.0}
TEXT_TO_IMAGE = "/v1/generations/text-to-image"


@dataclass
class Row:
    """One experiment's outcome."""

    experiment: str
    jobs: int = 0
    submitted_s: float = 0.0
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    failed: int = 0
    no_status: int = 0
    refused: int = 0
    spurious: int = 0
    recovery_s: list[float] = field(default_factory=list)
    recovery_target_s: float | None = None
    notes: str = ""

    def problems(self) -> list[str]:
        found = [
            f"{name} {value}"
            for name, value in (
                ("lost", self.lost),
                ("duplicated", self.duplicated),
                ("stuck", self.stuck),
                ("failed", self.failed),
                ("no-status responses", 0 if self.experiment == "api-kill" else self.no_status),
            )
            if value
        ]
        if self.experiment == "steady" and self.spurious:
            found.append(f"spurious deliveries {self.spurious}")
        if self.recovery_target_s is not None:
            late = [r for r in self.recovery_s if r > self.recovery_target_s]
            if late or not self.recovery_s:
                found.append(f"recovery {self.recovery_s} (target <= {self.recovery_target_s:g} s)")
        return found


class Service:
    """Redis, the API and the workers, as processes this run owns."""

    def __init__(self, work: Path, database_url: str) -> None:
        self.work = work
        self.redis_port, self.api_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.database_url = database_url
        self.env = dict(os.environ)
        self.env.update(
            {
                "DATABASE_URL": database_url,
                "CELERY_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "ATELIER_ARTIFACTS_DIR": str(work / "artifacts"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.redis: subprocess.Popen[bytes] | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("chaos needs redis-server on PATH")
        args = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.redis = spawn(args, self.env, self.work / f"redis-{self.starts}.log")
        self.starts += 1
        wait_log(self.work / f"redis-{self.starts - 1}.log", b"Ready to accept connections", timeout=30)

    def kill_redis(self) -> None:
        assert self.redis is not None
        os.killpg(self.redis.pid, signal.SIGKILL)
        self.redis.wait()

    def start_api(self) -> None:
        args = [sys.executable, "-m", "uvicorn", "api.main:app_factory", "--factory", "--port", str(self.api_port)]
        self.api = spawn([*args, "--log-level", "warning"], self.env, self.work / f"api-{time.time():.0f}.log")
        wait_http(self.base + "/healthz")

    def kill_api(self) -> None:
        assert self.api is not None
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait()

    def start_worker(self, name: str) -> None:
        """A worker that names itself as a machine of its own (`ATELIER_WORKER_HOST`), so the others cannot see
        its processes die: a killed worker's jobs come back by their lease, as after a machine's loss."""
        args = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "inference,training"]
        args += ["-c", "1", "--pool", "prefork", "-n", f"{name}@%h", "--loglevel", "INFO"]
        log = self.work / f"worker-{name}.log"
        self.workers[name] = spawn(args, {**self.env, "ATELIER_WORKER_HOST": f"chaos-{name}"}, log)
        wait_log(log, b"ready.", timeout=180)

    def pool_children(self, name: str) -> list[int]:
        worker = self.workers[name]
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(worker.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def kill_worker(self, name: str) -> None:
        worker = self.workers.pop(name)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    def stop_all(self) -> None:
        for process in [*self.workers.values(), self.api, self.redis]:
            if process is not None:
                stop(process)


class Client:
    """Submits and polls as a careful client does: Idempotency-Key on every job, retries on refusals and 5xx."""

    def __init__(self, base: str, key: str) -> None:
        self.base, self.headers = base, {"Authorization": f"Bearer {key}"}
        self.no_status = 0
        self.refused = 0
        self.lock = threading.Lock()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        try:
            return httpx.request(method, self.base + path, headers=kwargs.pop("headers", self.headers), **kwargs)
        except httpx.ConnectError:
            with self.lock:
                self.refused += 1
        except httpx.TransportError:  # connected, and no status came back
            with self.lock:
                self.no_status += 1
        return None

    def submit(self, key: str, body: dict[str, Any], deadline: float) -> str | None:
        """The job id for this key, or None if the client gave up at `deadline`."""
        headers = {**self.headers, "Idempotency-Key": key}
        while time.monotonic() < deadline:
            response = self._request("POST", TEXT_TO_IMAGE, json=body, headers=headers, timeout=30)
            if response is not None and response.status_code in (200, 201):
                return str(response.json()["id"])
            if response is not None and response.status_code not in (429, 500, 502, 503):
                raise RuntimeError(f"unexpected {response.status_code}: {response.text}")
            time.sleep(0.2)
        return None

    def state(self, job_id: str) -> str | None:
        response = self._request("GET", f"/v1/jobs/{job_id}", timeout=30)
        return str(response.json()["state"]) if response is not None and response.status_code == 200 else None


@contextmanager
def polling(client: Client, ids: list[str]) -> Iterator[None]:
    """A poller beside the experiment: GET of the known jobs, round and round."""
    done = threading.Event()

    def run() -> None:
        index = 0
        while not done.is_set():
            if ids:
                client.state(ids[index % len(ids)])
                index += 1
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class Chaos:
    def __init__(self, short: bool) -> None:
        self.short = short
        self.n = 8 if short else 40
        self.work = Path(tempfile.mkdtemp(prefix="atelier-chaos-"))
        admin_url = make_url(os.environ.get("DATABASE_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/test")
        if admin_url.get_backend_name() != "postgresql":
            raise SystemExit("chaos needs Postgres (DATABASE_URL)")
        self.chaos_url = admin_url.set(database=f"{admin_url.database}_chaos")
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.chaos_url.database}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{self.chaos_url.database}"'))
        url = self.chaos_url.render_as_string(hide_password=False)
        from store.migrate import upgrade

        upgrade(url)
        self.db = create_engine(url, pool_pre_ping=True)
        self.service = Service(self.work, url)
        self.client = Client(self.service.base, self._tenant_key())

    def _tenant_key(self) -> str:
        from store.db import session_scope
        from store.tenants import create_key, create_tenant

        with session_scope(self.service.database_url) as session:
            tenant = create_tenant(session, "chaos")
            tenant.limits = {"submissions_per_minute": 10**6, "max_active_jobs": 10**6, "max_running_jobs": 100}
            return create_key(session, tenant.id)[1]

    # What the database says

    def read(self, statement: Any) -> list[Any]:
        """Rows of `statement`, through the connection drops this run itself causes."""
        from store.retry import retrying

        def attempt() -> list[Any]:
            with self.db.connect() as connection:
                return list(connection.execute(statement))

        return retrying("reading the chaos database", attempt)

    def jobs(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        from store.tables import Job

        columns = (Job.id, Job.state, Job.attempts, Job.publish_count, Job.started_at, Job.lease_owner)
        return {row.id: row._asdict() for row in self.read(select(*columns).where(Job.id.in_(ids)))}

    def keys_with_jobs(self, prefix: str) -> dict[str, int]:
        from sqlalchemy import func

        from store.tables import Job

        rows = self.read(
            select(Job.idempotency_key, func.count())
            .where(Job.idempotency_key.like(f"{prefix}%"))
            .group_by(Job.idempotency_key)
        )
        return {str(key): int(count) for key, count in rows}

    def wait_ended(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(ids)
            if all(job["state"] in TERMINAL for job in jobs.values()) or time.monotonic() > deadline:
                return jobs
            time.sleep(0.5)

    def running_job_of(self, workers: list[str], timeout: float = 60) -> tuple[str, str] | None:
        """(worker, job) for a job a pool process of one of `workers` holds now, the first of them preferred, and
        not one a fault already hit (a job killed three times fails by design); waits for one (None: none did)."""
        from store.tables import Job

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = self.read(select(Job.id, Job.lease_owner).where(Job.state == "running"))
            for worker in workers:
                owners = [f":{pid}:" for pid in self.service.pool_children(worker)]  # a replaced child: new pid
                for job_id, owner in running:
                    if str(job_id) in self.rerun:
                        continue
                    if owner and any(marker in owner for marker in owners):
                        return worker, str(job_id)
            time.sleep(0.05)
        return None

    def claimed_again(self, job_id: str, attempts: int, since: float, timeout: float = 120) -> float:
        """Seconds from `since` (monotonic) until the job's attempt count passes `attempts`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.jobs([job_id])[job_id]
            if job["attempts"] > attempts or job["state"] in TERMINAL:
                return round(time.monotonic() - since, 2)
            time.sleep(0.05)
        return float("inf")

    # One experiment

    def experiment(
        self,
        name: str,
        steps: int,
        fault: Callable[[list[str]], list[float]] | None = None,
        rerun_allowed: Callable[[], set[str]] = set,
        timeout: float = 240,
    ) -> Row:
        """Submit `self.n` jobs from a thread while `fault` acts on the ids submitted so far, then count."""
        row = Row(name)
        prefix = f"{name}-{secrets.token_hex(3)}-"
        ids: list[str] = []
        given_up: list[str] = []
        before = (self.client.no_status, self.client.refused)
        started = time.monotonic()

        def submit_all() -> None:
            for index in range(self.n):
                key = f"{prefix}{index}"
                job_id = self.client.submit(key, {"prompt": "a red circle", "steps": steps}, time.monotonic() + 90)
                (ids.append(job_id) if job_id else given_up.append(key))

        submitter = threading.Thread(target=submit_all)
        with polling(self.client, ids):
            submitter.start()
            if fault is not None:
                row.recovery_s = fault(ids)
            submitter.join()
            row.submitted_s = round(time.monotonic() - started, 1)
            jobs = self.wait_ended(ids, timeout)
        row.jobs = len(ids)
        keys = self.keys_with_jobs(prefix)
        row.lost = len(given_up) + sum(1 for job_id in ids if job_id not in jobs)
        row.duplicated = sum(count - 1 for count in keys.values())
        allowed = rerun_allowed()
        row.duplicated += sum(1 for job in jobs.values() if job["attempts"] > 1 and job["id"] not in allowed)
        row.stuck = sum(1 for job in jobs.values() if job["state"] not in TERMINAL)
        row.failed = sum(1 for job in jobs.values() if job["state"] == "failed")
        row.spurious = sum(job["publish_count"] - 1 for job in jobs.values())
        row.no_status = self.client.no_status - before[0]
        row.refused = self.client.refused - before[1]
        return row

    # The faults

    def pool_kill(self, ids: list[str]) -> list[float]:
        """SIGKILL the pool process running a job, a few times; recovery: kill -> the job claimed again."""
        recoveries = []
        for round_ in range(2 if self.short else 4):
            names = sorted(self.service.workers)
            names = names[round_ % len(names) :] + names[: round_ % len(names)]  # each worker in turn
            found = self.running_job_of(names)
            if found is None:
                raise RuntimeError(f"no job started on any worker within 60 s (round {round_ + 1})")
            name, job_id = found
            attempts = self.jobs([job_id])[job_id]["attempts"]
            killed = time.monotonic()
            for pid in self.service.pool_children(name):
                os.kill(pid, signal.SIGKILL)
            self.rerun.add(job_id)
            recoveries.append(self.claimed_again(job_id, attempts, killed))
            print(f"  pool-kill round {round_ + 1}: {job_id} on {name}, {recoveries[-1]} s", file=sys.stderr)
        return recoveries

    def worker_kill(self, ids: list[str]) -> list[float]:
        """SIGKILL a whole worker while it runs a job (its machine died), start a replacement; recovery: kill ->
        the job claimed again (by the other worker, once the lease expired)."""
        found = self.running_job_of(sorted(self.service.workers))
        if found is None:
            raise RuntimeError("no job started on any worker within 60 s")
        name, job_id = found
        attempts = self.jobs([job_id])[job_id]["attempts"]
        killed = time.monotonic()
        self.service.kill_worker(name)
        self.rerun.add(job_id)
        replacement = threading.Thread(target=self.service.start_worker, args=(f"{name}r",))
        replacement.start()
        recovery = self.claimed_again(job_id, attempts, killed)
        replacement.join()
        return [recovery]

    def broker_restart(self, ids: list[str]) -> list[float]:
        """Kill Redis with jobs queued and start it again, empty; recovery: restart -> the first job started."""
        while len(ids) < self.n:  # every job submitted, most of them queued
            time.sleep(0.05)
        self.service.kill_redis()
        time.sleep(1.0)
        self.service.start_redis()
        restarted = time.monotonic()
        restart_wall = datetime.now(UTC)
        from store.tables import Job

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.read(select(Job.started_at).where(Job.id.in_(ids), Job.started_at > restart_wall)):
                return [round(time.monotonic() - restarted, 2)]
            time.sleep(0.05)
        return [float("inf")]

    def database_drops(self, ids: list[str]) -> list[float]:
        """End every connection of the service to its database every 0.5 s while the jobs run."""
        end = time.monotonic() + (6 if self.short else 15)
        cut = 0
        while time.monotonic() < end:
            with self.admin.connect() as connection:
                cut += len(
                    connection.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name "
                            "AND pid <> pg_backend_pid()"
                        ),
                        {"name": self.chaos_url.database},
                    ).all()
                )
            time.sleep(0.5)
        self.notes = f"{cut} connections ended"
        return []

    def api_kill(self, ids: list[str]) -> list[float]:
        """SIGKILL the API while jobs are being submitted, and start it again a second later."""
        for _ in range(1 if self.short else 3):
            while len(ids) < self.n // 3:
                time.sleep(0.02)
            self.service.kill_api()
            time.sleep(1.0)
            self.service.start_api()
        self.notes = "requests cut by the kill (no status) and refused while it is down are expected"
        return []

    # The run

    def run(self) -> list[Row]:
        self.rerun: set[str] = set()
        self.notes = ""
        service = self.service
        service.start_redis()
        service.start_api()
        starters = [threading.Thread(target=service.start_worker, args=(f"w{i}",)) for i in (1, 2)]
        for starter in starters:
            starter.start()
        for starter in starters:
            starter.join()
        rerun = lambda: self.rerun  # noqa: E731
        plan: list[tuple[str, int, Callable[[list[str]], list[float]] | None, float | None]] = [
            ("steady", 2, None, None),
            ("pool-kill", 40 if self.short else 200, self.pool_kill, TARGETS["worker_recovery_s"]),
            ("worker-kill", 40, self.worker_kill, TARGETS["worker_recovery_s"]),
            ("broker-restart", 40, self.broker_restart, TARGETS["broker_recovery_s"]),
            ("database-drops", 6, self.database_drops, None),
            ("api-kill", 2, self.api_kill, None),
        ]
        rows: list[Row] = []
        try:
            for name, steps, fault, target in plan:
                self.notes = ""
                row = self.experiment(name, steps, fault, rerun_allowed=rerun)
                row.recovery_target_s, row.notes = target, self.notes
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
        finally:
            service.stop_all()
            self.db.dispose()
            with self.admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{self.chaos_url.database}" WITH (FORCE)'))
            self.admin.dispose()
        return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| experiment | jobs | lost | duplicated | stuck | failed | no-status responses | refused (API down) "
        "| spurious deliveries | recovery s (target) | met | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        recovery = ", ".join(f"{r:g}" for r in row.recovery_s) or "-"
        if row.recovery_target_s is not None:
            recovery += f" (<= {row.recovery_target_s:g})"
        met = "yes" if not row.problems() else "**no**: " + "; ".join(row.problems())
        lines.append(
            f"| {row.experiment} | {row.jobs} | {row.lost} | {row.duplicated} | {row.stuck} | {row.failed} "
            f"| {row.no_status} | {row.refused} | {row.spurious} | {recovery} | {met} | {row.notes} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="fewer jobs and faults (what `make test` runs)")
    parser.add_argument("--no-write", action="store_true", help="print the table only (the test suite's run)")
    args = parser.parse_args(argv)
    chaos = Chaos(args.short)
    rows = chaos.run()
    markdown = table(rows)
    print(markdown)
    data = {"machine": machine(), "short": args.short, "rows": [row.__dict__ for row in rows]}
    if not args.no_write:
        write_results("chaos-short" if args.short else "chaos", data, markdown)
    if any(row.problems() for row in rows):
        print(f"logs kept in {chaos.work}")
        return 1
    with suppress(OSError):
        shutil.rmtree(chaos.work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
