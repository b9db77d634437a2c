"""Faults injected on loopback, each with its exact outcome (RELIABILITY.md).

Workers and bridges that must die run as real child processes
(:mod:`tests.procs`); NATS is a real nats-server with file storage; Moodle is
the simulator.  Every wait has a deadline and waits for something concrete:
a status event, a log line of a child, a process exit, or Moodle's record of
the job.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import signal
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pypdf
import pytest

from archive_worker import constants as c
from archive_worker.broker import Broker
from archive_worker.config import Settings
from archive_worker.devstack import DevStack, dev_stack
from archive_worker.embedded import EmbeddedNats
from archive_worker.events import StatusEvent
from archive_worker.jobs import JobStatus
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.model import SimJob
from archive_worker.ops import fleet
from tests.natscluster import wait_until
from tests.procs import (
    free_port,
    many_item_job,
    role,
    wait_done,
    wait_for_event,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPORT_CALL = "quiz_archiver_generate_attempt_report"
CHECKPOINT_STREAM = f"OBJ_{c.CHECKPOINT_BUCKET}"


def worker_settings(tmp_path: Path, **overrides: object) -> dict[str, object]:
    """ARCHIVE_WORKER_* values for a worker child process."""
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "work_dir": tmp_path / "work",
        "pdfa_conversion": False,
        "status_interval_s": 0,
        "ack_wait_s": 2,
        "job_slots": 1,
        "render_concurrency": 2,
        "retry_backoff_s": 0.2,
        "retry_backoff_max_s": 0.5,
        "ready_signal_timeout_s": 10,
        "drain_grace_s": 30,
    }
    values.update(overrides)
    return values


@pytest.fixture
def settings_for(stack_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Stack settings with a short lease, so redeliveries come quickly."""
    return functools.partial(stack_settings, ack_wait_s=2)


@pytest.fixture
async def bridge_only(
    settings_for: Callable[..., Settings], moodle: MoodleSimulator
) -> AsyncIterator[DevStack]:
    """Bridge and broker in this process; workers are started by the test."""
    async with dev_stack(settings_for(), moodle=moodle, worker=False) as stack:
        yield stack


def unpack(job: SimJob) -> dict[str, bytes]:
    """The archive Moodle stored, as member name -> bytes."""
    with zipfile.ZipFile(io.BytesIO(job.archive_bytes())) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def pdf_text(data: bytes) -> str:
    """All text of a PDF, whitespace folded."""
    reader = pypdf.PdfReader(io.BytesIO(data))
    return " ".join(" ".join(p.extract_text().split()) for p in reader.pages)


def assert_complete_archive(job: SimJob, item_ids: list[int]) -> None:
    """Every attempt is in the archive once, with its own PDF and HTML."""
    members = unpack(job)
    payload = {n for n in members if not n.endswith(".sha256")}
    expected = {"attempts_metadata.csv"}
    for item_id in item_ids:
        base = f"attempts/attempt-{item_id}/attempt-{item_id}"
        expected |= {f"{base}.pdf", f"{base}.html"}
    assert payload == expected
    for item_id in item_ids:
        base = f"attempts/attempt-{item_id}/attempt-{item_id}"
        assert f"Attempt {item_id}" in pdf_text(members[f"{base}.pdf"])
        assert members[f"{base}.html"].decode() == job.items[item_id].html
    csv_rows = members["attempts_metadata.csv"].split(b"\r\n")[1:-1]
    assert [int(r.split(b",")[0]) for r in csv_rows] == item_ids


async def stream_messages(broker: Broker, stream: str) -> int:
    """Messages stored in a stream now."""
    info = await broker.js.stream_info(stream)
    return int(info.state.messages)


def is_render_step(delivery: int) -> Callable[[StatusEvent], bool]:
    """Matches a progress event of the given delivery."""
    return lambda e: e.stage == "render" and e.delivery == delivery


class TestWorkerKilled:
    async def test_kill_9_at_80_percent_resumes_from_checkpoints(
        self, bridge_only: DevStack, nats_server: EmbeddedNats, tmp_path: Path
    ) -> None:
        """kill -9 at 24/30 attempts: redelivered, resumed, FINISHED, one upload.

        The second worker restores the checkpointed attempts (no report call,
        no render) and does only the rest, so Moodle sees about 30 report
        calls plus the few that were in flight, not 54.
        """
        stack, moodle = bridge_only, bridge_only.moodle
        ids = list(range(1001, 1031))
        job, body = many_item_job(moodle, token="kill9-token", count=30)
        assert nats_server.url is not None
        settings = worker_settings(tmp_path)

        async with role("worker", settings, nats_url=nats_server.url) as first:
            job_id = await stack.submit("quiz_archiver", body)
            done_before_kill: list[StatusEvent] = []
            await wait_for_event(
                stack.broker,
                job_id,
                lambda e: e.stage == "render" and (e.progress or 0) >= 80,
                timeout_s=60,
                seen=done_before_kill,
            )
            first.kill()
            assert await first.wait(timeout_s=10) == -signal.SIGKILL
        rendered_first = len(first.events("render.complete"))
        calls_first = len(moodle.calls_to(REPORT_CALL))

        async with role("worker", settings, nats_url=nats_server.url) as second:
            final = await wait_for_event(
                stack.broker, job_id, lambda e: e.status.is_terminal, timeout_s=60
            )
            await second.wait_for_line("job.finished", timeout_s=10)
            rendered_second = len(second.events("render.complete"))
            restored = len(second.events("checkpoint.restored"))

        assert final.status is JobStatus.FINISHED
        assert final.delivery == 2
        assert job.state == "FINISHED"
        assert len(job.uploads) == 1
        assert_complete_archive(job, ids)
        # Resumed, not restarted: at most the attempts in flight at the kill
        # (render_concurrency=2, plus the next report already asked for) are
        # done twice.
        assert 24 <= restored <= 30
        assert rendered_second == 30 - restored
        assert rendered_first + rendered_second <= 30 + 3
        assert 30 <= len(moodle.calls_to(REPORT_CALL)) <= 30 + 3
        assert calls_first >= restored
        # The job left the work queue and its checkpoints the object store.
        assert await stream_messages(stack.broker, c.JOBS_STREAM) == 0
        assert await stream_messages(stack.broker, CHECKPOINT_STREAM) == 0


class TestChromiumKilled:
    async def test_browser_killed_mid_render_is_restarted_and_job_continues(
        self,
        settings_for: Callable[..., Settings],
        moodle: MoodleSimulator,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Chromium killed while pages render: new browser, same job FINISHED."""
        caplog.set_level("INFO", logger="worker")
        ids = list(range(1001, 1009))
        job, body = many_item_job(moodle, token="chromium-token", count=8, busy_ms=400)
        async with dev_stack(settings_for(), moodle=moodle) as stack:
            launched = [
                r.getMessage()
                for r in caplog.records
                if r.getMessage().startswith("browser.launched")
            ]
            pid = int(launched[-1].split("pid=")[1].split()[0])
            job_id = await stack.submit("quiz_archiver", body)
            await wait_for_event(stack.broker, job_id, is_render_step(1), timeout_s=60)
            os.kill(pid, signal.SIGKILL)
            final = await stack.wait_for_end(job_id)
            (snapshot,) = await fleet.workers(stack.broker)

        # The worker's own registry entry says the browser was replaced.
        assert snapshot.browser_restarts >= 1
        assert final.status is JobStatus.FINISHED
        assert final.delivery == 1
        assert len(job.uploads) == 1
        assert_complete_archive(job, ids)


class TestBridgeRestarted:
    async def test_bridge_killed_and_restarted_mid_job(
        self,
        settings_for: Callable[..., Settings],
        moodle: MoodleSimulator,
        nats_server: EmbeddedNats,
        tmp_path: Path,
    ) -> None:
        """kill -9 of the bridge: the job runs on, a new bridge answers its status."""
        assert nats_server.url is not None
        port = free_port()
        bridge_env = {"host": "127.0.0.1", "port": port, "data_dir": tmp_path / "b"}
        job, body = many_item_job(moodle, token="bridge-token", count=6, busy_ms=300)
        async with (
            dev_stack(settings_for(), moodle=moodle) as stack,
            aiohttp.ClientSession() as http,
        ):
            url = f"http://127.0.0.1:{port}"
            async with role("bridge", bridge_env, nats_url=nats_server.url) as old:
                async with http.post(f"{url}/archive", json=body) as reply:
                    assert reply.status == 200
                    job_id = (await reply.json())["jobid"]
                await wait_for_event(
                    stack.broker, job_id, is_render_step(1), timeout_s=60
                )
                old.kill()
                await old.wait(timeout_s=10)
            async with role("bridge", bridge_env, nats_url=nats_server.url):
                async with http.get(f"{url}/status/{job_id}") as reply:
                    assert reply.status == 200
                    running = await reply.json()
                final = await stack.wait_for_end(job_id)
                async with http.get(f"{url}/status/{job_id}") as reply:
                    finished = await reply.json()

        assert running["id"] == job_id
        assert running["status"] in {"RUNNING", "FINALIZING", "FINISHED"}
        assert finished == {"id": job_id, "status": "FINISHED"}
        assert final.status is JobStatus.FINISHED
        assert final.delivery == 1
        assert len(job.uploads) == 1


class TestNatsRestarted:
    async def test_nats_killed_and_restarted_mid_job(
        self,
        make_settings: Callable[..., Settings],
        moodle: MoodleSimulator,
        tmp_path: Path,
    ) -> None:
        """kill -9 of nats-server mid-job: file storage keeps it, clients reconnect."""
        port = free_port()
        server = EmbeddedNats(tmp_path / "nats-fixed", port=port)
        await server.start()
        ids = list(range(1001, 1011))
        job, body = many_item_job(moodle, token="nats-token", count=10, busy_ms=300)
        settings = make_settings(
            nats_url=server.url,
            ack_wait_s=2,
            retry_backoff_s=0.2,
            retry_backoff_max_s=0.5,
        )
        try:
            async with dev_stack(settings, moodle=moodle) as stack:
                job_id = await stack.submit("quiz_archiver", body)
                await wait_for_event(
                    stack.broker, job_id, is_render_step(1), timeout_s=60
                )
                server.kill()
                await server.stop()
                await server.start()
                await wait_done(job, timeout_s=90)
                final = await wait_for_event(
                    stack.broker, job_id, lambda e: e.status.is_terminal, timeout_s=30
                )
                async with stack.http.get(f"{stack.bridge_url}/status/{job_id}") as r:
                    status = await r.json()
                jobs_left = await stream_messages(stack.broker, c.JOBS_STREAM)
        finally:
            await server.stop()

        assert job.state == "FINISHED"
        assert len(job.uploads) == 1
        assert_complete_archive(job, ids)
        assert final.status is JobStatus.FINISHED
        assert status == {"id": job_id, "status": "FINISHED"}
        assert jobs_left == 0


class TestLeaseLost:
    async def test_redelivery_to_the_running_worker_is_adopted(
        self,
        make_settings: Callable[..., Settings],
        moodle: MoodleSimulator,
        tmp_path: Path,
    ) -> None:
        """A lease lost while NATS was away: the running worker keeps one run."""
        server = EmbeddedNats(tmp_path / "nats-lease", port=free_port())
        await server.start()
        job, body = many_item_job(moodle, token="lease-token", count=2)
        release = moodle.hang(REPORT_CALL, times=None)
        # A lease shorter than the outage below, and a free slot for the
        # redelivery to land in.
        settings = make_settings(nats_url=server.url, ack_wait_s=0.5, job_slots=2)
        try:
            async with dev_stack(settings, moodle=moodle) as stack:
                job_id = await stack.submit("quiz_archiver", body)
                await wait_for_event(
                    stack.broker,
                    job_id,
                    lambda e: e.status is JobStatus.RUNNING,
                    timeout_s=30,
                )
                server.kill()
                await server.stop()
                await server.start()
                await wait_until(
                    lambda: redelivered(stack.broker),
                    timeout_s=30,
                    what="redelivery of the running job",
                )
                release.set()
                await wait_done(job, timeout_s=60)
                final = await wait_for_event(
                    stack.broker, job_id, lambda e: e.status.is_terminal, timeout_s=30
                )
        finally:
            await server.stop()

        assert final.status is JobStatus.FINISHED
        assert job.state == "FINISHED"
        assert len(job.uploads) == 1
        # One run: Moodle heard RUNNING with progress 0 once.
        assert job.progress.count(0) == 1


async def redelivered(broker: Broker) -> bool:
    """True once the workers' consumer has redelivered a message."""
    info = await broker.js.consumer_info(c.JOBS_STREAM, c.WORKERS_CONSUMER)
    return bool(info.num_redelivered)


class TestMoodleFaults:
    async def test_500s_are_retried_with_backoff_then_finish(
        self, settings_for: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """Two HTTP 500s on the report call: two naks with delay, then FINISHED."""
        job, body = many_item_job(moodle, token="retry-token", count=1)
        moodle.fail_next(REPORT_CALL, times=2, status=500)
        events: list[StatusEvent] = []
        async with dev_stack(settings_for(), moodle=moodle) as stack:
            job_id = await stack.submit("quiz_archiver", body)
            final = await stack.wait_for_end(job_id, on_event=events.append)

        retries = [e for e in events if e.error_code == "moodle_unavailable"]
        assert [e.status for e in retries] == [JobStatus.AWAITING_PROCESSING] * 2
        for event in retries:
            assert event.error is not None
            assert "[stage report, item 1001]" in event.error
            assert "HTTP 500" in event.error
        assert final.status is JobStatus.FINISHED
        assert final.delivery == 3
        assert len(moodle.calls_to(REPORT_CALL)) == 3
        assert len(job.uploads) == 1

    async def test_hanging_moodle_times_out_then_succeeds(
        self, settings_for: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """A report call that hangs past the read timeout is retried, then done."""
        job, body = many_item_job(moodle, token="hang-token", count=1)
        release = moodle.hang(REPORT_CALL, times=1)
        events: list[StatusEvent] = []
        async with dev_stack(
            settings_for(http_read_timeout_s=1), moodle=moodle
        ) as stack:
            job_id = await stack.submit("quiz_archiver", body)
            final = await stack.wait_for_end(job_id, on_event=events.append)
            release.set()

        retry = [e for e in events if e.error_code == "moodle_unavailable"]
        assert len(retry) == 1
        assert retry[0].error is not None
        assert "[stage report, item 1001]" in retry[0].error
        assert final.status is JobStatus.FINISHED
        assert len(job.uploads) == 1

    async def test_moodle_500_for_good_fails_with_a_clear_reason(
        self, settings_for: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """500 on every try: FAILED after max_deliver, naming stage, item and cause."""
        job, body = many_item_job(moodle, token="fail-token", count=1)
        moodle.fail_next(REPORT_CALL, times=None, status=500)
        async with dev_stack(settings_for(max_deliver=2), moodle=moodle) as stack:
            job_id = await stack.submit("quiz_archiver", body)
            final = await stack.wait_for_end(job_id)
            dead = await stack.broker.js.get_last_msg(
                c.DLQ_STREAM, c.dlq_subject(job_id)
            )

        assert final.status is JobStatus.FAILED
        assert final.stage == "report"
        assert final.item == 1001
        assert final.error is not None
        assert "HTTP 500" in final.error
        assert "[stage report, item 1001]" in final.error
        assert job.statuses[-1] == "FAILED"
        assert job.uploads == []
        assert b"moodle_unavailable" in (dead.data or b"")


class TestSigterm:
    async def test_sigterm_drains_the_running_job(
        self, bridge_only: DevStack, nats_server: EmbeddedNats, tmp_path: Path
    ) -> None:
        """SIGTERM mid-job with grace left: the job finishes, then the worker exits 0."""
        stack, moodle = bridge_only, bridge_only.moodle
        assert nats_server.url is not None
        job, body = many_item_job(moodle, token="drain-token", count=6, busy_ms=300)
        async with role(
            "worker", worker_settings(tmp_path), nats_url=nats_server.url
        ) as proc:
            job_id = await stack.submit("quiz_archiver", body)
            await wait_for_event(stack.broker, job_id, is_render_step(1), timeout_s=60)
            code = await proc.terminate(timeout_s=60)
        final = await wait_for_event(
            stack.broker, job_id, lambda e: e.status.is_terminal, timeout_s=5
        )

        assert code == 0
        assert proc.events("worker.draining")
        assert final.status is JobStatus.FINISHED
        assert final.delivery == 1
        assert len(job.uploads) == 1

    async def test_sigterm_past_grace_hands_the_job_back(
        self, bridge_only: DevStack, nats_server: EmbeddedNats, tmp_path: Path
    ) -> None:
        """SIGTERM with no grace left: the job is handed back and another worker ends it."""
        stack, moodle = bridge_only, bridge_only.moodle
        assert nats_server.url is not None
        ids = list(range(1001, 1013))
        job, body = many_item_job(moodle, token="handback-token", count=12, busy_ms=300)
        settings = worker_settings(tmp_path, drain_grace_s=0.2)
        events: list[StatusEvent] = []
        async with role("worker", settings, nats_url=nats_server.url) as first:
            job_id = await stack.submit("quiz_archiver", body)
            await wait_for_event(stack.broker, job_id, is_render_step(1), timeout_s=60)
            code = await first.terminate(timeout_s=60)
        async with role("worker", settings, nats_url=nats_server.url):
            final = await wait_for_event(
                stack.broker,
                job_id,
                lambda e: e.status.is_terminal,
                timeout_s=60,
                seen=events,
            )

        assert code == 0
        assert first.events("job.handed_back")
        handed_back = [
            e
            for e in events
            if e.status is JobStatus.AWAITING_PROCESSING and e.delivery == 1
        ]
        assert handed_back
        assert final.status is JobStatus.FINISHED
        assert final.delivery == 2
        assert len(job.uploads) == 1
        assert_complete_archive(job, ids)


class TestDuplicateSubmission:
    async def test_same_job_twice_is_one_job(
        self, settings_for: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """Moodle posting the same job twice (at once) gets one id, one upload."""
        job, body = many_item_job(moodle, token="twice-token", count=1)
        # The job cannot end before the third submission is answered.
        release = moodle.hang(REPORT_CALL, times=1)
        async with dev_stack(settings_for(), moodle=moodle) as stack:
            first, second = await asyncio.gather(
                stack.submit("quiz_archiver", body), stack.submit("quiz_archiver", body)
            )
            third = await stack.submit("quiz_archiver", body)
            release.set()
            final = await stack.wait_for_end(first)
            info = await stack.broker.js.stream_info(c.JOBS_STREAM)

        assert first == second == third
        assert final.status is JobStatus.FINISHED
        assert info.state.last_seq == 1
        assert len(job.uploads) == 1
        assert len(moodle.calls_to(REPORT_CALL)) == 1
