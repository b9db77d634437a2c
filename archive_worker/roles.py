"""Start the service's roles (bridge, worker, or both) in one process.

This is the top layer: it imports ``bridge`` and ``worker`` lazily, so that
commands that need neither (``config``, operator commands) do not load an
HTTP server or a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from .broker import Broker, open_broker
from .config import Settings
from .telemetry import Telemetry, setup_telemetry

log = logging.getLogger(__name__)

ROLES = ("bridge", "worker")


def install_stop_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM and SIGINT (once; a second signal is ignored)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal, sig, stop)


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("signal.received signal=%s", sig.name)
    stop.set()


async def run_roles(
    settings: Settings,
    roles: tuple[str, ...],
    *,
    stop: asyncio.Event,
    on_ready: Callable[[Broker], Awaitable[None]] | None = None,
) -> None:
    """Connect to NATS (or start the embedded server) and run ``roles``.

    Returns when ``stop`` is set and every role has shut down; if one role
    fails, the others are stopped and the error propagates.
    """
    telemetry = setup_telemetry(settings, role="+".join(roles))
    async with (
        _telemetry_running(telemetry),
        open_broker(settings, name=f"archive-worker {'+'.join(roles)}") as broker,
    ):
        ready = [asyncio.Event() for _ in roles]
        coros = [
            _role(name, settings, broker, stop, ev, telemetry)
            for name, ev in zip(roles, ready, strict=True)
        ]
        tasks = [asyncio.create_task(c) for c in coros]
        if on_ready is not None:
            tasks.append(asyncio.create_task(_when_ready(ready, broker, on_ready)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    stop.set()
                    raise t.exception()  # type: ignore[misc]
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def _telemetry_running(telemetry: Telemetry) -> AsyncIterator[None]:
    """One telemetry per process, shared by its roles; flushed on the way out."""
    try:
        await telemetry.serve_metrics()
        yield
    finally:
        await telemetry.shutdown()


async def _when_ready(
    ready: list[asyncio.Event],
    broker: Broker,
    on_ready: Callable[[Broker], Awaitable[None]],
) -> None:
    await asyncio.gather(*(e.wait() for e in ready))
    await on_ready(broker)


async def _role(
    name: str,
    settings: Settings,
    broker: Broker,
    stop: asyncio.Event,
    ready: asyncio.Event,
    telemetry: Telemetry,
) -> None:
    if name == "bridge":
        from bridge.server import run_bridge

        await run_bridge(settings, broker, stop=stop, ready=ready, telemetry=telemetry)
    elif name == "worker":
        from worker.service import run_worker

        await run_worker(
            settings, broker, stop=stop, started=ready, telemetry=telemetry
        )
    else:
        raise ValueError(f"unknown role {name!r}")
