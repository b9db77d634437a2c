"""The worker registry: every worker process is a NATS micro service.

Each process registers as service :data:`~archive_worker.constants.
MICRO_SERVICE_NAME` (``archive-worker``), so that ``$SRV.PING``, ``$SRV.INFO``
and ``$SRV.STATS`` reach it: ``archive-worker workers`` uses them, and so
does the standard NATS tooling (``nats micro ls``, ``nats micro stats``).
The stats of its one endpoint carry a :class:`~archive_worker.ops.model.
WorkerSnapshot`; the endpoint itself (``archive.control.workers.<id>``, a
subject the workers' NATS user may subscribe to) answers with the snapshot
as well.

This is an adapter module: nats-py errors become ``BrokerError`` here.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from nats.errors import Error as NatsError
from nats.micro import add_service
from nats.micro.request import Request

from archive_worker import __version__
from archive_worker import constants as c
from archive_worker.broker import Broker
from archive_worker.errors import BrokerUnavailable
from archive_worker.ops.model import WorkerSnapshot

if TYPE_CHECKING:
    from .consumer import WorkerService
    from .render import Renderer

log = logging.getLogger(__name__)

#: Micro service versions must be semantic versions; a source tree without
#: package metadata reports 0.0.0.
_SEMVER = re.compile(r"^\d+\.\d+\.\d+")


def registry_subject(worker_id: str) -> str:
    """The registry endpoint of one worker (dots would split the token)."""
    token = re.sub(r"[^A-Za-z0-9_-]", "_", worker_id)
    return f"{c.CONTROL_SUBJECT_PREFIX}.workers.{token}"


@contextlib.asynccontextmanager
async def register_worker(
    broker: Broker, snapshot: Callable[[], WorkerSnapshot]
) -> AsyncIterator[None]:
    """Serve the worker's registry entry while inside.

    Args:
        broker: the worker's connection.
        snapshot: called for every stats request; must be cheap and must
            not block (it runs on the event loop).

    Raises:
        BrokerUnavailable: the service could not subscribe.
    """
    first = snapshot()
    version = __version__ if _SEMVER.match(__version__) else "0.0.0"

    def stats_data(_: object) -> Any:
        return msgspec.to_builtins(snapshot())

    async def on_request(request: Request) -> None:
        await request.respond(msgspec.json.encode(snapshot()))

    try:
        service = await add_service(
            broker.nc,
            name=c.MICRO_SERVICE_NAME,
            version=version,
            description="Moodle archive worker",
            metadata={"worker_id": first.worker_id, "host": first.host},
            stats_handler=stats_data,
        )
        await service.add_endpoint(
            name="stats", subject=registry_subject(first.worker_id), handler=on_request
        )
        await broker.nc.flush()  # registered means the server knows it
    except (NatsError, TimeoutError) as exc:
        raise BrokerUnavailable(f"cannot register the worker: {exc}") from exc
    log.info(
        "registry.registered worker_id=%s service_id=%s", first.worker_id, service.id
    )
    try:
        yield
    finally:
        with contextlib.suppress(NatsError, TimeoutError):
            await service.stop()


def snapshot_of(service: WorkerService, renderer: Renderer) -> WorkerSnapshot:
    """The registry entry of a running worker, from its counters."""
    stats = service.stats
    running = service.running_jobs
    now = time.time()

    return WorkerSnapshot(
        worker_id=service.worker_id,
        host=socket.gethostname(),
        version=__version__,
        slots_busy=len(running),
        slots_total=service.settings.job_slots,
        jobs_done=stats.jobs_done,
        jobs_failed=stats.jobs_failed,
        jobs_retried=stats.jobs_retried,
        pages_rendered=renderer.stats.pages_rendered,
        browser_restarts=renderer.stats.browser_restarts,
        started_at=stats.started_at,
        uptime_s=round(now - stats.started_at, 1),
        running_jobs=running,
        time=now,
    )
