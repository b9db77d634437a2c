"""The whole service in one process, next to a Moodle simulator.

Used by ``archive-worker demo`` and by the end-to-end tests: NATS (embedded
unless ``nats_url`` is set), the bridge on its configured port (0 = any),
the worker, and a :class:`~archive_worker.moodle_sim.MoodleSimulator`.
Jobs are submitted over real HTTP, exactly as Moodle would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .broker import Broker, open_broker
from .config import Settings
from .errors import ArchiveWorkerError
from .events import StatusEvent
from .moodle_sim import MoodleSimulator
from .telemetry import Telemetry

log = logging.getLogger(__name__)

ARCHIVE_PATHS = {
    "quiz_archiver": "/archive",
    "archivingmod_quiz": "/archive/archivingmod_quiz",
    "archivingmod_assign": "/archive/archivingmod_assign",
}


class SubmissionRefused(ArchiveWorkerError):
    """The bridge answered a submission with an error."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(f"bridge answered {status}: {body.get('error', body)}")


@dataclass
class DevStack:
    """Handles to the running parts."""

    settings: Settings
    broker: Broker
    moodle: MoodleSimulator
    bridge_url: str
    http: aiohttp.ClientSession
    worker_stop: asyncio.Event = field(default_factory=asyncio.Event)
    worker_task: asyncio.Task[None] | None = None

    async def submit(self, flavour: str, body: dict[str, Any]) -> str:
        """POST a job as Moodle would; return the job id.

        Raises:
            SubmissionRefused: the bridge did not answer 200.
        """
        url = self.bridge_url + ARCHIVE_PATHS[flavour]
        async with self.http.post(url, json=body) as response:
            data = await response.json()
            if response.status != 200:
                raise SubmissionRefused(response.status, data)
        return str(data["jobid"])

    async def wait_for_end(
        self,
        job_id: str,
        *,
        on_event: Callable[[StatusEvent], None] | None = None,
    ) -> StatusEvent:
        """Follow a job's events until it reaches a terminal status."""
        async with self.broker.follow_events(job_id) as events:
            async for event in events:
                if on_event is not None:
                    on_event(event)
                if event.status.is_terminal:
                    return event
        raise ArchiveWorkerError(f"event stream of {job_id} ended early")

    async def stop_worker(self) -> None:
        """Stop the worker role (drains like SIGTERM)."""
        self.worker_stop.set()
        if self.worker_task is not None:
            await self.worker_task


@contextlib.asynccontextmanager
async def dev_stack(
    settings: Settings,
    *,
    moodle: MoodleSimulator | None = None,
    worker: bool = True,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[DevStack]:
    """Start NATS, bridge, worker and a Moodle simulator; stop them on exit.

    ``telemetry``, if given, is shared by bridge and worker (the caller
    shuts it down).
    """
    from bridge.server import serve_bridge
    from worker.service import run_worker

    async with contextlib.AsyncExitStack() as stack:
        if moodle is None:
            moodle = await stack.enter_async_context(MoodleSimulator())
        broker = await stack.enter_async_context(
            open_broker(settings, name="dev-stack")
        )
        address = await stack.enter_async_context(
            serve_bridge(settings, broker, telemetry)
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        dev = DevStack(settings, broker, moodle, address.url, http)
        if worker:
            started = asyncio.Event()
            dev.worker_task = asyncio.create_task(
                run_worker(
                    settings,
                    broker,
                    stop=dev.worker_stop,
                    started=started,
                    telemetry=telemetry,
                )
            )
            stack.push_async_callback(dev.stop_worker)
            await _started(started, dev.worker_task)
        yield dev


async def _started(started: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Wait until the worker is up, or re-raise why it could not start."""
    waiter = asyncio.ensure_future(started.wait())
    await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()
