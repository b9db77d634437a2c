"""Logging: per-job context, JSON output, and the token filter."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from archive_worker import logs
from archive_worker.errors import JobError, redact, redact_url

from .conftest import SECRET_TOKEN


@pytest.fixture
def json_stream() -> Iterator[io.StringIO]:
    """A JSON log handler on a test logger, writing to a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logs.install_context_filter(handler)
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class TestContext:
    def test_bound_fields_appear_in_json(self, json_stream: io.StringIO) -> None:
        """A job id bound once is on every record logged inside the block."""
        log = logging.getLogger("test.logs")
        with logs.bind_job(job_id="j-1", trace_id="abc"):
            log.info("render.started item=%d", 24)
        log.info("outside")
        first, second = _records(json_stream)
        assert first["job_id"] == "j-1"
        assert first["trace_id"] == "abc"
        assert first["event"] == "render.started item=24"
        assert "job_id" not in second

    async def test_concurrent_jobs_do_not_mix(self, json_stream: io.StringIO) -> None:
        """Two tasks with different jobs each see only their own id."""
        log = logging.getLogger("test.logs")
        gate = asyncio.Event()
        bound = {j: asyncio.Event() for j in ("a", "b")}

        async def job(job_id: str) -> None:
            with logs.bind_job(job_id=job_id):
                bound[job_id].set()
                await gate.wait()
                log.info("step %s", job_id)

        tasks = [asyncio.create_task(job(j)) for j in bound]
        await asyncio.gather(*(e.wait() for e in bound.values()))
        gate.set()
        await asyncio.gather(*tasks)
        for record in _records(json_stream):
            assert record["event"] == f"step {record['job_id']}"


class TestRedaction:
    def test_token_in_message_masked(self, json_stream: io.StringIO) -> None:
        """A token that slips into a log message is masked on output."""
        logging.getLogger("test.logs").warning(
            "GET http://m/webservice/rest/server.php?wstoken=%s&x=1", SECRET_TOKEN
        )
        out = json_stream.getvalue()
        assert SECRET_TOKEN not in out
        assert "wstoken=***" in out

    def test_redact_url(self) -> None:
        """Both token parameters are masked, others kept."""
        url = f"http://m/pluginfile.php/1/a.pdf?token={SECRET_TOKEN}&forcedownload=1"
        assert (
            redact_url(url)
            == "http://m/pluginfile.php/1/a.pdf?token=***&forcedownload=1"
        )
        assert SECRET_TOKEN not in redact(f"wstoken={SECRET_TOKEN}")

    def test_job_error_message_redacted(self) -> None:
        """JobError masks a token in its message at construction."""
        err = JobError(f"failed at ?token={SECRET_TOKEN}", stage="upload", attempt=3)
        assert SECRET_TOKEN not in str(err)
        assert err.describe() == "[stage upload, item 3] failed at ?token=***"

    def test_redact_url_leaves_other_urls_alone(self) -> None:
        """A URL without credentials comes back byte for byte."""
        url = "http://m/theme/yui_combo.php?rollup/3.18.1/yui-moodlesimple.css"
        assert redact_url(url) == url
