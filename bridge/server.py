"""Running the bridge: bind, serve until told to stop, shut down gracefully.

:func:`run_bridge` is what the CLI runs, alone (``bridge``) or next to the
other roles in one process (``up``); :func:`serve_bridge` is the same as a
context manager, for tests and embedding.  Neither installs signal handlers:
the caller owns the process and sets ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from archive_worker.broker import Broker
from archive_worker.config import Settings
from archive_worker.telemetry import Telemetry

from .app import create_app

log = logging.getLogger(__name__)

#: Time for in-flight requests at shutdown, on top of the probe timeout: a
#: POST that is probing Moodle should still get its answer.
SHUTDOWN_GRACE_S = 5.0


@dataclasses.dataclass
class BridgeAddress:
    """Where a running bridge listens (the port is the bound one, never 0)."""

    host: str = ""
    port: int = 0

    @property
    def url(self) -> str:
        """Base URL of the bridge, without the secret path prefix."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def bound_port(runner: web.BaseRunner) -> int:
    """The TCP port ``runner`` actually listens on (useful after binding 0).

    Raises:
        RuntimeError: the runner has no listening TCP site.
    """
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the bridge is not listening on a TCP port")


@contextlib.asynccontextmanager
async def serve_bridge(
    settings: Settings, broker: Broker, telemetry: Telemetry | None = None
) -> AsyncIterator[BridgeAddress]:
    """Serve the bridge on ``settings.host``/``settings.port`` while inside.

    Yields:
        The bound address.  On exit the listener closes, in-flight requests
        get up to ``probe_timeout_s`` + :data:`SHUTDOWN_GRACE_S` to finish,
        and the app's HTTP session is closed.  The broker stays open.
    """
    runner = web.AppRunner(
        create_app(settings, broker, telemetry),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.probe_timeout_s + SHUTDOWN_GRACE_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        address = BridgeAddress(host=settings.host, port=bound_port(runner))
        log.info("bridge.listening host=%s port=%d", address.host, address.port)
        yield address
    finally:
        await runner.cleanup()
        log.info("bridge.stopped")


async def run_bridge(
    settings: Settings,
    broker: Broker,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event,
    address: BridgeAddress | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Serve the bridge until ``stop`` is set.

    Args:
        settings: the service settings; ``host``/``port`` say where to bind
            (port 0 picks a free one).
        broker: a connected broker, left open on return.
        ready: set once the listener is bound.
        stop: set it to shut down (gracefully, see :func:`serve_bridge`).
        address: if given, filled with the bound host and port before
            ``ready`` is set.
        telemetry: the process's telemetry, owned by the caller.

    Raises:
        OSError: the address cannot be bound.
    """
    async with serve_bridge(settings, broker, telemetry) as bound:
        if address is not None:
            address.host, address.port = bound.host, bound.port
        if ready is not None:
            ready.set()
        await stop.wait()
