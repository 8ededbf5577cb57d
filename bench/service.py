"""`make bench-service`: what the service costs on top of the method.

Measures, in one run: a 20-step `sdedit` job on the bundled model submitted over HTTP (submit to
terminal state, warm worker, the client waiting with one long poll `GET /v1/jobs/{id}?wait=30`; then the same jobs
polled every 20 ms) against the same `run(...)` call made in-process, the two taken in turns; the cold start of the
first job; and how many status polls per second the API answers.

Uses DATABASE_URL / CELERY_BROKER_URL when set (PostgreSQL + Redis), else embedded SQLite and the
filesystem broker.
"""

from __future__ import annotations

import http.client
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import free_port, machine, spawn, stop, wait_http, wait_log, write_results

N_JOBS = int(os.environ.get("BENCH_JOBS", "20"))
STEPS = 20
STRENGTH = 1.0  # all 20 steps run
POLL_SECONDS = 5.0


def input_png() -> bytes:
    from PIL import Image

    from models.shapes.world import Scene, ShapeObject, render

    scene = Scene(objects=(ShapeObject("circle", "red", "large", "center"),), background="light")
    buffer = io.BytesIO()
    Image.fromarray(render(scene).image).save(buffer, format="PNG")
    return buffer.getvalue()


def in_process(image_bytes: bytes, model_dir: Path) -> Callable[[int], float]:
    """The same job as a `run(...)` call in this process: returns a function that runs it once with a seed and gives
    its seconds (the model loaded and two runs made first, as the worker is warm)."""
    import torch
    from PIL import Image

    from models.editing import sdedit
    from worker.runtime import DevicePolicy, load_components

    torch.set_num_threads(int(os.environ.get("ATELIER_TORCH_THREADS", "1")))  # as the worker does
    components = load_components(model_dir, DevicePolicy(torch.device("cpu"), torch.float32, "sdpa"))
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    params = sdedit.Params(prompt="a large blue square at the center", strength=STRENGTH, steps=STEPS)

    def once(seed: int) -> float:
        started = time.perf_counter()
        sdedit.run(components, params, {"image": image}, generator=torch.Generator("cpu").manual_seed(seed))
        return time.perf_counter() - started

    once(0), once(1)
    return once


BREAKDOWN: list[dict[str, float]] = []


POLL_SECONDS_BETWEEN = 0.02  # the polling client's interval


def over_http(http: httpx.Client, file_id: str, seed: int, long_poll: bool = True) -> float:
    """Submit -> terminal state as the client sees it: with one long poll (`?wait=`), or polling every 20 ms."""
    body = {"image": file_id, "prompt": "a large blue square at the center", "strength": STRENGTH, "steps": STEPS}
    started = time.perf_counter()
    job = http.post("/v1/edits/sdedit", json={**body, "seed": seed}).json()
    submitted = time.perf_counter() - started
    while job["state"] not in ("succeeded", "failed", "canceled"):
        if long_poll:
            job = http.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
        else:
            time.sleep(POLL_SECONDS_BETWEEN)
            job = http.get(f"/v1/jobs/{job['id']}").json()
    elapsed = time.perf_counter() - started
    if job["state"] != "succeeded":
        raise RuntimeError(job)
    if not long_poll:
        return elapsed
    BREAKDOWN.append(
        {
            "queued_s": job["queued_seconds"],
            "worker_s": job["run_seconds"],
            "method_s": job["metrics"]["method_seconds"],
            "total_s": elapsed,
            "submit_s": submitted,
            "after_end_s": elapsed - submitted - job["queued_seconds"] - job["run_seconds"],
        }
    )
    return elapsed


def _hammer(base: str, headers: dict[str, str], path: str, counts: Any, index: int) -> None:
    """One polling client: the standard library's keep-alive HTTP connection, not httpx, whose own CPU time per
    request (about as much as the API's) would be taken from the two cores the API and Postgres share here."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))

    def poll() -> None:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"poll answered {response.status}")

    poll()  # connected before the clock starts
    stop_at = time.perf_counter() + POLL_SECONDS
    while time.perf_counter() < stop_at:
        poll()
        counts[index] += 1
    connection.close()


def poll_throughput(base: str, headers: dict[str, str], path: str, clients: int = 4) -> float:
    """Requests of `path` answered per second by the one API process, `clients` client processes asking."""
    counts = multiprocessing.Array("l", clients)
    processes = [
        multiprocessing.Process(target=_hammer, args=(base, headers, path, counts, i)) for i in range(clients)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    return sum(counts[:]) / POLL_SECONDS


def main() -> None:
    from store.db import session_scope
    from store.migrate import upgrade
    from store.settings import Settings
    from store.tenants import create_key, create_tenant

    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", f"sqlite:///{work / 'bench.db'}")
    env.setdefault("CELERY_BROKER_URL", "filesystem://")
    env.update({"ATELIER_BROKER_DIR": str(work / "broker"), "ATELIER_ARTIFACTS_DIR": str(work / "artifacts")})
    env["PYTHONUNBUFFERED"] = "1"
    os.environ.update(env)
    settings = Settings()
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        tenant = create_tenant(session, f"bench-{int(time.time())}")
        # The bench measures the service's throughput, not the quotas: its tenant's are lifted.
        tenant.limits = {"submissions_per_minute": 10**6, "max_active_jobs": 10**6, "max_running_jobs": 10**3}
        _, key = create_key(session, tenant.id)
    headers = {"Authorization": f"Bearer {key}"}
    image_bytes = input_png()
    model_dir = settings.models_dir / settings.default_model

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api_args = [
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:app_factory",
        "--factory",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = spawn(api_args, env, work / "api.log")
    worker = None
    try:
        wait_http(base + "/healthz")
        with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
            file_id = http.post("/v1/files", files={"file": ("in.png", image_bytes, "image/png")}).json()["id"]

            # Cold start: worker process launch -> first job done.
            launched = time.perf_counter()
            worker_args = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app",
                "worker",
                "-Q",
                "inference",
                "-c",
                "1",
                "--pool",
                "prefork",
                "-n",
                "bench@%h",
                "--loglevel",
                "INFO",
            ]
            worker = spawn(worker_args, env, work / "worker.log")
            wait_log(work / "worker.log", b"ready.")
            ready = time.perf_counter() - launched
            first = over_http(http, file_id, 0)
            cold = time.perf_counter() - launched

            over_http(http, file_id, 1)  # one more warm-up
            BREAKDOWN.clear()
            # Each job over HTTP, then the same call in this process (the worker idle by then): taken in turns, so
            # that the machine's speed, which drifts over minutes here, weighs on both sides alike.
            local = in_process(image_bytes, model_dir)
            http_times, local_times = [], []
            for i in range(N_JOBS):
                http_times.append(over_http(http, file_id, 2 + i))
                local_times.append(local(2 + i))
            polled_times = [over_http(http, file_id, 2 + i, long_poll=False) for i in range(N_JOBS)]
            last_job = http.get("/v1/jobs", params={"limit": 1}).json()["data"][0]["id"]
        polls = poll_throughput(base, headers, f"/v1/jobs/{last_job}")
        health = poll_throughput(base, headers, "/healthz")
    finally:
        if worker is not None:
            stop(worker)
        stop(server)

    http_median, local_median = statistics.median(http_times), statistics.median(local_times)
    polled_median = statistics.median(polled_times)
    ratio = http_median / local_median
    data: dict[str, Any] = {
        "machine": machine(),
        "database": settings.database_url.split(":")[0],
        "broker": settings.broker_url.split(":")[0],
        "jobs": N_JOBS,
        "steps": STEPS,
        "http_median_s": round(http_median, 4),
        "in_process_median_s": round(local_median, 4),
        "ratio_median": round(ratio, 3),
        "ratio_target": 1.05,
        "polled_20ms_median_s": round(polled_median, 4),
        "polled_20ms_ratio_median": round(polled_median / local_median, 3),
        "http_p90_s": round(sorted(http_times)[int(0.9 * (len(http_times) - 1))], 4),
        "cold_worker_ready_s": round(ready, 2),
        "cold_first_job_s": round(first, 2),
        "cold_launch_to_first_result_s": round(cold, 2),
        "status_polls_per_s": round(polls, 1),
        "status_polls_target": 1000,
        "healthz_per_s": round(health, 1),
        "breakdown_median_s": {k: round(statistics.median(b[k] for b in BREAKDOWN), 4) for k in BREAKDOWN[0]},
    }
    markdown = (
        f"| measure | value |\n|---|---|\n"
        f"| stack | {data['database']} + {data['broker']} broker, {machine()['cpu_count']} CPU cores |\n"
        f"| 20-step sdedit over HTTP, median (submit -> terminal, one long poll `?wait=30`) | "
        f"{http_median * 1000:.0f} ms |\n"
        f"| same `run(...)` in-process, median | {local_median * 1000:.0f} ms |\n"
        f"| ratio at the median (target <= 1.05) | {ratio:.3f} |\n"
        f"| the same jobs polled every 20 ms instead: median / ratio | {polled_median * 1000:.0f} ms / "
        f"{polled_median / local_median:.3f} |\n"
        f"| cold start: worker launch -> ready | {ready:.1f} s |\n"
        f"| cold start: first job (submit -> terminal) | {first:.2f} s |\n"
        f"| status polls per second (4 client processes, target >= 1000) | {polls:.0f} |\n"
        f"| the same clients on `/healthz` (no auth, no database: this machine's ceiling) | {health:.0f} |\n"
        "| breakdown (medians): submit request / submitted -> claimed / claimed -> terminal / method in worker / "
        "terminal -> client | "
        + " / ".join(
            f"{data['breakdown_median_s'][k] * 1000:.0f} ms"
            for k in ("submit_s", "queued_s", "worker_s", "method_s", "after_end_s")
        )
        + " |\n"
    )
    write_results(f"service-{data['database']}-{data['broker']}", data, markdown)
    sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
