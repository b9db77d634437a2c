"""Property-based fuzzing of every ``/archive*`` endpoint over real HTTP.

Hypothesis generates JSON-ish bodies (random types, missing keys, wrong
nesting, huge integers, odd unicode), mutated valid bodies, raw bytes and
wrong content types, and POSTs them to a bridge served on loopback, backed
by a real nats-server and the Moodle simulator (which knows no token, so no
body can pass the probe).  For every answer:

* the status is one of 200, 400, 403, 413, 429, never a 5xx;
* the body is JSON with a non-empty ``error`` string (for non-200);
* nothing was published: neither the jobs stream nor the status stream
  grew.

Hypothesis drives a synchronous test; the bridge and its loop run on an
event loop this test owns, so each example is one ``run_until_complete``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive_worker import constants as c
from archive_worker.broker import Broker
from archive_worker.config import Settings
from archive_worker.embedded import EmbeddedNats
from archive_worker.moodle_sim import MoodleSimulator
from bridge.server import serve_bridge
from tests.conftest import SECRET_TOKEN

pytestmark = pytest.mark.slow

PATHS = (
    "/archive",
    "/archive/quiz_archiver",
    "/archive/archivingmod_quiz",
    "/archive/archivingmod_assign",
)
ALLOWED = {200, 400, 403, 413, 429}
EXAMPLES_PER_PATH = 150

# --- strategies ------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**80)
    | st.integers(min_value=-(2**80), max_value=-(2**63) + 2)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["", "1", "0", "A4", "http://", "../..", "\x00", "é" * 3])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=25,
)


def valid_bodies(base: str) -> dict[str, dict[str, Any]]:
    """One well-formed body per flavour, for mutation."""
    api = {
        "wstoken": SECRET_TOKEN,
        "base_url": base,
        "webservice_url": f"{base}/webservice/rest/server.php",
        "upload_url": f"{base}/webservice/upload.php",
    }
    quiz = {
        "api_version": 7,
        "moodle_base_url": base,
        "moodle_ws_url": api["webservice_url"],
        "moodle_upload_url": api["upload_url"],
        "wstoken": SECRET_TOKEN,
        "courseid": 9,
        "cmid": 23,
        "quizid": 12,
        "task_archive_quiz_attempts": {
            "attemptids": [24, 25],
            "fetch_metadata": True,
            "sections": {"header": "1", "question": "1", "attachments": "0"},
            "paper_format": "A4",
            "keep_html_files": True,
            "foldername_pattern": "${attemptid}",
            "filename_pattern": "attempt-${attemptid}",
            "image_optimize": False,
        },
        "task_moodle_backups": None,
        "archive_filename": "archive",
    }
    job = {
        "attemptids": [24],
        "report_sections": {"header": "1", "question": "1"},
        "paper_format": "A4",
        "archive_filename": "archive",
        "foldername_pattern": "${attemptid}",
        "filename_pattern": "attempt",
        "image_optimize": False,
        "fetch_metadata": True,
        "fetch_attachments": False,
        "keep_html_files": False,
    }
    assign_job = {
        "submissionids": [101],
        "report_sections": {"header": 1, "submission": 1},
        "paper_format": "A4",
        "archive_filename": "archive",
        "foldername_pattern": "${submissionid}",
        "filename_pattern": "submission",
        "image_optimize": False,
        "fetch_metadata": True,
        "attachment_types": {"submission": True},
        "keep_html_files": False,
        "archive_flatten": False,
        "archive_filehashes": True,
    }
    return {
        "/archive": quiz,
        "/archive/quiz_archiver": quiz,
        "/archive/archivingmod_quiz": {
            "api_version": 1,
            "taskid": 7,
            "moodle_api": api,
            "job": job,
        },
        "/archive/archivingmod_assign": {
            "api_version": 1,
            "taskid": 8,
            "moodle_api": api,
            "job": assign_job,
        },
    }


@st.composite
def mutated(draw: st.DrawFn, body: dict[str, Any]) -> Any:
    """A valid body with a few keys dropped, replaced or nested wrongly."""
    result: Any = json.loads(json.dumps(body))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        target = result
        # Walk into a nested object now and then.
        while isinstance(target, dict) and target and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(target)))
            if not isinstance(target[key], dict):
                break
            target = target[key]
        if not isinstance(target, dict) or not target:
            break
        key = draw(st.sampled_from(sorted(target)))
        action = draw(st.sampled_from(["drop", "replace", "wrap"]))
        if action == "drop":
            del target[key]
        elif action == "replace":
            target[key] = draw(json_values)
        else:
            target[key] = [target[key]]
    return result


@dataclass(frozen=True)
class Request:
    """One fuzzed POST."""

    data: bytes
    content_type: str


def requests_for(body: dict[str, Any]) -> st.SearchStrategy[Request]:
    """Bodies of every kind for one endpoint."""
    as_json = st.one_of(mutated(body), json_values).map(
        lambda v: Request(json.dumps(v).encode(), "application/json")
    )
    raw = st.binary(max_size=200).map(lambda b: Request(b, "application/json"))
    wrong_type = st.sampled_from(
        ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
    ).map(lambda t: Request(json.dumps(body).encode(), t))
    return st.one_of(as_json, as_json, as_json, raw, wrong_type)


# --- the service ----------------------------------------------------------------------


@dataclass
class Service:
    """Bridge, broker and Moodle on a loop owned by the test."""

    loop: asyncio.AbstractEventLoop
    url: str
    broker: Broker
    http: aiohttp.ClientSession
    moodle: MoodleSimulator

    def post(self, path: str, request: Request) -> tuple[int, str, bytes]:
        """POST and return status, content type and body."""

        async def go() -> tuple[int, str, bytes]:
            async with self.http.post(
                self.url + path,
                data=request.data,
                headers={"Content-Type": request.content_type},
            ) as reply:
                return reply.status, reply.content_type, await reply.read()

        return self.loop.run_until_complete(go())

    def last_seqs(self) -> tuple[int, int]:
        """Last sequence of the jobs and the status stream."""

        async def go() -> tuple[int, int]:
            jobs = await self.broker.js.stream_info(c.JOBS_STREAM)
            status = await self.broker.js.stream_info(c.STATUS_STREAM)
            return jobs.state.last_seq, status.state.last_seq

        return self.loop.run_until_complete(go())


@pytest.fixture
def service(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> Iterator[Service]:
    """A bridge on loopback with its own event loop (for a sync Hypothesis test)."""
    loop = asyncio.new_event_loop()
    stack: list[Any] = []

    async def start() -> Service:
        nats = EmbeddedNats(tmp_path / "nats-fuzz", port=0)
        await nats.start()
        stack.append(nats.stop)
        moodle = MoodleSimulator()
        await moodle.start()
        stack.append(moodle.stop)
        assert nats.url is not None
        settings = make_settings(
            nats_url=nats.url, max_request_bytes=4096, probe_timeout_s=2
        )
        broker = await Broker.connect(settings, url=nats.url, name="fuzz")
        stack.append(broker.close)
        await broker.ensure_topology()
        bridge = serve_bridge(settings, broker)
        address = await bridge.__aenter__()
        stack.append(lambda: bridge.__aexit__(None, None, None))
        http = aiohttp.ClientSession()
        stack.append(http.close)
        return Service(loop, address.url, broker, http, moodle)

    try:
        yield loop.run_until_complete(start())
    finally:
        for close in reversed(stack):
            loop.run_until_complete(close())
        loop.close()


@pytest.mark.parametrize("path", PATHS)
def test_every_bad_body_is_refused_cleanly(service: Service, path: str) -> None:
    """Any body: 2xx/4xx JSON with an ``error`` string, never 5xx, no side effect."""
    body = valid_bodies(service.moodle.base_url)[path]

    @settings(
        max_examples=EXAMPLES_PER_PATH,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(request=requests_for(body))
    def check(request: Request) -> None:
        before = service.last_seqs()
        status, content_type, raw = service.post(path, request)
        assert status in ALLOWED, (status, raw[:200])
        assert content_type == "application/json", raw[:200]
        answer = json.loads(raw)
        if status != 200:
            assert isinstance(answer.get("error"), str), answer
            assert answer["error"]
            assert service.last_seqs() == before

    check()
    # The simulator knows no token, so nothing can have been accepted.
    assert service.last_seqs() == (0, 0)
