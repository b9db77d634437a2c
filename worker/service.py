"""The worker role as one coroutine: browser, HTTP session, consumer loop."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from archive_worker.broker import Broker
from archive_worker.config import Settings

from .consumer import WorkerService
from .pdf import check_ghostscript
from .render import Renderer

log = logging.getLogger(__name__)


async def run_worker(
    settings: Settings,
    broker: Broker,
    *,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
) -> None:
    """Run the worker role until ``stop`` is set, then drain and close.

    Checks Ghostscript first when PDF/A conversion is on (a worker that cannot
    convert must not take jobs), then starts Chromium and the consumer loop.

    Raises:
        ConfigError: PDF/A is on and Ghostscript is missing or unusable.
    """
    if settings.pdfa_conversion:
        log.info("ghostscript.found version=%s", check_ghostscript(settings))
    renderer = Renderer(settings)
    await renderer.start()
    try:
        async with aiohttp.ClientSession() as http:
            service = WorkerService(settings, broker, renderer, http=http)
            if started is not None:
                started.set()
            await service.run(stop)
    finally:
        await renderer.close()
