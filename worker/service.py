"""The worker role as one coroutine: browser, HTTP session, consumer loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from archive_worker.broker import Broker
from archive_worker.config import Settings
from archive_worker.telemetry import (
    QUEUE_POLL_S,
    Telemetry,
    poll_queue_depth,
)

from .consumer import WorkerService
from .pdf import check_ghostscript
from .registry import register_worker, snapshot_of
from .render import Renderer

log = logging.getLogger(__name__)


async def run_worker(
    settings: Settings,
    broker: Broker,
    *,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
    telemetry: Telemetry | None = None,
) -> None:
    """Run the worker role until ``stop`` is set, then drain and close.

    Checks Ghostscript first when PDF/A conversion is on (a worker that cannot
    convert must not take jobs), then starts Chromium and the consumer loop.

    ``telemetry`` is the process's (see ``archive_worker.telemetry``), owned
    by the caller; without one nothing is recorded.  The worker registers in
    the registry (``worker.registry``) while it takes jobs.

    Raises:
        ConfigError: PDF/A is on and Ghostscript is missing or unusable.
    """
    if settings.pdfa_conversion:
        log.info("ghostscript.found version=%s", check_ghostscript(settings))
    renderer = Renderer(settings)
    await renderer.start()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(renderer.close)
        telemetry = telemetry or Telemetry.disabled()
        http = await stack.enter_async_context(aiohttp.ClientSession())
        service = WorkerService(
            settings, broker, renderer, http=http, telemetry=telemetry
        )
        _observe(telemetry, service, renderer)
        if telemetry.metrics_enabled:
            poller = asyncio.create_task(
                poll_queue_depth(telemetry, broker.queue_depth, interval_s=QUEUE_POLL_S)
            )
            stack.callback(poller.cancel)
        await stack.enter_async_context(
            register_worker(broker, lambda: snapshot_of(service, renderer))
        )
        if started is not None:
            started.set()
        await service.run(stop)


def _observe(telemetry: Telemetry, service: WorkerService, renderer: Renderer) -> None:
    telemetry.observe(
        "archive.jobs.in_flight",
        lambda: len(service.running_jobs),
        unit="{job}",
        description="Jobs this worker runs now",
    )
    telemetry.observe(
        "archive.browser.restarts",
        lambda: renderer.stats.browser_restarts,
        unit="{restart}",
        description="Browsers launched to replace an earlier one",
        counter=True,
    )
