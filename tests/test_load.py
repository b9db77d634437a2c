"""A burst of 1,000 submissions against a queue of 100, bridge and worker in
child processes: the overflow gets 429 with Retry-After, nothing gets a 5xx,
every accepted job ends FINISHED in Moodle, and the resident memory of both
processes stays flat between the middle and the end of the run.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from archive_worker.embedded import EmbeddedNats
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.model import SimJob
from tests.procs import free_port, role

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SUBMISSIONS = 1000
QUEUE_SIZE = 100
CONCURRENCY = 40
#: Growth of resident memory allowed between the middle and the end (KiB).
RSS_GROWTH_LIMIT_KB = 40 * 1024


def empty_job(moodle: MoodleSimulator, n: int) -> tuple[SimJob, dict[str, Any]]:
    """A job without attempts or backups, with its own token."""
    token = f"load-{n:05d}"
    job = moodle.add_job(token, "quiz_archiver", courseid=1, cmid=1, quizid=1)
    body = {
        "api_version": 7,
        "moodle_base_url": moodle.base_url,
        "moodle_ws_url": moodle.ws_url,
        "moodle_upload_url": moodle.upload_url,
        "wstoken": token,
        "courseid": 1,
        "cmid": 1,
        "quizid": 1,
        "task_archive_quiz_attempts": None,
        "task_moodle_backups": None,
        "archive_filename": f"archive-{n}",
    }
    return job, body


async def test_burst_of_1000_against_a_queue_of_100(
    nats_server: EmbeddedNats, moodle: MoodleSimulator, tmp_path: Path
) -> None:
    """429 for the overflow, no 5xx, every accepted job FINISHED, memory flat."""
    assert nats_server.url is not None
    port = free_port()
    common = {
        "queue_size": QUEUE_SIZE,
        "data_dir": tmp_path / "data",
        "retry_after_s": 7,
        "log_level": "INFO",
    }
    jobs = [empty_job(moodle, n) for n in range(SUBMISSIONS)]
    statuses: list[int] = []
    accepted: list[SimJob] = []
    rss: dict[str, list[int]] = {"bridge": [], "worker": []}
    async with (
        role(
            "bridge",
            {**common, "host": "127.0.0.1", "port": port},
            nats_url=nats_server.url,
        ) as bridge,
        role(
            "worker",
            {
                **common,
                "log_level": "INFO",
                "job_slots": 4,
                "status_interval_s": 0,
                "pdfa_conversion": False,
                "work_dir": tmp_path / "work",
            },
            nats_url=nats_server.url,
        ) as worker,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONCURRENCY)
        ) as http,
    ):
        url = f"http://127.0.0.1:{port}/archive"
        slots = asyncio.Semaphore(CONCURRENCY)

        async def submit(job: SimJob, body: dict[str, Any]) -> None:
            async with slots, http.post(url, json=body) as reply:
                data = await reply.json()
                statuses.append(reply.status)
                if reply.status == 200:
                    accepted.append(job)
                elif reply.status == 429:
                    assert reply.headers["Retry-After"] == "7"
                    assert data == {"error": "Maximum number of queued jobs exceeded."}

        half = SUBMISSIONS // 2
        await asyncio.gather(*(submit(j, b) for j, b in jobs[:half]))
        rss["bridge"].append(bridge.rss_kb())
        rss["worker"].append(worker.rss_kb())
        await asyncio.gather(*(submit(j, b) for j, b in jobs[half:]))
        await asyncio.wait_for(
            asyncio.gather(*(j.done.wait() for j in accepted)), timeout=120
        )
        rss["bridge"].append(bridge.rss_kb())
        rss["worker"].append(worker.rss_kb())

    assert len(statuses) == SUBMISSIONS
    assert not [s for s in statuses if s >= 500]
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) > 0
    assert statuses.count(200) >= QUEUE_SIZE
    assert all(j.state == "FINISHED" and len(j.uploads) == 1 for j in accepted)
    refused = {id(j) for j, _ in jobs} - {id(j) for j in accepted}
    assert all(not j.uploads for j, _ in jobs if id(j) in refused)
    for name, (middle, end) in rss.items():
        assert end - middle < RSS_GROWTH_LIMIT_KB, (name, middle, end)
