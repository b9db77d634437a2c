"""Render Moodle report pages to PDF in one shared Chromium (contract 3.3-3.6).

A worker process has one :class:`Renderer` (one Chromium, see
:mod:`worker.browser`).  Each job opens a :class:`RenderSession` with
:meth:`Renderer.session`: a browser context of its own, created lazily and
re-created transparently when the browser under it was replaced.  The
pipeline may call :meth:`RenderSession.render` for several items of a job at
once; every call uses its own page.

Rendering one report: route the page's requests (:mod:`worker.routing`),
open ``<base_url>/mock/attempt``, wait for its load event, wait for the
ready signal (``js/readysignal.js``), print it with Chromium and write the
PDF.  A render that hit a browser or renderer crash is repeated once, on a
new browser if needed.

Logging: ``render.complete`` at INFO per PDF; ``render.resources_failed``,
``render.login_redirect_blocked``, ``render.ready_timeout`` and
``render.retry`` at WARNING; console messages, page errors and failed
requests at DEBUG.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from archive_worker.errors import BrowserCrashed, RenderError, redact
from archive_worker.jobs import normalise_paper_format

from .browser import BrowserHost, BrowserInstance, RendererStats
from .readiness import wait_until_ready
from .routing import LOGIN_GUARD_SCRIPT, JobNetwork

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from playwright.async_api import BrowserContext, ConsoleMessage, Page

    from archive_worker.config import Settings

__all__ = ["RenderSession", "Renderer", "RendererStats"]

log = logging.getLogger(__name__)

#: Printing the 900 KB reference pages takes under a second; this bounds a
#: hung renderer without cutting off a report a hundred times that size.
PDF_TIMEOUT_S = 120.0

#: A crashed render is repeated this many times on a fresh browser or page.
CRASH_RETRIES = 1

#: Closing a context of a live browser takes milliseconds; a browser that
#: does not answer within this time is left to the next restart.
CONTEXT_CLOSE_TIMEOUT_S = 10.0
#: How long closing one page may take.
PAGE_CLOSE_TIMEOUT_S = 5.0

#: Console messages and page errors are cut to this length in DEBUG lines
#: (a minified script's error can quote kilobytes of code).
MAX_LOGGED_TEXT = 500

#: Resolves once the document's load event has fired.  Used instead of
#: ``goto(wait_until="load")``, which loses track of the load event when a
#: blocked navigation (answered with 204) interrupted the page.
LOAD_WAIT_SCRIPT = """() => document.readyState === "complete" || new Promise(
  (resolve) => window.addEventListener("load", () => resolve(true), {once: true}))"""


class Renderer:
    """The process's PDF renderer: Playwright plus one Chromium.

    Call :meth:`start` once before use and :meth:`close` at shutdown.

    Args:
        settings: the worker's settings; render options are read from
            :attr:`settings` when a session opens.

    Attributes:
        stats: counters of pages, failures and browser restarts.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = RendererStats()
        self._host = BrowserHost(settings, self.stats)

    def __repr__(self) -> str:
        return f"Renderer({self.stats!r})"

    @property
    def browser_pid(self) -> int | None:
        """Pid of the current Chromium main process, if known."""
        current = self._host.current
        return current.pid if current is not None else None

    async def start(self) -> None:
        """Start Playwright and launch Chromium.

        Raises:
            ConfigError: ``chromium_path`` names no file.
            RenderError: Chromium could not be launched.
        """
        await self._host.start()

    async def close(self) -> None:
        """Close Chromium and Playwright; renders still running then fail."""
        await self._host.close()

    @asynccontextmanager
    async def session(
        self, *, base_url: str, job_id: str
    ) -> AsyncIterator[RenderSession]:
        """A render session for one job; its browser context is closed on exit.

        The session may render several items at once; await them all before
        leaving the ``async with`` block, since leaving closes their pages.

        Args:
            base_url: the job's Moodle ``wwwroot``; pages are served from
                ``<base_url>/mock/attempt``.
            job_id: the job, for log lines.
        """
        session = RenderSession(self, base_url=base_url, job_id=job_id)
        try:
            yield session
        finally:
            await session.aclose()


class RenderSession:
    """Renders the reports of one job; use through :meth:`Renderer.session`."""

    def __init__(self, renderer: Renderer, *, base_url: str, job_id: str) -> None:
        self.job_id = job_id
        self._settings = renderer.settings
        self._stats = renderer.stats
        self._host = renderer._host
        self._network = JobNetwork(self._settings, base_url)
        self._context: BrowserContext | None = None
        self._context_owner: BrowserInstance | None = None
        self._context_lock = asyncio.Lock()
        self._pages = 0

    async def render(
        self, html: str, target: Path, *, paper_format: str, item: int | None = None
    ) -> None:
        """Render ``html`` as ``<base_url>/mock/attempt`` and write a PDF.

        Safe to call concurrently; each call opens its own page.  Resources
        that failed to load are logged (WARNING) but do not fail the render.
        On cancellation the page is closed and ``target`` is not written.

        Args:
            html: the full report page from Moodle.
            target: the PDF file to write (replaced atomically).
            paper_format: a paper format, e.g. ``A4`` or ``Letter``.
            item: the attempt or submission id, for errors and logs.

        Raises:
            BrowserCrashed: Chromium crashed again on the retry.
            RenderError: the page did not load, the ready signal did not
                come (unless ``continue_after_ready_signal_timeout``), or
                printing failed.
        """
        paper = normalise_paper_format(paper_format)
        if paper is None:
            raise RenderError(
                f"Unknown paper format {paper_format!r}.", stage="render", attempt=item
            )
        started = time.monotonic()
        try:
            size = await self._render_with_retry(html, target, paper, item)
        except Exception:
            self._stats.pages_failed += 1
            raise
        finally:
            self._network.report_failures(item)
        self._stats.pages_rendered += 1
        self._pages += 1
        log.info(
            "render.complete item=%s ms=%d bytes=%d",
            _item(item),
            (time.monotonic() - started) * 1000,
            size,
        )

    async def aclose(self) -> None:
        """Close the session's browser context; called by the context manager."""
        self._network.close()
        context, owner = self._context, self._context_owner
        self._context = self._context_owner = None
        if context is not None and owner is not None and owner.alive():
            with contextlib.suppress(PlaywrightError, TimeoutError):
                await asyncio.wait_for(context.close(), CONTEXT_CLOSE_TIMEOUT_S)
        log.debug("render.session_closed job_id=%s pages=%d", self.job_id, self._pages)

    async def _render_with_retry(
        self, html: str, target: Path, paper: str, item: int | None
    ) -> int:
        failures = 0
        while True:
            inst = await self._host.acquire()
            try:
                return await self._render_on(inst, html, target, paper, item)
            except BrowserCrashed as exc:
                failures += 1
                if failures > CRASH_RETRIES:
                    raise
                self._stats.crash_retries += 1
                log.warning(
                    "render.retry item=%s reason=crash error=%s", _item(item), exc
                )
            finally:
                await self._host.release(inst)
            await self._host.replace_crashed(inst)

    async def _render_on(
        self,
        inst: BrowserInstance,
        html: str,
        target: Path,
        paper: str,
        item: int | None,
    ) -> int:
        crashed = asyncio.Event()
        try:
            context = await self._context_on(inst)
            page = await context.new_page()
            try:
                self._watch(page, item, crashed)
                await self._network.install(page, html)
                await self._load(page, item)
                await self._wait_ready(page, item)
                pdf = await self._print(page, paper, item)
            finally:
                await _close_page(page)
        except PlaywrightError as exc:
            reason = _first_line(exc.message)
            if crashed.is_set() or not inst.alive():
                raise BrowserCrashed(
                    f"Chromium crashed while rendering: {reason}",
                    stage="render",
                    attempt=item,
                ) from exc
            raise RenderError(
                f"Chromium could not render the page: {reason}",
                stage="render",
                attempt=item,
            ) from exc
        try:
            await asyncio.to_thread(_write_atomic, target, pdf)
        except OSError as exc:
            raise RenderError(
                f"The PDF could not be written: {exc}", stage="render", attempt=item
            ) from exc

        return len(pdf)

    async def _context_on(self, inst: BrowserInstance) -> BrowserContext:
        """The session's context on ``inst``, created on first use there."""
        async with self._context_lock:
            if self._context is not None and self._context_owner is inst:
                return self._context
            # Either the first page of the job, or the browser under the old
            # context was replaced (crash, restart); that context is gone.
            s = self._settings
            width = s.viewport_width
            context = await inst.browser.new_context(
                viewport={"width": width, "height": int(width / (16 / 9))},
                ignore_https_errors=s.skip_https_cert_validation,
                # Requests a service worker answers would bypass our routes.
                service_workers="block",
            )
            context.set_default_navigation_timeout(s.navigation_timeout_s * 1000)
            if s.prevent_redirect_to_login:
                await context.add_init_script(script=LOGIN_GUARD_SCRIPT)
            self._context, self._context_owner = context, inst
            log.debug(
                "render.context_created job_id=%s generation=%d",
                self.job_id,
                inst.generation,
            )

            return context

    def _watch(self, page: Page, item: int | None, crashed: asyncio.Event) -> None:
        debug = log.isEnabledFor(logging.DEBUG)

        def on_crash(_: Page) -> None:
            crashed.set()
            log.warning("render.page_crashed item=%s", _item(item))

        def on_console(message: ConsoleMessage) -> None:
            text = message.text
            self._network.note_console(text)
            if debug:
                log.debug(
                    "render.console item=%s type=%s text=%s",
                    _item(item),
                    message.type,
                    redact(text[:MAX_LOGGED_TEXT]),
                )

        def on_page_error(error: Any) -> None:
            log.debug(
                "render.page_error item=%s error=%s",
                _item(item),
                redact(str(error)[:MAX_LOGGED_TEXT]),
            )

        page.on("crash", on_crash)
        page.on("console", on_console)
        if debug:
            page.on("pageerror", on_page_error)

    async def _load(self, page: Page, item: int | None) -> None:
        timeout_s = self._settings.navigation_timeout_s
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                await page.goto(
                    self._network.mock_url,
                    wait_until="commit",
                    timeout=timeout_s * 1000,
                )
                await page.evaluate(LOAD_WAIT_SCRIPT)
        except (TimeoutError, PlaywrightTimeoutError) as exc:
            raise RenderError(
                f"Page did not load within {timeout_s:g} seconds.",
                stage="render",
                attempt=item,
            ) from exc
        log.debug(
            "render.loaded item=%s ms=%d",
            _item(item),
            (time.monotonic() - started) * 1000,
        )

    async def _wait_ready(self, page: Page, item: int | None) -> None:
        if await wait_until_ready(page, self._settings, item):
            return
        self._stats.ready_timeouts += 1

    async def _print(self, page: Page, paper: str, item: int | None) -> bytes:
        margin = self._settings.page_margin
        try:
            return await asyncio.wait_for(
                page.pdf(
                    format=paper,
                    print_background=True,
                    display_header_footer=False,
                    margin={
                        "top": margin,
                        "right": margin,
                        "bottom": margin,
                        "left": margin,
                    },
                ),
                PDF_TIMEOUT_S,
            )
        except TimeoutError as exc:
            raise RenderError(
                f"Printing did not finish within {PDF_TIMEOUT_S:g} seconds.",
                stage="render",
                attempt=item,
            ) from exc


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    os.replace(partial, target)


def _first_line(text: str) -> str:
    stripped = text.strip()
    return redact(stripped.splitlines()[0]) if stripped else "unknown error"


def _item(item: int | None) -> str:
    return "-" if item is None else str(item)


async def _close_page(page: Page) -> None:
    """Close a page without waiting on route handlers still in flight.

    A page closed mid-load (its job cancelled) may have handlers fetching
    scripts; Playwright's close would wait for them.  Both steps are bounded,
    so a stuck page cannot hold up the job's end or the worker's shutdown.
    """
    with contextlib.suppress(PlaywrightError, TimeoutError):
        await asyncio.wait_for(
            page.unroute_all(behavior="ignoreErrors"), PAGE_CLOSE_TIMEOUT_S
        )
    with contextlib.suppress(PlaywrightError, TimeoutError):
        await asyncio.wait_for(page.close(), PAGE_CLOSE_TIMEOUT_S)
