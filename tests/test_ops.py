"""Operator commands through Typer's runner against a live stack on loopback.

Every test runs a real nats-server, the bridge, the worker with Chromium and
the Moodle simulator (``dev_stack``); the CLI runs in a thread, with its own
event loop and NATS connection, exactly as an operator's shell would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from archive_worker.cli import app
from archive_worker.config import Settings
from archive_worker.devstack import DevStack, dev_stack
from archive_worker.embedded import EmbeddedNats
from archive_worker.events import StatusEvent
from archive_worker.jobs import JobStatus
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.scenario import reference_quiz
from tests.conftest import SECRET_TOKEN

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPORT_CALL = "quiz_archiver_generate_attempt_report"


async def cli(stack: DevStack, *args: str) -> Result:
    """Run ``archive-worker <args> --nats-url <stack>`` in a thread."""
    url = stack.settings.nats_url
    assert url is not None
    argv = [*args, "--nats-url", url]
    return await asyncio.to_thread(CliRunner().invoke, app, argv)


async def cli_json(stack: DevStack, *args: str) -> Any:
    """Run a command with ``--json`` and parse its output."""
    result = await cli(stack, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def finished_job(stack: DevStack) -> str:
    """Archive one attempt and wait for the end; return the job id."""
    _, body = reference_quiz(stack.moodle, attempt_ids=[24], backups=False)
    job_id = await stack.submit("quiz_archiver", body)
    end = await stack.wait_for_end(job_id)
    assert end.status is JobStatus.FINISHED
    return job_id


async def wait_for(
    stack: DevStack, job_id: str, check: Callable[[StatusEvent], bool]
) -> None:
    """Follow the job's events until one passes ``check``."""
    async with stack.broker.follow_events(job_id) as events:
        async for event in events:
            if check(event):
                return


class TestReadCommands:
    async def test_fleet_commands(self, stack: DevStack) -> None:
        """status, workers, streams, jobs and job answer in JSON and as tables."""
        job_id = await finished_job(stack)

        status = await cli_json(stack, "status")
        assert status["queue_limit"] == 8
        assert status["workers"] == 1
        assert status["slots_total"] == 2
        assert status["dead_letters"] == 0

        workers = await cli_json(stack, "workers")
        assert len(workers) == 1
        assert workers[0]["jobs_done"] == 1
        assert workers[0]["pages_rendered"] == 1
        assert workers[0]["slots_total"] == 2

        streams = await cli_json(stack, "streams")
        names = {row["name"] for row in streams}
        assert {"ARCHIVE_JOBS", "ARCHIVE_STATUS", "ARCHIVE_DLQ"} <= names
        assert "ARCHIVE_JOBS/archive-workers" in names

        jobs = await cli_json(stack, "jobs")
        assert [j["job_id"] for j in jobs] == [job_id]
        assert jobs[0]["status"] == "FINISHED"
        assert jobs[0]["quizid"] is not None
        assert await cli_json(stack, "jobs", "--status", "failed") == []

        history = await cli_json(stack, "job", job_id[:8])
        statuses = [e["status"] for e in history["events"]]
        assert statuses[0] == "AWAITING_PROCESSING"
        assert statuses[-1] == "FINISHED"
        assert history["error"] is None

        for command in ("status", "workers", "streams", "jobs", "dlq"):
            args = ("dlq", "list") if command == "dlq" else (command,)
            result = await cli(stack, *args)
            assert result.exit_code == 0, result.output
        table = await cli(stack, "job", job_id)
        assert "FINISHED" in table.stdout
        assert SECRET_TOKEN not in table.stdout

    async def test_watch_follows_a_job(self, stack: DevStack) -> None:
        """watch <id> prints the job's events as JSON lines until it ends."""
        job_id = await finished_job(stack)
        result = await cli(stack, "watch", job_id, "--json", "--timeout", "20s")
        assert result.exit_code == 0, result.output
        events = [json.loads(line) for line in result.stdout.splitlines() if line]
        assert events[-1]["status"] == "FINISHED"
        assert all(e["schema"] == "archive.status.v1" for e in events)

    async def test_unknown_job(self, stack: DevStack) -> None:
        """job of an unknown id fails with one readable line."""
        result = await cli(stack, "job", "00000000-0000-0000-0000-000000000000")
        assert result.exit_code == 1
        assert "no status events" in result.output


class TestCancel:
    async def test_cancel_running_job(self, stack: DevStack) -> None:
        """A running job ends as FAILED in quiz_archiver, without upload."""
        job, body = reference_quiz(stack.moodle, attempt_ids=[24], backups=False)
        release = stack.moodle.hang(REPORT_CALL, times=None)
        job_id = await stack.submit("quiz_archiver", body)
        await wait_for(stack, job_id, lambda e: e.status is JobStatus.RUNNING)

        result = await cli_json(stack, "cancel", job_id)
        release.set()

        assert result["state"] == "running"
        assert result["final_status"] == "CANCELED"
        end = await stack.wait_for_end(job_id)
        assert end.status is JobStatus.CANCELED
        assert job.statuses[-1] == "FAILED"
        assert job.uploads == []

    async def test_cancel_queued_job(
        self, stack_settings: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """A queued job is canceled by the worker that takes it, unrun."""
        job, body = reference_quiz(
            moodle, "archivingmod_quiz", attempt_ids=[24], backups=False
        )
        async with dev_stack(stack_settings(), moodle=moodle, worker=False) as s:
            job_id = await s.submit("archivingmod_quiz", body)
            result = await cli_json(s, "cancel", job_id)
            assert result["state"] == "queued"
            worker = asyncio.create_task(_run_worker(s))
            end = await s.wait_for_end(job_id)
            s.worker_stop.set()
            await worker
        assert end.status is JobStatus.CANCELED
        assert job.statuses == [240]
        assert moodle.calls_to(REPORT_CALL) == []
        assert job.uploads == []


async def _run_worker(stack: DevStack) -> None:
    from worker.service import run_worker

    await run_worker(stack.settings, stack.broker, stop=stack.worker_stop)


class TestCheck:
    async def test_healthy(self, stack: DevStack) -> None:
        """check is OK with NATS, streams and Chromium, and says so in JSON."""
        result = await cli(
            stack, "check", "--json", "--moodle-url", stack.moodle.base_url
        )
        report = json.loads(result.stdout)
        assert result.exit_code == 0, result.output
        assert {c["name"] for c in report["checks"]} >= {
            "nats",
            "streams",
            "chromium",
            "moodle",
        }

    async def test_nats_missing(self) -> None:
        """Without a NATS server check is critical (exit 2), quickly."""
        argv = ["check", "--json", "--skip-browser", "--nats-url", "nats://127.0.0.1:1"]
        result = await asyncio.to_thread(CliRunner().invoke, app, argv)
        assert result.exit_code == 2
        report = json.loads(result.stdout)
        assert report["checks"][0]["name"] == "nats"
        assert report["checks"][0]["level"] == "critical"

    async def test_chromium_missing(
        self, nats_server: EmbeddedNats, broker: Any
    ) -> None:
        """A Chromium that cannot start makes check critical."""
        assert nats_server.url is not None
        argv = ["check", "--json", "--nats-url", nats_server.url]
        env = {"ARCHIVE_WORKER_CHROMIUM_PATH": "/nonexistent/chromium"}
        result = await asyncio.to_thread(CliRunner().invoke, app, argv, env=env)
        report = json.loads(result.stdout)
        assert result.exit_code == 2
        levels = {c["name"]: c["level"] for c in report["checks"]}
        assert levels["chromium"] == "critical"
        assert levels["nats"] == "ok"

    async def test_warning_and_critical_only(
        self, nats_server: EmbeddedNats, broker: Any
    ) -> None:
        """A waiting job with no worker warns (exit 1); --critical-only says 0."""
        from tests.test_broker import _publish

        assert nats_server.url is not None
        await _publish(broker, "waiting-token")
        argv = ["check", "--json", "--skip-browser", "--nats-url", nats_server.url]
        warned = await asyncio.to_thread(CliRunner().invoke, app, argv)
        relaxed = await asyncio.to_thread(
            CliRunner().invoke, app, [*argv, "--critical-only"]
        )
        assert warned.exit_code == 1, warned.output
        assert json.loads(warned.stdout)["level"] == "warning"
        assert relaxed.exit_code == 0, relaxed.output
