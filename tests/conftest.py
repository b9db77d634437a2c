"""Shared fixtures: a real nats-server, a broker on it, and the Moodle simulator.

Everything runs on loopback with OS-assigned ports; each test gets a fresh
NATS data folder, so streams never leak between tests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from archive_worker.broker import Broker
from archive_worker.config import Settings, load_settings
from archive_worker.devstack import DevStack, dev_stack
from archive_worker.embedded import EmbeddedNats
from archive_worker.jobs import Flavour, JobSpec, MoodleEndpoint, job_identity
from archive_worker.moodle_sim import MoodleSimulator

#: A token that must never show up anywhere but in requests to Moodle.
SECRET_TOKEN = "5ebe2294ecd0e0f08eab7690d2a6ee69"


def make_job_spec(token: str = SECRET_TOKEN) -> JobSpec:
    """A small quiz_archiver job for http://moodle, identified by ``token``."""
    job_id, _ = job_identity(Flavour.QUIZ_ARCHIVER, "http://moodle", token)
    return JobSpec(
        job_id=job_id,
        flavour=Flavour.QUIZ_ARCHIVER,
        moodle=MoodleEndpoint(
            base_url="http://moodle",
            ws_url="http://moodle/webservice/rest/server.php",
            upload_url="http://moodle/webservice/upload.php",
            token=token,
        ),
        archive_filename="archive",
        courseid=1,
        cmid=2,
        quizid=3,
    )


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's environment out of configuration tests."""
    import os

    for name in list(os.environ):
        if name.startswith(("ARCHIVE_WORKER_", "QUIZ_ARCHIVER_", "MOODLE_ARCHIVER_")):
            monkeypatch.delenv(name)
    monkeypatch.delenv("NATS_URL", raising=False)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo the root logging set-up that CLI commands install."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build settings for tests: loopback, small limits, a temp data folder."""

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "work_dir": str(tmp_path / "work"),
            "host": "127.0.0.1",
            "port": 0,
            "embedded_nats_port": 0,
            "queue_size": 8,
            "status_interval_s": 0,
            "backup_poll_s": 0.05,
            "pdfa_conversion": False,
        }
        values.update(overrides)
        return load_settings(environ={}, overrides=values)

    return factory


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A real nats-server with JetStream on an OS-assigned loopback port."""
    async with EmbeddedNats(tmp_path / "nats", port=0) as server:
        yield server


@pytest.fixture
async def broker(
    nats_server: EmbeddedNats, make_settings: Callable[..., Settings]
) -> AsyncIterator[Broker]:
    """A connected broker with the streams and consumer created."""
    assert nats_server.url is not None
    settings = make_settings(nats_url=nats_server.url)
    b = await Broker.connect(settings, url=nats_server.url, name="test")
    await b.ensure_topology()
    yield b
    await b.close()


@pytest.fixture
async def moodle() -> AsyncIterator[MoodleSimulator]:
    """The Moodle simulator on a loopback port."""
    async with MoodleSimulator() as sim:
        yield sim


@pytest.fixture
def stack_settings(
    nats_server: EmbeddedNats, make_settings: Callable[..., Settings]
) -> Callable[..., Settings]:
    """Settings for a whole stack on the test's nats-server, fast retries."""

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "nats_url": nats_server.url,
            "retry_backoff_s": 0.2,
            "retry_backoff_max_s": 0.5,
            "ready_signal_timeout_s": 10,
        }
        values.update(overrides)
        return make_settings(**values)

    return factory


@pytest.fixture
async def stack(
    stack_settings: Callable[..., Settings], moodle: MoodleSimulator
) -> AsyncIterator[DevStack]:
    """Bridge, worker and NATS in this process, next to the Moodle simulator."""
    async with dev_stack(stack_settings(), moodle=moodle) as s:
        yield s


@pytest.fixture
def caplog_debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture every log record, DEBUG included."""
    caplog.set_level(logging.DEBUG)
    return caplog
