"""Scenario ``scale``: two worker processes against one, and NATS per job.

*Workers*: the same batch (8 jobs of 10 attempts; quick: 4 x 3) on one
worker process and on two, each with production settings (2 job slots,
2 renders at a time, PDF/A off), all on this machine's cores.

*NATS*: the broker calls the service makes per job, against an embedded
nats-server, measured in this process: ``publish`` = the bridge's
``Broker.publish_job`` until JetStream's PubAck; ``fetch to ack`` = the
worker's ``JobQueue.fetch(1)`` plus ``Delivery.ack()`` (a synchronous ack),
one job at a time; plus nats-server CPU per job for both.
"""

from __future__ import annotations

import time
import uuid

import psutil

from archive_worker.broker import Broker
from archive_worker.embedded import EmbeddedNats
from archive_worker.jobqueue import JobQueue
from archive_worker.jobs import Flavour
from archive_worker.moodle_sim import MoodleSimulator
from bridge.requests import parse_job

from .common import Scenario, bench_settings, percentile, quiz_job, scratch_dir
from .harness import measured_stack, run_batch


async def run(quick: bool) -> Scenario:
    """Workers 1 vs 2, then the NATS round trips."""
    sc = Scenario("scale", "4. Scale: worker processes, and NATS cost per job")
    sizes = [3] * 4 if quick else [10] * 8
    walls = {}
    for workers in (1, 2):
        with scratch_dir("scale") as tmp:
            async with measured_stack(
                tmp, workers=workers, job_slots=2, pdfa_conversion=False
            ) as stack:
                await run_batch(stack, [1] * workers)  # warm-up, discarded
                row = await run_batch(
                    stack, sizes, label=f"{len(sizes)} jobs x {sizes[0]}"
                )
        walls[workers] = row["wall_s"]
        sc.rows.append({"workers": workers, "slots_each": 2, "pdfa": False, **row})
    sc.extra["speedup_2_vs_1"] = round(walls[1] / walls[2], 2)
    sc.notes.append(
        f"2 worker processes vs 1: {walls[1] / walls[2]:.2f}x the throughput"
        f" on {psutil.cpu_count()} cores"
    )
    sc.rows.append(await nats_cost(20 if quick else 200))
    return sc


async def nats_cost(count: int) -> dict[str, object]:
    """Publish ``count`` jobs, then fetch and ack them one by one."""
    with scratch_dir("nats") as tmp:
        async with EmbeddedNats(tmp / "nats", port=0) as nats, MoodleSimulator() as sim:
            assert nats.url is not None
            assert nats.pid is not None
            settings = bench_settings(nats.url, tmp, queue_size=count + 10)
            server = psutil.Process(nats.pid)
            broker = await Broker.connect(settings, url=nats.url, name="bench")
            try:
                await broker.ensure_topology()
                _, body = quiz_job(sim, 10)
                spec = parse_job(Flavour.QUIZ_ARCHIVER, body)
                publish: list[float] = []
                cpu0 = sum(server.cpu_times()[:2])
                for _ in range(count):
                    started = time.perf_counter()
                    await broker.publish_job(spec, msg_id=uuid.uuid4().hex)
                    publish.append(time.perf_counter() - started)
                cpu_pub = sum(server.cpu_times()[:2]) - cpu0
                queue = JobQueue(broker)
                await queue.open()
                fetch: list[float] = []
                cpu0 = sum(server.cpu_times()[:2])
                for _ in range(count):
                    started = time.perf_counter()
                    (delivery,) = await queue.fetch(1, timeout_s=5)
                    await delivery.ack()
                    fetch.append(time.perf_counter() - started)
                cpu_fetch = sum(server.cpu_times()[:2]) - cpu0
                await queue.close()
            finally:
                await broker.close()
    return {
        "case": f"NATS, {count} jobs one at a time",
        "publish_ms_p50": round(percentile(publish, 50) * 1000, 2),
        "publish_ms_p99": round(percentile(publish, 99) * 1000, 2),
        "fetch_ack_ms_p50": round(percentile(fetch, 50) * 1000, 2),
        "fetch_ack_ms_p99": round(percentile(fetch, 99) * 1000, 2),
        "nats_cpu_ms_per_job": round((cpu_pub + cpu_fetch) * 1000 / count, 2),
    }
