"""Scenario ``admission``: the bridge under 50 concurrent clients.

The bridge runs as a subprocess (``archive-worker bridge``, INFO logs as in
production) on an embedded nats-server; the Moodle simulator that answers
its probes runs in a thread of this process with its own event loop, and 50
client tasks post valid quiz_archiver jobs (each with its own token) in a
closed loop.  No worker runs, so every accepted job stays queued.

* ``below limit``: ``queue_size`` above the number of requests; all must be
  200.  Requests per second, p50/p99 latency (client side, so it includes
  the client's own scheduling) and bridge CPU per request.
* ``at limit``: production ``queue_size`` (32) and many more requests than
  places: the first 32 get 200, the rest 429 with Retry-After, none an error.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from archive_worker.embedded import EmbeddedNats
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.scenario import reference_quiz

from .common import (
    Scenario,
    free_port,
    mean,
    new_token,
    percentile,
    role_env,
    role_process,
    scratch_dir,
)

CLIENTS = 50
P99_TARGET_MS = 50.0


@contextmanager
def sim_thread() -> Iterator[tuple[MoodleSimulator, asyncio.AbstractEventLoop]]:
    """A Moodle simulator served by its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sim = MoodleSimulator()
    asyncio.run_coroutine_threadsafe(sim.start(), loop).result(30)
    try:
        yield sim, loop
    finally:
        asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def job_bodies(sim: MoodleSimulator, count: int) -> list[bytes]:
    """``count`` valid job bodies with fresh tokens registered in ``sim``."""
    job, template = reference_quiz(sim, token=new_token(), backups=False)
    template["task_moodle_backups"] = None
    bodies = []
    for _ in range(count):
        token = new_token()
        sim.add_job(
            token,
            job.flavour,
            courseid=job.courseid,
            cmid=job.cmid,
            quizid=job.quizid,
            contextid=job.contextid,
            course_contextid=job.course_contextid,
        )
        bodies.append(json.dumps({**template, "wstoken": token}).encode())
    return bodies


async def load(url: str, bodies: list[bytes]) -> dict[str, Any]:
    """Post ``bodies`` from :data:`CLIENTS` closed-loop clients."""
    latencies: dict[int, list[float]] = {}
    errors: list[str] = []
    retry_after_missing = 0
    queue = iter(bodies)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client() -> None:
            nonlocal retry_after_missing
            for body in queue:
                started = time.perf_counter()
                try:
                    async with http.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                        if status == 429 and "Retry-After" not in resp.headers:
                            retry_after_missing += 1
                except aiohttp.ClientError as exc:
                    errors.append(repr(exc))
                    continue
                took = time.perf_counter() - started
                latencies.setdefault(status, []).append(took)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        wall = time.perf_counter() - started
    return {
        "wall": wall,
        "latencies": latencies,
        "errors": errors,
        "retry_after_missing": retry_after_missing,
    }


async def phase(
    tmp: Path, queue_size: int, requests: int, label: str
) -> dict[str, Any]:
    """One bridge, one load; returns a table row."""
    with sim_thread() as (sim, _loop):
        bodies = job_bodies(sim, requests)
        async with EmbeddedNats(tmp / label / "nats", port=0) as nats:
            assert nats.url is not None
            port = free_port()
            env = role_env(
                nats.url,
                host="127.0.0.1",
                port=port,
                queue_size=queue_size,
                log_level="INFO",
            )
            async with role_process(
                "bridge",
                env,
                tmp / f"bridge-{label}.log",
                ready_text="bridge.listening",
            ) as proc:
                bridge = psutil.Process(proc.pid)
                cpu0 = sum(bridge.cpu_times()[:2])
                result = await load(f"http://127.0.0.1:{port}/archive", bodies)
                cpu = sum(bridge.cpu_times()[:2]) - cpu0
    lat = result["latencies"]
    ok, full = lat.get(200, []), lat.get(429, [])
    other = {str(k): len(v) for k, v in lat.items() if k not in (200, 429)}
    every = [t for v in lat.values() for t in v]
    return {
        "case": label,
        "queue_size": queue_size,
        "clients": CLIENTS,
        "requests": requests,
        "ok_200": len(ok),
        "full_429": len(full),
        "other_status": other,
        "errors": len(result["errors"]),
        "retry_after_missing": result["retry_after_missing"],
        "req_per_s": round(requests / result["wall"], 1),
        "p50_ms": round(percentile(every, 50) * 1000, 1),
        "p99_ms": round(percentile(every, 99) * 1000, 1),
        "p99_ms_200": round(percentile(ok, 99) * 1000, 1),
        "p99_ms_429": round(percentile(full, 99) * 1000, 1),
        "mean_ms": round(mean(every) * 1000, 1),
        "bridge_cpu_ms_per_req": round(cpu * 1000 / requests, 2),
        "error_samples": result["errors"][:3],
    }


async def run(quick: bool, requests: int | None = None) -> Scenario:
    """Below the queue limit, then at it; see the module docstring."""
    sc = Scenario("admission", "3. Admission: bridge under 50 concurrent clients")
    below = requests or (20 if quick else 1000)
    over = max(below // 2, 10) if quick else 300
    with scratch_dir("admission") as tmp:
        row = await phase(tmp, below + 10, below, "below limit")
        sc.rows.append(row)
        sc.target(
            "p99 latency below the queue limit (ms)",
            f"<= {P99_TARGET_MS:g}",
            row["p99_ms"],
            row["p99_ms"] <= P99_TARGET_MS and row["ok_200"] == below,
        )
        limit = await phase(tmp, 32, 32 + over, "at limit (32)")
        sc.rows.append(limit)
        clean = (
            limit["ok_200"] == 32
            and limit["full_429"] == over
            and not limit["errors"]
            and not limit["other_status"]
        )
        sc.target(
            "at the limit: exactly queue_size accepted, rest 429, no errors",
            "200 x 32, 429 x rest, 0 errors",
            f"200 x {limit['ok_200']}, 429 x {limit['full_429']},"
            f" errors {limit['errors']}, other {limit['other_status'] or 0}",
            clean,
        )
    return sc
