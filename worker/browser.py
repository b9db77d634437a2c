"""One Chromium per worker process, replaced when it crashed, grew or aged.

:class:`BrowserHost` owns Playwright and the current Chromium.  Every page a
job opens holds a *slot* on one browser instance (:meth:`BrowserHost.acquire`
/ :meth:`BrowserHost.release`).  An instance is *retired* after
``browser_max_pages`` pages or when the memory of its process tree passes
``browser_max_memory_mb``; it is closed once its last page is released, and
the next :meth:`~BrowserHost.acquire` launches a successor.  New pages wait
while a retired instance drains, so a restart never cuts into a page that is
still rendering.  A crashed instance is replaced at once by the next
:meth:`~BrowserHost.acquire` or by :meth:`~BrowserHost.replace_crashed`.

Logging: ``browser.launched`` at INFO, ``browser.retired`` at INFO (pages) or
WARNING (memory), ``browser.disconnected`` at WARNING when Chromium died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import async_playwright

from archive_worker.errors import ConfigError, RenderError

if TYPE_CHECKING:
    from playwright.async_api import Browser, Playwright

    from archive_worker.config import Settings

log = logging.getLogger(__name__)

#: Debian's Chromium; Playwright cannot download its own browser everywhere.
SYSTEM_CHROMIUM = Path("/usr/bin/chromium")

#: Switches for a headless renderer that talks to nothing but the report's
#: own resources.  ``--disable-web-security`` is from contract 3.3 (the page
#: is served from Moodle's origin but pulls from CDNs without CORS headers).
CHROMIUM_ARGS = (
    "--disable-web-security",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
)

#: Playwright does not expose the browser's pid, so we tag the command line
#: with an unknown (and so ignored) switch and look for it in /proc.
INSTANCE_SWITCH = "--moodle-archive-worker-instance"

#: How long a graceful browser close may take before we give up on it.
CLOSE_TIMEOUT_S = 10.0
#: Least time between two readings of Chromium's memory.
MEMORY_CHECK_INTERVAL_S = 5.0

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class RendererStats:
    """Counters of one renderer, for the worker's summary line and metrics."""

    #: PDFs written.
    pages_rendered: int = 0
    #: Renders that raised (after the crash retry, if any).
    pages_failed: int = 0
    #: Browsers launched to replace an earlier one (crash, pages, memory).
    browser_restarts: int = 0
    #: Renders repeated on a new browser after a crash.
    crash_retries: int = 0
    #: Pages printed although the ready signal timed out.
    ready_timeouts: int = 0


@dataclass(eq=False)
class BrowserInstance:
    """One launched Chromium and the pages it has served."""

    browser: Browser
    generation: int
    pid: int | None
    pages_started: int = 0
    open_pages: int = 0
    #: Why the instance takes no more pages (``pages``, ``memory``), if so.
    retire_reason: str | None = None
    crashed: bool = False
    closing: bool = False
    #: Monotonic time of the last memory reading (0 = never).
    memory_checked_at: float = 0.0

    def alive(self) -> bool:
        """True while the browser is connected and its process exists."""
        if self.crashed or not self.browser.is_connected():
            return False
        return self.pid is None or pid_alive(self.pid)


class BrowserHost:
    """Launches Chromium and replaces it when needed; see the module docstring.

    Args:
        settings: the worker's settings (browser and proxy options).
        stats: counters to update (``browser_restarts``).
    """

    def __init__(self, settings: Settings, stats: RendererStats) -> None:
        self._settings = settings
        self._stats = stats
        self._playwright: Playwright | None = None
        self._current: BrowserInstance | None = None
        self._generation = 0
        self._closed = False
        # Guards _current and the slot counters; held while launching so
        # that concurrent acquirers wait for the one new browser.
        self._cond = asyncio.Condition()

    @property
    def current(self) -> BrowserInstance | None:
        """The instance new pages go to, or None before start/after a retire."""
        return self._current

    async def start(self) -> None:
        """Start Playwright and launch the first Chromium.

        Raises:
            ConfigError: ``chromium_path`` names no file.
            RenderError: Chromium could not be launched.
        """
        if self._playwright is not None:
            return
        self._closed = False
        self._playwright = await async_playwright().start()
        try:
            async with self._cond:
                self._current = await self._launch()
        except BaseException:
            await self._playwright.stop()
            self._playwright = None
            raise

    async def close(self) -> None:
        """Close the browser and stop Playwright; safe to call twice.

        Pages still open fail; callers waiting in :meth:`acquire` get a
        :class:`~archive_worker.errors.RenderError`.
        """
        async with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self._current is not None:
                await self._close_instance(self._current)
                self._current = None
        if self._playwright is not None:
            playwright, self._playwright = self._playwright, None
            try:
                await asyncio.wait_for(playwright.stop(), CLOSE_TIMEOUT_S)
            except (PlaywrightError, TimeoutError) as exc:
                log.warning("playwright.stop_failed error=%s", exc)

    async def acquire(self) -> BrowserInstance:
        """Take a page slot on a live browser, launching one if needed.

        Waits while a retired browser still has pages open.  The caller must
        pass the instance to :meth:`release` when its page is closed.

        Raises:
            RenderError: not started, or a new browser could not be launched.
        """
        async with self._cond:
            while True:
                inst = self._current
                if self._closed or self._playwright is None:
                    raise RenderError("The renderer is not running.", stage="render")
                if inst is None or not inst.alive():
                    await self._replace_locked(inst)
                    continue
                if inst.retire_reason is not None:
                    if inst.open_pages == 0:
                        await self._replace_locked(inst)
                    else:
                        await self._cond.wait()
                    continue
                inst.open_pages += 1
                inst.pages_started += 1
                if inst.pages_started >= self._settings.browser_max_pages:
                    self._retire(inst, "pages")
                return inst

    async def release(self, inst: BrowserInstance) -> None:
        """Give back a page slot; close the browser if it is retired and idle.

        Shielded from cancellation: a slot that is never given back would
        keep a retired browser draining, and every new page waiting, forever.
        """
        await asyncio.shield(self._release(inst))

    async def _release(self, inst: BrowserInstance) -> None:
        over_limit = False
        if inst is self._current and inst.retire_reason is None and inst.alive():
            over_limit = await self._over_memory_limit(inst)
        async with self._cond:
            inst.open_pages -= 1
            if over_limit and inst.retire_reason is None:
                self._retire(inst, "memory")
            if inst.retire_reason is not None and inst.open_pages == 0:
                if inst is self._current:
                    self._current = None
                await self._close_instance(inst)
            self._cond.notify_all()

    async def replace_crashed(self, inst: BrowserInstance) -> None:
        """Make sure ``inst`` is no longer current once it has died.

        Several pages of a crashed browser fail together; only the first
        caller launches the successor, the others find it in place.
        """
        async with self._cond:
            if inst is self._current and not inst.alive():
                await self._replace_locked(inst)
            self._cond.notify_all()

    async def _replace_locked(self, old: BrowserInstance | None) -> None:
        if old is not None:
            if old is self._current:
                self._current = None
            await self._close_instance(old)
        self._current = await self._launch()
        if self._generation > 1:
            self._stats.browser_restarts += 1

    def _retire(self, inst: BrowserInstance, reason: str) -> None:
        inst.retire_reason = reason
        level = logging.WARNING if reason == "memory" else logging.INFO
        log.log(
            level,
            "browser.retired generation=%d reason=%s pages=%d open_pages=%d",
            inst.generation,
            reason,
            inst.pages_started,
            inst.open_pages,
        )

    async def _launch(self) -> BrowserInstance:
        assert self._playwright is not None
        marker = uuid.uuid4().hex
        options = launch_options(self._settings)
        options["args"] = [*options["args"], f"{INSTANCE_SWITCH}={marker}"]
        started = time.monotonic()
        try:
            browser = await self._playwright.chromium.launch(**options)
        except PlaywrightError as exc:
            raise RenderError(
                f"Chromium could not be launched: {exc.message.splitlines()[0]}",
                stage="render",
            ) from exc
        self._generation += 1
        pid = await asyncio.to_thread(find_browser_pid, marker)
        inst = BrowserInstance(browser=browser, generation=self._generation, pid=pid)
        browser.on("disconnected", lambda _: self._on_disconnected(inst))
        log.info(
            "browser.launched generation=%d pid=%s version=%s ms=%d",
            inst.generation,
            pid,
            browser.version,
            (time.monotonic() - started) * 1000,
        )

        return inst

    def _on_disconnected(self, inst: BrowserInstance) -> None:
        if inst.closing:
            return
        inst.crashed = True
        log.warning(
            "browser.disconnected generation=%d pid=%s open_pages=%d",
            inst.generation,
            inst.pid,
            inst.open_pages,
        )

    async def _close_instance(self, inst: BrowserInstance) -> None:
        if inst.closing:
            return
        inst.closing = True
        with contextlib.suppress(PlaywrightError, TimeoutError):
            await asyncio.wait_for(inst.browser.close(), CLOSE_TIMEOUT_S)
        log.debug("browser.closed generation=%d", inst.generation)

    async def _over_memory_limit(self, inst: BrowserInstance) -> bool:
        now = time.monotonic()
        if inst.pid is None or now - inst.memory_checked_at < MEMORY_CHECK_INTERVAL_S:
            return False
        # Reading the whole process tree's memory costs more than a page
        # switch should (about a sixth of the worker's CPU when done per page).
        inst.memory_checked_at = now
        used = await asyncio.to_thread(process_tree_memory_bytes, inst.pid)
        limit = self._settings.browser_max_memory_mb * 1024 * 1024
        if used <= limit:
            return False
        log.warning(
            "browser.memory_exceeded generation=%d used_mb=%d limit_mb=%d",
            inst.generation,
            used // (1024 * 1024),
            self._settings.browser_max_memory_mb,
        )

        return True


def launch_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``chromium.launch`` derived from the settings.

    Raises:
        ConfigError: ``chromium_path`` is set but names no file.
    """
    options: dict[str, Any] = {"headless": True, "args": list(CHROMIUM_ARGS)}
    if settings.chromium_path:
        if not Path(settings.chromium_path).is_file():
            raise ConfigError("chromium_path", settings.chromium_path, "no such file")
        options["executable_path"] = settings.chromium_path
    elif SYSTEM_CHROMIUM.is_file():
        options["executable_path"] = str(SYSTEM_CHROMIUM)
    # Chromium's sandbox cannot run as root; Playwright adds --no-sandbox
    # whenever chromium_sandbox is off.
    options["chromium_sandbox"] = os.geteuid() != 0
    if settings.proxy_server_url:
        options["proxy"] = proxy_options(
            settings.proxy_server_url, settings.proxy_bypass_domains
        )

    return options


def proxy_options(url: str, bypass: list[str]) -> dict[str, str]:
    """Playwright's proxy dict: credentials split off the URL (contract 3.16)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    proxy = {"server": f"{parts.scheme}://{netloc}"}
    if parts.username:
        proxy["username"] = unquote(parts.username)
        proxy["password"] = unquote(parts.password or "")
    if bypass:
        proxy["bypass"] = ",".join(bypass)

    return proxy


def find_browser_pid(marker: str) -> int | None:
    """The pid of the Chromium main process whose command line has ``marker``.

    Child processes (renderer, GPU, zygote) carry ``--type=``; the Debian
    wrapper script ``exec``\\ s the binary, so the pid is Chromium's own.
    """
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle in arg for arg in args) and not any(
            arg.startswith(b"--type=") for arg in args
        ):
            return int(entry.name)

    return None


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may hold spaces.
    state = stat.rpartition(")")[2].split()[0]

    return state not in ("Z", "X")


def process_tree_memory_bytes(root: int) -> int:
    """Memory of ``root`` and all its descendants, in bytes.

    Uses each process's proportional set size (PSS, from ``smaps_rollup``)
    where the kernel offers it, else its resident set size.  Summed RSS
    counts Chromium's shared pages once per process: measured here, a
    browser with three report pages had 653 MB RSS but 305 MB PSS.
    """
    total = 0
    seen: set[int] = set()
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _process_memory(pid)
        stack.extend(_children(pid))

    return total


def _process_memory(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def _children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return children
    for task in tasks:
        try:
            children.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue

    return children
