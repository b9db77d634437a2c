"""A measured stack: NATS, the Moodle simulator and the bridge in this process
(the bridge in process is fine: it is not what these scenarios measure), and
one or more worker *subprocesses* whose trees are sampled.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from archive_worker.devstack import DevStack, dev_stack
from archive_worker.embedded import EmbeddedNats
from archive_worker.moodle_sim import MoodleSimulator

from .common import (
    MIB,
    TreeSampler,
    bench_settings,
    mean,
    percentile,
    quiz_job,
    role_env,
    role_process,
    tree_cpu_seconds,
)

#: Production settings except where a benchmark must differ: logs as JSON at
#: INFO (as deployed), status to Moodle every 15 s (the default).
WORKER_DEFAULTS: dict[str, Any] = {"log_level": "INFO"}

_RENDER_MS = re.compile(r"render\.complete item=\S+ ms=(\d+)")


@dataclass
class Stack:
    """The running parts of a measured stack."""

    dev: DevStack
    nats: EmbeddedNats
    workers: list[asyncio.subprocess.Process]
    logs: list[Path]
    sampler: TreeSampler
    queue_size: int
    rendered_offsets: list[int] = field(default_factory=list)

    @property
    def sim(self) -> MoodleSimulator:
        """The Moodle simulator."""
        return self.dev.moodle

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the worker processes."""
        return [w.pid for w in self.workers]

    def render_ms_since_mark(self) -> list[int]:
        """``render.complete`` durations logged since :meth:`mark_logs`."""
        out: list[int] = []
        for path, offset in zip(self.logs, self.rendered_offsets, strict=True):
            with path.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
            out += [int(m) for m in _RENDER_MS.findall(text)]
        return out

    def mark_logs(self) -> None:
        """Remember where the worker logs end now."""
        self.rendered_offsets = [p.stat().st_size for p in self.logs]


@contextlib.asynccontextmanager
async def measured_stack(
    tmp: Path, *, workers: int = 1, queue_size: int = 32, **worker_settings: Any
) -> AsyncIterator[Stack]:
    """NATS + simulator + bridge here, ``workers`` worker subprocesses."""
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(EmbeddedNats(tmp / "nats", port=0))
        assert nats.url is not None
        settings = bench_settings(nats.url, tmp, queue_size=queue_size)
        sim = await stack.enter_async_context(MoodleSimulator())
        dev = await stack.enter_async_context(
            dev_stack(settings, moodle=sim, worker=False)
        )
        procs: list[asyncio.subprocess.Process] = []
        logs: list[Path] = []
        for n in range(workers):
            values = {
                **WORKER_DEFAULTS,
                "queue_size": queue_size,
                "work_dir": str(tmp / f"work{n}"),
                "worker_id": f"bench-{n}",
                **worker_settings,
            }
            log = tmp / f"worker{n}.log"
            proc = await stack.enter_async_context(
                role_process(
                    "worker",
                    role_env(nats.url, **values),
                    log,
                    ready_text="worker.started",
                )
            )
            procs.append(proc)
            logs.append(log)
        sampler = stack.enter_context(TreeSampler([p.pid for p in procs]))
        yield Stack(dev, nats, procs, logs, sampler, queue_size, [0] * len(procs))


async def run_batch(
    stack: Stack, sizes: list[int], *, label: str = ""
) -> dict[str, Any]:
    """Submit jobs of these sizes at once; measure until all have ended.

    Returns wall time, attempts/min, CPU s/attempt of all worker trees
    (worker, Playwright driver, Chromium, Ghostscript), peak PSS and RSS of
    the trees, nats-server CPU per job and the logged render durations.
    """
    jobs = [quiz_job(stack.sim, n) for n in sizes]
    nats_proc = psutil.Process(stack.nats.pid) if stack.nats.pid else None
    nats_cpu0 = _cpu(nats_proc)
    cpu0 = sum(tree_cpu_seconds(pid) for pid in stack.worker_pids)
    stack.sampler.reset_peak()
    stack.mark_logs()
    started = time.monotonic()

    async def one(body: dict[str, Any]) -> tuple[str, float]:
        job_id = await stack.dev.submit("quiz_archiver", body)
        end = await stack.dev.wait_for_end(job_id)
        return str(end.status.value), time.monotonic() - started

    results = await asyncio.gather(*(one(body) for _, body in jobs))
    wall = time.monotonic() - started
    # Let the last status/ack settle before reading CPU counters.
    await asyncio.sleep(0.3)
    cpu = sum(tree_cpu_seconds(pid) for pid in stack.worker_pids) - cpu0
    nats_cpu = _cpu(nats_proc) - nats_cpu0
    attempts = sum(sizes)
    render_ms = stack.render_ms_since_mark()
    statuses = sorted({s for s, _ in results})
    return {
        "case": label or f"{len(sizes)}x{sizes[0]}",
        "jobs": len(sizes),
        "attempts": attempts,
        "status": ",".join(statuses),
        "wall_s": round(wall, 2),
        "s_per_attempt": round(wall / attempts, 3),
        "attempts_per_min": round(attempts * 60 / wall, 1),
        "cpu_s_per_attempt": round(cpu / attempts, 3),
        "peak_pss_mib": round(stack.sampler.peak_pss / MIB, 1),
        "peak_rss_sum_mib": round(stack.sampler.peak_rss / MIB, 1),
        "nats_cpu_ms_per_job": round(nats_cpu * 1000 / len(sizes), 1),
        "render_ms_p50": round(percentile(render_ms, 50)),
        "render_ms_mean": round(mean(render_ms)),
        "peak_pss_by_process_mib": dict(stack.sampler.peak_breakdown),
    }


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)
