"""The NATS adapter against a real nats-server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from archive_worker import constants as c
from archive_worker.broker import Broker, _listening, open_broker
from archive_worker.config import Settings
from archive_worker.embedded import EmbeddedNats
from archive_worker.errors import QueueFull
from archive_worker.events import StatusEvent
from archive_worker.jobs import (
    JobStatus,
    job_identity,
)
from tests.conftest import make_job_spec


async def _publish(broker: Broker, token: str) -> bool:
    spec = make_job_spec(token)
    _, msg_id = job_identity(spec.flavour, spec.moodle.base_url, token)
    return await broker.publish_job(spec, msg_id=msg_id)


class TestTopology:
    async def test_ensure_topology_is_idempotent(self, broker: Broker) -> None:
        """Creating the streams twice changes nothing and keeps the consumer."""
        await broker.ensure_topology()
        assert await broker.topology_present()
        info = await broker.js.stream_info(c.JOBS_STREAM)
        assert info.config.max_msgs == broker.settings.queue_size

    async def test_settings_change_updates_stream(
        self, nats_server: EmbeddedNats, make_settings: Callable[..., Settings]
    ) -> None:
        """A new queue size is applied to the existing stream at start."""
        assert nats_server.url
        for size in (4, 6):
            b = await Broker.connect(
                make_settings(queue_size=size), url=nats_server.url, name="t"
            )
            await b.ensure_topology()
            info = await b.js.stream_info(c.JOBS_STREAM)
            await b.close()
            assert info.config.max_msgs == size


class TestJobs:
    async def test_duplicate_is_recognised(self, broker: Broker) -> None:
        """The same job published twice is stored once."""
        assert await _publish(broker, "tok-a") is True
        assert await _publish(broker, "tok-a") is False
        state = await broker.queue_state()
        assert state.waiting == [make_job_spec("tok-a").job_id]

    async def test_queue_full_raises(self, broker: Broker) -> None:
        """Past queue_size unfinished jobs the stream refuses new ones."""
        for i in range(broker.settings.queue_size):
            await _publish(broker, f"tok-{i}")
        with pytest.raises(QueueFull):
            await _publish(broker, "one-too-many")

    async def test_last_event(self, broker: Broker) -> None:
        """The newest event of a job is what last_event returns."""
        job_id = make_job_spec("t").job_id
        assert await broker.last_event(job_id) is None
        for status in (JobStatus.AWAITING_PROCESSING, JobStatus.RUNNING):
            await broker.publish_event(
                StatusEvent(job_id=job_id, flavour="quiz_archiver", status=status)
            )
        event = await broker.last_event(job_id)
        assert event is not None
        assert event.status is JobStatus.RUNNING


class TestEmbeddedNats:
    async def test_keeps_data_across_restart(self, tmp_path: Path) -> None:
        """Jobs queued before a restart of the embedded server are still there."""
        from archive_worker.config import load_settings

        settings = load_settings(environ={}, overrides={"queue_size": 4})
        for expected in (True, False):
            async with EmbeddedNats(tmp_path / "nats", port=0) as server:
                assert server.url
                b = await Broker.connect(settings, url=server.url, name="t")
                await b.ensure_topology()
                if expected:
                    await _publish(b, "persist")
                state = await b.queue_state()
                await b.close()
            assert state.waiting == [make_job_spec("persist").job_id]
        assert server.pid is None


class TestFollowEvents:
    async def test_history_then_live(self, broker: Broker) -> None:
        """A follower sees stored events first, then new ones, in order."""
        job_id = make_job_spec("follow").job_id

        def event(status: JobStatus) -> StatusEvent:
            return StatusEvent(job_id=job_id, flavour="quiz_archiver", status=status)

        await broker.publish_event(event(JobStatus.AWAITING_PROCESSING))
        seen: list[JobStatus] = []
        async with broker.follow_events(job_id) as events:
            async for e in events:
                seen.append(e.status)
                if e.status is JobStatus.AWAITING_PROCESSING:
                    await broker.publish_event(event(JobStatus.RUNNING))
                    await broker.publish_event(event(JobStatus.FINISHED))
                if e.status.is_terminal:
                    break
        assert seen == [
            JobStatus.AWAITING_PROCESSING,
            JobStatus.RUNNING,
            JobStatus.FINISHED,
        ]

    async def test_only_if_first(self, broker: Broker) -> None:
        """An event marked only_if_first is dropped once the job has events."""
        job_id = make_job_spec("first").job_id
        running = StatusEvent(
            job_id=job_id, flavour="quiz_archiver", status=JobStatus.RUNNING
        )
        queued = StatusEvent(
            job_id=job_id, flavour="quiz_archiver", status=JobStatus.AWAITING_PROCESSING
        )
        await broker.publish_event(running)
        assert await broker.publish_event(queued, only_if_first=True) is False
        last = await broker.last_event(job_id)
        assert last is not None
        assert last.status is JobStatus.RUNNING


class TestAnnouncedUrl:
    async def test_embedded_server_announces_its_url(
        self, tmp_path: Path, make_settings: Callable[..., Settings]
    ) -> None:
        """An embedded server on a free port is found by operator commands."""
        from archive_worker.ops.natsio import ops_url

        settings = make_settings(embedded_nats_port=0)
        async with EmbeddedNats(f"{settings.data_dir}/nats", port=0) as server:
            assert ops_url(settings) == server.url
        assert ops_url(settings) == "nats://127.0.0.1:0"


class TestOpenBroker:
    async def test_shares_a_running_embedded_server(
        self, nats_server: EmbeddedNats, make_settings: Callable[..., Settings]
    ) -> None:
        """Without NATS_URL, a server on the embedded port is used, not a new one."""
        assert nats_server.url
        port = int(nats_server.url.rsplit(":", 1)[1])
        settings = make_settings(embedded_nats_port=port)
        async with open_broker(settings, name="t") as b:
            assert b.url == f"nats://127.0.0.1:{port}"
            assert await b.topology_present()

    async def test_starts_and_stops_an_embedded_server(
        self, make_settings: Callable[..., Settings]
    ) -> None:
        """Without NATS_URL and nothing listening, the broker brings its own."""
        settings = make_settings(embedded_nats_port=0)
        async with open_broker(settings, name="t") as b:
            url = b.url
            assert await b.topology_present()
        assert not await _listening("127.0.0.1", int(url.rsplit(":", 1)[1]))
