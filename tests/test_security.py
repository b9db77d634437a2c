"""Secrets, SSRF and hostile Moodle answers, through the whole stack.

* The token of a job is searched for in every log record (DEBUG), status
  event, dead letter, checkpoint, span and metric: it must be nowhere, and
  the job message (the only place it may live) must leave the stream.
* With the allow-list on, a job naming another site causes no connection at
  all; backup and attachment URLs outside the job's Moodle are refused
  (contract 1.8.1, 2.5).
* Hostile report and file answers end the job FAILED with a clear reason,
  upload nothing and write nothing outside the job's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from archive_worker import constants as c
from archive_worker.broker import Broker
from archive_worker.config import Settings
from archive_worker.devstack import SubmissionRefused, dev_stack
from archive_worker.events import StatusEvent
from archive_worker.jobs import JobStatus
from archive_worker.moodle_sim import FileFault, MoodleSimulator
from archive_worker.moodle_sim.scenario import reference_quiz
from tests.conftest import SECRET_TOKEN
from tests.procs import many_item_job

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: A second job's token; this one ends FAILED and becomes a dead letter.
SECRET_TOKEN_FAILING = "0bad5ecf0e1d2c3b4a5968778695a4b3"
REPORT_CALL = "quiz_archiver_generate_attempt_report"


class ConnectionCounter:
    """A TCP listener that counts connections and answers nothing."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ConnectionCounter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def base_url(self) -> str:
        """A "Moodle" at this listener."""
        return f"http://127.0.0.1:{self.port}"

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        writer.close()


async def all_stream_messages(broker: Broker) -> dict[str, list[bytes]]:
    """Every stored message (headers and data) of every stream, by stream."""
    found: dict[str, list[bytes]] = {}
    async for name in _stream_names(broker):
        info = await broker.js.stream_info(name)
        messages: list[bytes] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(NotFoundError):
                msg = await broker.js.get_msg(name, seq)
                messages.append(json.dumps(msg.headers or {}).encode())
                messages.append(msg.data or b"")
        found[name] = messages
    return found


async def _stream_names(broker: Broker) -> AsyncIterator[str]:
    for info in await broker.js.streams_info():
        yield info.config.name or ""


def telemetry_kit() -> tuple[Any, Callable[[], list[str]]]:
    """A Telemetry with in-memory span and metric capture, and a dump of both."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    from archive_worker.telemetry import Telemetry

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry = Telemetry(tracer_provider, meter_provider)

    def dump() -> list[str]:
        texts = [s.to_json() for s in spans.get_finished_spans()]
        data = reader.get_metrics_data()
        if data is not None:
            texts.append(data.to_json())
        return texts

    return telemetry, dump


class TestTokens:
    async def test_token_is_nowhere_but_the_job_message(
        self,
        stack_settings: Callable[..., Settings],
        moodle: MoodleSimulator,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """At DEBUG with tracing and metrics on, no token leaks anywhere."""
        caplog.set_level(logging.DEBUG)
        telemetry, telemetry_dump = telemetry_kit()
        job, body = reference_quiz(moodle, token=SECRET_TOKEN, attachments=True)
        failing, failing_body = reference_quiz(
            moodle,
            "archivingmod_quiz",
            token=SECRET_TOKEN_FAILING,
            attempt_ids=[24],
            attachments=True,
        )
        failing.items[24].attachments[0].contenthash = "0" * 40
        events: list[StatusEvent] = []
        settings = stack_settings(log_level="DEBUG", max_deliver=1)
        async with dev_stack(settings, moodle=moodle, telemetry=telemetry) as stack:
            job_id = await stack.submit("quiz_archiver", body)
            failing_id = await stack.submit("archivingmod_quiz", failing_body)
            ended = await stack.wait_for_end(job_id, on_event=events.append)
            ended_failing = await stack.wait_for_end(failing_id, on_event=events.append)
            await stack.stop_worker()
            streams = await all_stream_messages(stack.broker)
        await telemetry.shutdown()

        assert ended.status is JobStatus.FINISHED
        assert ended_failing.status is JobStatus.FAILED
        assert job.state == "FINISHED"
        # The token was used: Moodle saw it on every call.
        assert moodle.calls
        # The job messages, the only place the tokens lived, are gone.
        assert streams[c.JOBS_STREAM] == []
        assert len(streams[c.DLQ_STREAM]) == 2
        assert streams[c.STATUS_STREAM]
        spans_and_metrics = telemetry_dump()
        assert spans_and_metrics, "telemetry recorded nothing"
        for token in (SECRET_TOKEN, SECRET_TOKEN_FAILING):
            for record in caplog.records:
                text = f"{record.getMessage()} {record.__dict__!r}"
                assert token not in text, record.getMessage()
            for event in events:
                assert token not in repr(event)
            for name, messages in streams.items():
                for data in messages:
                    assert token.encode() not in data, name
            for text in spans_and_metrics:
                assert token not in text


class TestSsrf:
    async def test_allowlist_makes_no_connection_to_another_moodle(
        self, stack_settings: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """A job naming a site off the allow-list: 403, not even a TCP connect."""
        async with (
            ConnectionCounter() as other,
            dev_stack(
                stack_settings(moodle_allowlist=[moodle.base_url]), moodle=moodle
            ) as stack,
        ):
            _, body = reference_quiz(moodle, token="other-site", backups=False)
            for key in ("moodle_base_url", "moodle_ws_url", "moodle_upload_url"):
                body[key] = body[key].replace(moodle.base_url, other.base_url)
            with pytest.raises(SubmissionRefused) as refused:
                await stack.submit("quiz_archiver", body)
            queued = await stack.broker.queue_depth()

        assert refused.value.status == 403
        assert other.connections == 0
        assert queued == 0

    @pytest.mark.parametrize("allowlist", [False, True])
    async def test_backup_url_outside_the_moodle_is_refused(
        self,
        stack_settings: Callable[..., Settings],
        moodle: MoodleSimulator,
        allowlist: bool,
    ) -> None:
        """A backup URL on another host (or a look-alike prefix) is refused unprobed."""
        async with (
            ConnectionCounter() as other,
            dev_stack(
                stack_settings(moodle_allowlist=[moodle.base_url] if allowlist else []),
                moodle=moodle,
            ) as stack,
        ):
            refused = []
            for url in (
                f"{other.base_url}/webservice/pluginfile.php/1/backup/activity/x.mbz",
                f"{moodle.base_url}.evil/webservice/pluginfile.php/1/x.mbz",
            ):
                _, body = reference_quiz(moodle, token=f"backup-{url}")
                body["task_moodle_backups"][0]["file_download_url"] = url
                with pytest.raises(SubmissionRefused) as exc_info:
                    await stack.submit("quiz_archiver", body)
                refused.append(exc_info.value)

        # Contract 1.8.1 check at parse time, before the allow-list is asked.
        for r in refused:
            assert r.status == 400
            assert r.body["error"] == (
                "JSON data is invalid: Moodle backup file download URL is invalid."
            )
        assert other.connections == 0
        assert moodle.calls_to("quiz_archiver_update_job_status") == []

    async def test_attachment_url_outside_the_moodle_is_refused(
        self, stack_settings: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """Attachment URLs elsewhere, or escaping pluginfile.php, fail the job."""
        async with (
            ConnectionCounter() as other,
            dev_stack(stack_settings(), moodle=moodle) as stack,
        ):
            endings = []
            for n, url in enumerate(
                (
                    f"{other.base_url}/webservice/pluginfile.php/66/x/answer.txt",
                    f"{moodle.base_url}/webservice/pluginfile.php/../../login/x.php",
                    f"{moodle.base_url}/webservice/pluginfile.php/66/%2e%2e/x.txt",
                    f"{moodle.base_url}.evil/webservice/pluginfile.php/66/x.txt",
                )
            ):
                job, body = many_item_job(
                    moodle, token=f"ssrf-{n}", count=1, attachments=True
                )
                job.items[1001].attachments[0].download_url = url
                job_id = await stack.submit("quiz_archiver", body)
                endings.append((job, await stack.wait_for_end(job_id)))

        assert other.connections == 0
        for job, end in endings:
            assert end.status is JobStatus.FAILED
            assert end.error_code == "moodle_bad_response"
            assert end.error is not None
            assert "download URL outside this Moodle" in end.error
            assert job.uploads == []
        assert moodle.file_requests() == []


#: (description, how to make the answer hostile, settings, expected error code,
#: text the error must contain).
HOSTILE: list[
    tuple[str, Callable[[Any, MoodleSimulator], None], dict[str, Any], str, str]
] = [
    (
        "folder name with ../",
        lambda job, sim: job.items[1001].overrides.update(foldername="../../escape"),
        {},
        "moodle_bad_response",
        "unsafe foldername",
    ),
    (
        "absolute folder name",
        lambda job, sim: job.items[1001].overrides.update(foldername="/etc/cron.d"),
        {},
        "moodle_bad_response",
        "unsafe foldername",
    ),
    (
        "file name with a slash",
        lambda job, sim: job.items[1001].overrides.update(filename="../../escape"),
        {},
        "moodle_bad_response",
        "unsafe filename",
    ),
    (
        "NUL in a folder name",
        lambda job, sim: job.items[1001].overrides.update(foldername="a\x00b"),
        {},
        "moodle_bad_response",
        "unsafe foldername",
    ),
    (
        "control character in a file name",
        lambda job, sim: job.items[1001].overrides.update(filename="a\x1bb"),
        {},
        "moodle_bad_response",
        "unsafe filename",
    ),
    (
        "attachment name escaping the archive",
        lambda job, sim: setattr(
            job.items[1001].attachments[0], "filename", "../../../escape.txt"
        ),
        {},
        "moodle_bad_response",
        "unsafe attachment filename",
    ),
    (
        "absolute attachment name",
        lambda job, sim: setattr(job.items[1001].attachments[0], "filename", "/escape"),
        {},
        "moodle_bad_response",
        "unsafe attachment filename",
    ),
    (
        "report of hundreds of MB",
        lambda job, sim: setattr(job.items[1001], "report_padding", 300_000_000),
        {"report_max_bytes": 2_000_000},
        "download_too_large",
        "",
    ),
    (
        "attachment download that never ends",
        lambda job, sim: setattr(
            job.items[1001].attachments[0], "fault", FileFault.ENDLESS
        ),
        {"attachment_max_bytes": 5_000_000},
        "download_too_large",
        "",
    ),
    (
        "JSON error object instead of the file",
        lambda job, sim: setattr(
            job.items[1001].attachments[0], "fault", FileFault.JSON_ERROR
        ),
        {},
        "moodle_rejected",
        "",
    ),
    (
        "report answer that is HTML, not JSON",
        lambda job, sim: sim.respond_with(REPORT_CALL, "<html>oops</html>"),
        {},
        "moodle_bad_response",
        "",
    ),
]


class TestHostileMoodle:
    @pytest.mark.parametrize(
        ("name", "harm", "overrides", "code", "text"),
        HOSTILE,
        ids=[h[0] for h in HOSTILE],
    )
    async def test_hostile_answer_fails_the_job_cleanly(
        self,
        stack_settings: Callable[..., Settings],
        moodle: MoodleSimulator,
        tmp_path: Path,
        name: str,
        harm: Callable[[Any, MoodleSimulator], None],
        overrides: dict[str, Any],
        code: str,
        text: str,
    ) -> None:
        """A hostile answer: FAILED with a named cause, no upload, nothing escapes."""
        job, body = many_item_job(moodle, token="hostile", count=1, attachments=True)
        harm(job, moodle)
        async with dev_stack(stack_settings(**overrides), moodle=moodle) as stack:
            job_id = await stack.submit("quiz_archiver", body)
            end = await stack.wait_for_end(job_id)
            await stack.stop_worker()

        assert end.status is JobStatus.FAILED, end
        assert end.error_code == code, end.error
        assert end.error is not None
        assert text in end.error
        assert "[stage " in end.error
        assert end.item == 1001 or code == "moodle_bad_response"
        assert job.uploads == []
        assert job.statuses[-1] == "FAILED"
        assert leftovers(tmp_path) == []


def leftovers(root: Path) -> list[Path]:
    """Files named like an escape attempt, and anything left in the work folder."""
    work = root / "work"
    found = list(root.rglob("*escape*"))
    if work.exists():
        found += list(work.iterdir())
    return found
