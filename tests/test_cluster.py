"""The service on a three-node JetStream cluster that loses a node mid-run.

The nodes run the shipped ``deploy/nats/cluster-*.conf`` (see
:mod:`tests.natscluster`); the bridge logs in as ``bridge``, two workers as
``worker``, so the per-role users are proven to be enough in a cluster, R3
streams and consumer included.  Jobs travel the whole way: Moodle
(simulated) -> bridge -> JetStream -> worker with Chromium -> Moodle.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.errors import Error as NatsError

from archive_worker import constants as c
from archive_worker.broker import Broker, open_broker
from archive_worker.config import Settings
from archive_worker.devstack import DevStack, dev_stack
from archive_worker.errors import BrokerError
from archive_worker.jobs import JobStatus
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.model import SimJob
from archive_worker.moodle_sim.scenario import reference_quiz
from worker.service import run_worker

from .natscluster import NatsCluster, password, wait_until

#: About 30 s on an idle machine; the bound leaves room for a busy one.
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(150)]

JOBS = 6
#: Meta leader election and the first R3 streams take a few seconds.
TOPOLOGY_TIMEOUT_S = 20.0
#: A crashed leader is replaced after the Raft election timeout (4-9 s in
#: nats-server), then the remaining jobs run on two workers.
JOBS_TIMEOUT_S = 60.0
#: The workers' lease, as shipped: it must outlast a leader election, or
#: a job whose heartbeats go nowhere meanwhile is handed to a second worker.
ACK_WAIT_S = 30.0
#: Acks are confirmed before a job's slot frees, so the queue empties soon.
DRAIN_TIMEOUT_S = 10.0
#: Streams without traffic may still be electing when the jobs are done.
ELECTION_TIMEOUT_S = 15.0
STREAMS = (c.JOBS_STREAM, c.STATUS_STREAM, c.DLQ_STREAM)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """Three nodes from the shipped cluster configs, on loopback."""
    async with NatsCluster(tmp_path / "cluster") as nodes:
        yield nodes


@pytest.fixture
def role_settings(
    cluster: NatsCluster, make_settings: Callable[..., Settings]
) -> Callable[..., Settings]:
    """Settings for one role's user on the cluster, with R3 streams."""

    def factory(user: str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "nats_url": cluster.urls,
            "nats_user": user,
            "nats_password": password(user),
            "stream_replicas": 3,
            "ack_wait_s": ACK_WAIT_S,
            "job_slots": 1,
            "retry_backoff_s": 0.2,
            "retry_backoff_max_s": 0.5,
            "ready_signal_timeout_s": 10,
            "drain_grace_s": 5,
        }
        values.update(overrides)
        return make_settings(**values)

    return factory


async def create_topology(settings: Settings) -> None:
    """Create the R3 topology as soon as the cluster has a meta leader.

    Until the nodes have elected a JetStream meta leader (and know each
    other as peers), stream creation fails; that is the condition waited on.
    """
    assert settings.nats_url is not None
    broker = await Broker.connect(settings, url=settings.nats_url, name="setup")

    async def created() -> bool:
        try:
            await broker.ensure_topology()
        except BrokerError:
            return False
        return True

    try:
        await wait_until(
            created, timeout_s=TOPOLOGY_TIMEOUT_S, interval_s=0.25, what="R3 topology"
        )
    finally:
        await broker.close()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, name: str) -> AsyncIterator[None]:
    """A worker role with its own connection (as its own user); drained on exit."""
    async with open_broker(settings, name=name) as broker:
        stop, started = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(
            run_worker(settings, broker, stop=stop, started=started)
        )
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()
        try:
            yield
        finally:
            stop.set()
            await task


async def stream_leader(broker: Broker, stream: str) -> str | None:
    """The server name of the stream's current leader (None during elections)."""
    try:
        info = await broker.js.stream_info(stream)
    except (NatsError, TimeoutError):
        return None
    return info.cluster.leader if info.cluster else None


async def leaders_elected(broker: Broker, killed: str) -> bool:
    """True when every stream has a leader, none of them the killed node."""
    leaders = [await stream_leader(broker, name) for name in STREAMS]
    return all(leader not in (None, killed) for leader in leaders)


def archive_members(job: SimJob) -> list[str]:
    """Names in the archive Moodle stored; raises if it is not a valid ZIP."""
    with zipfile.ZipFile(io.BytesIO(job.archive_bytes())) as archive:
        assert archive.testzip() is None
        return archive.namelist()


class TestNodeLoss:
    async def test_every_job_ends_once_when_the_leader_dies(
        self,
        cluster: NatsCluster,
        role_settings: Callable[..., Settings],
        moodle: MoodleSimulator,
    ) -> None:
        """Killing the jobs stream's leader mid-run loses and repeats no job."""
        bridge = role_settings("bridge")
        await create_topology(bridge)
        jobs = [
            reference_quiz(
                moodle, token=f"cluster-token-{n}", attempt_ids=[24], backups=False
            )
            for n in range(JOBS)
        ]
        sim_jobs = [job for job, _ in jobs]
        async with (
            dev_stack(bridge, moodle=moodle, worker=False) as stack,
            running_worker(role_settings("worker", worker_id="w1"), "worker-1"),
            running_worker(role_settings("worker", worker_id="w2"), "worker-2"),
        ):
            job_ids = [await stack.submit("quiz_archiver", b) for _, b in jobs]
            done = [asyncio.ensure_future(j.done.wait()) for j in sim_jobs]
            await asyncio.wait(done, return_when=asyncio.FIRST_COMPLETED)

            killed = await stream_leader(stack.broker, c.JOBS_STREAM)
            assert killed is not None
            await cluster.node(killed).kill()
            unfinished = sum(not j.done.is_set() for j in sim_jobs)

            async with asyncio.timeout(JOBS_TIMEOUT_S):
                await asyncio.gather(*done)
            await wait_until(
                lambda: queue_drained(stack),
                timeout_s=DRAIN_TIMEOUT_S,
                what="empty jobs stream",
            )
            last = [await stack.broker.last_event(job_id) for job_id in job_ids]
            await wait_until(
                lambda: leaders_elected(stack.broker, killed),
                timeout_s=ELECTION_TIMEOUT_S,
                what="new stream leaders",
            )
            infos = [await stack.broker.js.stream_info(name) for name in STREAMS]

        assert unfinished >= 2, "the node died after the jobs were all done"
        for job in sim_jobs:
            assert job.state == "FINISHED"
            assert len(job.uploads) == 1
            assert "attempts/attempt-24/attempt-24.pdf" in archive_members(job)
        uploads = moodle.calls_to("quiz_archiver_process_uploaded_artifact")
        assert sorted(call.params["jobid"] for call in uploads) == sorted(job_ids)
        assert [e.status if e else None for e in last] == [JobStatus.FINISHED] * JOBS
        for info in infos:
            assert info.config.num_replicas == 3
            assert info.cluster is not None
            assert info.cluster.leader not in (None, killed)


async def queue_drained(stack: DevStack) -> bool:
    """True when every job message has been acknowledged."""
    return await stack.broker.queue_depth() == 0
