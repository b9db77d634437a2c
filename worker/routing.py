"""What a report page may load, and what it could not (contract 3.4 step 5).

A :class:`JobNetwork` holds one job's network policy and findings; each page
gets a *page-level* route (:meth:`JobNetwork.install`) because the pages of a
job render concurrently and each needs its own HTML at the same URL.  The
route:

* serves the report HTML at ``<base_url>/mock/attempt``, so the page lives
  on Moodle's origin and relative URLs and RequireJS resolve;
* with ``prevent_redirect_to_login``: cancels navigations to Moodle's login
  page (answering 204, which leaves the page as it is), aborts other
  requests there with ``blockedbyclient``, and serves scripts itself with
  Moodle's AJAX login redirect replaced by ``js/ajaxloginpatch.js``;
* aborts requests to hosts that do not resolve, so an unreachable Moodle or
  CDN costs one bounded lookup instead of holding the page's load event.

Resources that failed are collected per job and reported by
:meth:`JobNetwork.report_failures` once per URL, always through
:func:`~archive_worker.errors.redact_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from importlib.resources import files
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from playwright.async_api import Error as PlaywrightError

from archive_worker.errors import redact, redact_url

if TYPE_CHECKING:
    from playwright.async_api import Page, Request, Response, Route

    from archive_worker.config import Settings

log = logging.getLogger(__name__)

#: Path under the Moodle base URL where the report HTML is served (3.4).
MOCK_PATH = "/mock/attempt"

#: Moodle's login scripts (contract: route ``**/login/*.php``); matched on the
#: path so that a query string does not let a redirect through.
LOGIN_PATH = re.compile(r"/login/[^/]+\.php$")

#: core/ajax's redirect to the login page (contract 3.4).  Besides the
#: contract's ``URL.relativeUrl`` this also matches the transpiled spellings
#: of Moodle 4 builds, such as ``_url.default.relativeUrl``.
AJAX_LOGIN_REDIRECT = re.compile(
    rb"window\.location\s*=\s*(?:[\w$]+\.)+relativeUrl\(\s*[\"']/login/index\.php[\"']\s*\)"
)

#: Console messages of ``js/loginguard.js`` and ``js/ajaxloginpatch.js``
#: and how the block is named in ``render.login_redirect_blocked``.
CONSOLE_BLOCK_SIGNALS = {
    "x-moodle-archiver-login-redirect-blocked": "navigation",
    "x-moodle-archiver-ajax-login-redirect-blocked": "ajax",
}

#: How long one host name lookup may take before the host counts as
#: unreachable.  The system resolver's own default is 5 s per try and server;
#: a report's resources should not wait longer than one such try.
HOST_LOOKUP_TIMEOUT_S = 5.0

#: At most this many URLs are listed in one ``render.resources_failed`` line.
MAX_LISTED_URLS = 20

#: Response headers not to copy when serving a script we fetched: the body we
#: hand over is decoded and may have changed length.
_DROPPED_HEADERS = frozenset(
    {"content-length", "content-encoding", "transfer-encoding"}
)

_LOCAL_HOSTS = frozenset({"localhost"})

_NOT_MISSING = frozenset({"net::ERR_ABORTED", "net::ERR_BLOCKED_BY_CLIENT"})


def _load_patch() -> bytes:
    source = files("worker").joinpath("js/ajaxloginpatch.js").read_text("utf-8")
    code = source.split("*/", 1)[1]
    return " ".join(line.strip() for line in code.splitlines() if line.strip()).encode()


AJAX_LOGIN_PATCH = _load_patch()

#: Runs before the page's scripts; cancels navigations to the login page.
LOGIN_GUARD_SCRIPT = files("worker").joinpath("js/loginguard.js").read_text("utf-8")


class JobNetwork:
    """Request routing and failure bookkeeping for the pages of one job.

    Args:
        settings: the worker's settings.
        base_url: the Moodle site the job came from (its ``wwwroot``).
    """

    def __init__(self, settings: Settings, base_url: str) -> None:
        self._settings = settings
        self.mock_url = base_url.rstrip("/") + MOCK_PATH
        # A proxy resolves names itself; a local lookup would say nothing.
        self._check_hosts = not settings.proxy_server_url
        self._lookups: dict[str, asyncio.Task[bool]] = {}
        #: URL -> reason, in the order they failed, for the whole job.
        self.failed: dict[str, str] = {}
        self._reported: set[str] = set()
        self._login_blocked = 0

    async def install(self, page: Page, html: str) -> None:
        """Route every request of ``page``; the report itself gets ``html``."""
        body = html.encode("utf-8")

        async def handle(route: Route) -> None:
            try:
                await self._handle(route, body)
            except PlaywrightError as exc:
                # The page closed under the request; nothing left to answer.
                log.debug("render.route_failed url=%s error=%s", _url(route), exc)

        page.on("requestfailed", self._on_request_failed)
        page.on("response", self._on_response)
        await page.route("**/*", handle)

    def close(self) -> None:
        """Stop host lookups still running for this job."""
        for lookup in self._lookups.values():
            lookup.cancel()

    def report_failures(self, item: int | None) -> None:
        """Log the resources that failed since the last report, once each."""
        new = [url for url in self.failed if url not in self._reported]
        if not new:
            return
        self._reported.update(new)
        listed = [
            f"{redact_url(url)} ({self.failed[url]})" for url in new[:MAX_LISTED_URLS]
        ]
        if len(new) > MAX_LISTED_URLS:
            listed.append(f"... {len(new) - MAX_LISTED_URLS} more")
        log.warning(
            "render.resources_failed item=%s count=%d urls=%s",
            _item(item),
            len(new),
            ", ".join(listed),
        )

    async def _handle(self, route: Route, body: bytes) -> None:
        request = route.request
        url = request.url
        if url.split("#", 1)[0] == self.mock_url:
            await route.fulfill(
                status=200, content_type="text/html; charset=utf-8", body=body
            )
            return
        if self._settings.prevent_redirect_to_login and LOGIN_PATH.search(
            urlsplit(url).path
        ):
            await self._block_login(route, request)
            return
        if not await self._host_resolves(url):
            await route.abort("namenotresolved")
            return
        if self._settings.prevent_redirect_to_login and _is_script(request):
            await self._serve_script(route)
            return
        await route.fallback()

    def note_login_blocked(self, how: str, url: str) -> None:
        """Record a blocked way to the login page; the job's first is logged."""
        self._login_blocked += 1
        if self._login_blocked == 1:
            log.warning(
                "render.login_redirect_blocked how=%s url=%s", how, redact_url(url)
            )

    def note_console(self, text: str) -> None:
        """Pick up the blocks our page scripts report on the console."""
        for signal, how in CONSOLE_BLOCK_SIGNALS.items():
            if text.startswith(signal):
                self.note_login_blocked(how, text[len(signal) :].strip() or "-")

    async def _block_login(self, route: Route, request: Request) -> None:
        self.note_login_blocked("request", request.url)
        if request.is_navigation_request():
            # 204 makes Chromium drop the navigation and keep the page;
            # an abort would replace the report with an error page.
            await route.fulfill(status=204)
        else:
            await route.abort("blockedbyclient")

    async def _serve_script(self, route: Route) -> None:
        url = route.request.url
        try:
            response = await route.fetch(
                timeout=self._settings.navigation_timeout_s * 1000
            )
            source = await response.body()
        except PlaywrightError as exc:
            # An unreachable script must not fail the job (the reference
            # pages' scripts are all unreachable offline); it is reported.
            self.failed.setdefault(url, _first_line(exc.message))
            with contextlib.suppress(PlaywrightError):
                await route.abort("failed")
            return
        patched, count = AJAX_LOGIN_REDIRECT.subn(lambda _: AJAX_LOGIN_PATCH, source)
        if count:
            log.debug("render.script_patched url=%s count=%d", redact_url(url), count)
        headers = {
            name: value
            for name, value in response.headers.items()
            if name.lower() not in _DROPPED_HEADERS
        }
        await route.fulfill(status=response.status, headers=headers, body=patched)

    async def _host_resolves(self, url: str) -> bool:
        parts = urlsplit(url)
        host = parts.hostname
        if not self._check_hosts or parts.scheme not in ("http", "https") or not host:
            return True
        if host in _LOCAL_HOSTS or _is_ip(host):
            return True
        lookup = self._lookups.get(host)
        if lookup is None:
            lookup = asyncio.create_task(_resolves(host))
            self._lookups[host] = lookup

        return await asyncio.shield(lookup)

    def _on_request_failed(self, request: Request) -> None:
        url = request.url
        reason = request.failure or "failed"
        log.debug("render.request_failed url=%s error=%s", redact_url(url), reason)
        # Requests the page or we gave up on (a login navigation answered
        # with 204, a blocked login call, a page closing) are no missing file.
        if url.startswith("data:") or reason in _NOT_MISSING:
            return
        self.failed.setdefault(url, reason)

    def _on_response(self, response: Response) -> None:
        if response.status >= 400:
            self.failed.setdefault(response.url, f"HTTP {response.status}")


async def _resolves(host: str) -> bool:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM),
            HOST_LOOKUP_TIMEOUT_S,
        )
    except (OSError, TimeoutError) as exc:
        log.debug("render.host_unresolved host=%s error=%s", host, exc or "timeout")
        return False

    return True


def _is_script(request: Request) -> bool:
    return request.resource_type == "script" or urlsplit(request.url).path.endswith(
        ".js"
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False

    return True


def _first_line(text: str) -> str:
    return redact(text.strip().splitlines()[0]) if text.strip() else "failed"


def _url(route: Route) -> str:
    return redact_url(route.request.url)


def _item(item: int | None) -> str:
    return "-" if item is None else str(item)
