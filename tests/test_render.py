"""Rendering report pages to PDF in a real Chromium (worker.render).

One Renderer (one Chromium) serves the module; tests that need other
browser limits start their own.  Pages that load something come from a
small aiohttp site on loopback, which also holds back images until a test
lets them go.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from aiohttp import web
from PIL import Image
from pypdf import PdfReader

from archive_worker.config import Settings, load_settings
from archive_worker.errors import ConfigError, RenderError
from archive_worker.jobs import normalise_paper_format
from worker.browser import launch_options, proxy_options
from worker.render import Renderer
from worker.routing import AJAX_LOGIN_PATCH, AJAX_LOGIN_REDIRECT

#: Browser tests share the module's event loop, and so its Chromium.
browser_tests = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

ATTEMPTS = (
    Path(__file__).parents[1] / "archive_worker/moodle_sim/data/reference_quiz/attempts"
)

#: What only each reference attempt says: the user and the marks.
ATTEMPT_TEXT = {
    23: ("anonfirstname3 anonlastname3", "Marks 5.33/15.00"),
    24: ("anonfirstname4 anonlastname4", "Marks 11.50/15.00"),
    25: ("anonfirstname2 anonlastname2", "Marks 15.00/15.00"),
}

#: Page sizes in points as Chromium prints them.
PAPER_POINTS = {"A4": (595.92, 842.88), "Letter": (612.0, 792.0)}

#: Measured at ~1.3 s per reference page on 2 cores; the navigation
#: timeout (30 s) is what a hanging resource would cost.
FAST_RENDER_S = 10.0

UNREACHABLE_BASE = "http://moodle"

AJAX_SCRIPT = """
(function (URL) {
  var requests = [{deferred: {reject: function (e) {
    document.getElementById("status").textContent = "AJAX rejected " + e.errorcode;
  }}}];
  var exception = {errorcode: "servicerequireslogin"};
  (function () {
    window.location = URL.relativeUrl("/login/index.php");
  }).call(requests);
})({relativeUrl: function (path) { return location.origin + path; }});
"""


def page(body: str, head: str = "") -> str:
    """A minimal HTML document."""
    return f"<!DOCTYPE html><html><head>{head}</head><body>{body}</body></html>"


def pdf_text(path: Path) -> str:
    """All text of a PDF, whitespace collapsed."""
    reader = PdfReader(path)
    return " ".join(" ".join(p.extract_text() for p in reader.pages).split())


def settings(**overrides: object) -> Settings:
    """Settings for rendering tests: no PDF/A, short waits."""
    values: dict[str, object] = {
        "pdfa_conversion": False,
        "ready_signal_timeout_s": 10.0,
        "navigation_timeout_s": 20.0,
    }
    values.update(overrides)
    return load_settings(environ={}, overrides=values)


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """An opaque PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Site:
    """The loopback site: a script with Moodle's login redirect, late images."""

    url: str = ""
    release_image: asyncio.Event = field(default_factory=asyncio.Event)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def renderer() -> AsyncIterator[Renderer]:
    """The module's renderer and its one Chromium."""
    r = Renderer(settings())
    await r.start()
    yield r
    await r.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def lifecycle_renderer() -> AsyncIterator[Renderer]:
    """A renderer whose browser is replaced after every two pages."""
    r = Renderer(settings(browser_max_pages=2))
    await r.start()
    yield r
    await r.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def site() -> AsyncIterator[Site]:
    """An aiohttp site on an OS-assigned loopback port."""
    state = Site()

    async def ajax_js(_: web.Request) -> web.Response:
        return web.Response(text=AJAX_SCRIPT, content_type="application/javascript")

    async def late_png(_: web.Request) -> web.Response:
        await state.release_image.wait()
        return web.Response(body=png_bytes(), content_type="image/png")

    app = web.Application()
    app.router.add_get("/lib/ajax.js", ajax_js)
    app.router.add_get("/late.png", late_png)
    runner = web.AppRunner(app)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    yield state
    await runner.cleanup()


@pytest.fixture
def tune(renderer: Renderer) -> Iterator[Callable[..., None]]:
    """Change the shared renderer's settings for sessions opened in one test."""
    original = renderer.settings

    def apply(**changes: object) -> None:
        renderer.settings = msgspec.structs.replace(original, **changes)

    yield apply
    renderer.settings = original


def log_event(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    """Messages of captured records that start with ``event``."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(event)]


class TestReferencePages:
    """The real quiz attempt reports from Moodle."""

    pytestmark = browser_tests

    @pytest.mark.parametrize(
        ("attempt", "paper"), [(23, "A4"), (24, "Letter"), (25, "LETTER"), (23, "a4")]
    )
    async def test_attempt_prints_its_own_text_on_the_paper_asked_for(
        self, renderer: Renderer, tmp_path: Path, attempt: int, paper: str
    ) -> None:
        """Each attempt page becomes a PDF with its text on the requested paper."""
        target = tmp_path / f"{attempt}.pdf"
        html = (ATTEMPTS / f"{attempt}.html").read_text("utf-8")

        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await s.render(html, target, paper_format=paper, item=attempt)

        reader = PdfReader(target)
        assert len(reader.pages) > 0
        text = pdf_text(target)
        for expected in ATTEMPT_TEXT[attempt]:
            assert expected in text
        width, height = PAPER_POINTS[normalise_paper_format(paper) or ""]
        box = reader.pages[0].mediabox
        assert float(box.width) == pytest.approx(width, abs=1)
        assert float(box.height) == pytest.approx(height, abs=1)

    async def test_unreachable_resources_fail_fast_and_are_logged_once(
        self, renderer: Renderer, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Unreachable Moodle and CDN files cost no wait and are logged once per job."""
        html = (ATTEMPTS / "23.html").read_text("utf-8")
        caplog.set_level(logging.WARNING)

        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            started = time.monotonic()
            await s.render(html, tmp_path / "a.pdf", paper_format="A4", item=23)
            elapsed = time.monotonic() - started
            await s.render(html, tmp_path / "b.pdf", paper_format="A4", item=24)

        assert elapsed < FAST_RENDER_S
        lines = log_event(caplog, "render.resources_failed")
        assert "item=23" in lines[0]
        logged = " ".join(lines)
        for url in (
            "http://moodle/theme/styles.php/boost/1716992290_1/all",
            "http://moodle/lib/javascript.php/1716992290/lib/requirejs/require.min.js",
            "https://cdn.jsdelivr.net/npm/mathjax@2.7.9/MathJax.js",
        ):
            assert logged.count(url) == 1

    async def test_concurrent_renders_in_one_session_keep_their_pages_apart(
        self, renderer: Renderer, tmp_path: Path
    ) -> None:
        """Three pages rendered at once each print their own attempt."""
        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await asyncio.gather(
                *(
                    s.render(
                        (ATTEMPTS / f"{n}.html").read_text("utf-8"),
                        tmp_path / f"{n}.pdf",
                        paper_format="A4",
                        item=n,
                    )
                    for n in ATTEMPT_TEXT
                )
            )

        for n, (name, _) in ATTEMPT_TEXT.items():
            text = pdf_text(tmp_path / f"{n}.pdf")
            assert name in text
            others = [o[0] for m, o in ATTEMPT_TEXT.items() if m != n]
            assert not any(other in text for other in others)


class TestRequests:
    """Routing: the login page, Moodle's AJAX redirect, secrets in URLs."""

    pytestmark = browser_tests

    async def test_page_navigating_to_login_stays_and_prints(
        self, renderer: Renderer, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A redirect to the login page, while parsing and after load, is dropped."""
        html = page(
            "<p>Before the redirect</p>"
            '<script>window.location = "/login/index.php";</script>'
            "<p>After the redirect</p>"
            "<script>addEventListener('load', () => {"
            " location.href = '/login/index.php?again=1';"
            " document.body.insertAdjacentHTML('beforeend', '<p>After load</p>'); });"
            "</script>"
        )
        caplog.set_level(logging.WARNING)

        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await s.render(html, tmp_path / "p.pdf", paper_format="A4")

        text = pdf_text(tmp_path / "p.pdf")
        assert "Before the redirect" in text
        assert "After the redirect" in text
        assert "After load" in text
        (line,) = log_event(caplog, "render.login_redirect_blocked")
        assert "/login/index.php" in line

    async def test_ajax_login_redirect_in_scripts_is_patched(
        self, renderer: Renderer, site: Site, tmp_path: Path
    ) -> None:
        """A served script's login redirect rejects the AJAX call instead."""
        html = page(
            '<p id="status">AJAX pending</p><script src="/lib/ajax.js"></script>'
        )

        async with renderer.session(base_url=site.url, job_id="j") as s:
            await s.render(html, tmp_path / "p.pdf", paper_format="A4")

        text = pdf_text(tmp_path / "p.pdf")
        assert "AJAX rejected servicerequireslogin" in text

    async def test_failed_resource_urls_are_logged_without_tokens(
        self, renderer: Renderer, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A token in a failed resource's URL never reaches the log."""
        html = page(
            "<p>x</p>",
            head='<link rel="stylesheet" href="http://moodle/a.css?token=s3cr3t&x=1">',
        )
        caplog.set_level(logging.DEBUG)

        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await s.render(html, tmp_path / "p.pdf", paper_format="A4")

        (line,) = log_event(caplog, "render.resources_failed")
        assert "http://moodle/a.css?token=***&x=1" in line
        assert "s3cr3t" not in caplog.text

    async def test_report_html_is_served_as_utf8(
        self, renderer: Renderer, tmp_path: Path
    ) -> None:
        """A report without a charset declaration keeps its accents."""
        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await s.render(
                page("<p>Prüfung für Ärzte</p>"), tmp_path / "u.pdf", paper_format="A4"
            )

        assert "Prüfung für Ärzte" in pdf_text(tmp_path / "u.pdf")


def mathjax_page(version: str, *, ready: bool = True) -> str:
    """A page with a fake MathJax that typesets its formula 300 ms late."""
    typeset = (
        "new Promise((done) => setTimeout(() => {"
        " document.getElementById('f').textContent = 'Typeset formula';"
        " done(); }, 300))"
    )
    if version.startswith("2"):
        fake = (
            f"window.MathJax = {{version: '{version}', Hub: {{ready: {typeset},"
            " Queue(callback) { this.ready.then(callback); }}};"
        )
    else:
        promise = typeset if ready else "new Promise(() => {})"
        fake = f"window.MathJax = {{version: '{version}', startup: {{promise: {promise}}}}};"
    return page(
        '<p><span class="filter_mathjaxloader_equation" id="f">raw TeX</span></p>'
        f"<script>{fake}</script>"
    )


#: A VPL question whose fake Ace editor comes up 300 ms after load.  The
#: editor reports what the ready script does to it into the page.
VPL_BODY = """
<div class="que vplquestion">
  <textarea data-role="code-editor"></textarea>
  <div class="ace-placeholder" id="ed"></div>
  <p id="wrap">Editor scrolls</p><p id="size">Editor small</p>
</div>
<script>
setTimeout(() => {
  const el = document.getElementById("ed");
  el.classList.add("ace_editor");
  const session = {
    getScreenLength: () => 19,
    setUseWrapMode: () => { document.getElementById("wrap").textContent = "Editor wraps lines"; },
  };
  el.env = {editor: {
    renderer: {lineHeight: 20},
    container: el,
    getSession: () => session,
    resize: () => {
      document.getElementById("size").textContent = "Editor grown to " + el.style.height;
    },
  }};
}, 300);
</script>
"""

#: A GeoGebra applet that loads 200 ms after the page and draws twice more.
GEOGEBRA_BODY = """
<div class="GeoGebraFrame" id="ggb"><p id="drawn">Applet loading</p></div>
<script>
window.GGBApplet = function () { return {getAppletObject: function () {}}; };
setTimeout(() => {
  document.getElementById("ggb").classList.add("jsloaded");
  setTimeout(() => { document.getElementById("drawn").textContent = "Applet drawn once"; }, 300);
  setTimeout(() => { document.getElementById("drawn").textContent = "Applet drawn twice"; }, 900);
}, 200);
</script>
"""


class TestReadiness:
    """Waiting for the page to be ready before printing."""

    pytestmark = browser_tests

    @pytest.mark.parametrize("version", ["2.7.9", "3.2.2", "4.0.0"])
    async def test_page_is_printed_after_mathjax_typeset(
        self, renderer: Renderer, tmp_path: Path, version: str
    ) -> None:
        """MathJax 2 (Hub.Queue), 3 and 4 (startup.promise) are waited for."""
        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await s.render(mathjax_page(version), tmp_path / "m.pdf", paper_format="A4")

        text = pdf_text(tmp_path / "m.pdf")
        assert "Typeset formula" in text
        assert "raw TeX" not in text

    async def test_vpl_editors_are_waited_for_and_grown_for_print(
        self, renderer: Renderer, tmp_path: Path
    ) -> None:
        """Ace editors of VPL questions appear late and are sized to their content."""
        html = page(VPL_BODY)

        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await s.render(html, tmp_path / "v.pdf", paper_format="A4")

        text = pdf_text(tmp_path / "v.pdf")
        assert "Editor wraps lines" in text
        assert "Editor grown to 400px" in text

    @pytest.mark.slow
    async def test_geogebra_applets_are_waited_for_until_quiet(
        self, renderer: Renderer, tmp_path: Path
    ) -> None:
        """A GeoGebra frame that loads and then draws late is printed drawn."""
        html = page(GEOGEBRA_BODY)

        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await s.render(html, tmp_path / "g.pdf", paper_format="A4")

        assert "Applet drawn twice" in pdf_text(tmp_path / "g.pdf")

    async def test_never_ready_page_fails_with_the_ready_signal_message(
        self, renderer: Renderer, tmp_path: Path, tune: Callable[..., None]
    ) -> None:
        """Without continue_after_ready_signal_timeout a stuck page fails."""
        tune(ready_signal_timeout_s=1.0)

        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            with pytest.raises(RenderError) as caught:
                await s.render(
                    mathjax_page("3.2.2", ready=False),
                    tmp_path / "m.pdf",
                    paper_format="A4",
                    item=7,
                )

        assert caught.value.message == "Ready signal not received after 1 seconds."
        assert caught.value.stage == "render"
        assert caught.value.attempt == 7
        assert not (tmp_path / "m.pdf").exists()

    async def test_never_ready_page_prints_when_told_to_continue(
        self,
        renderer: Renderer,
        tmp_path: Path,
        tune: Callable[..., None],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """With continue_after_ready_signal_timeout the page prints as it is."""
        tune(ready_signal_timeout_s=1.0, continue_after_ready_signal_timeout=True)
        caplog.set_level(logging.WARNING)

        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await s.render(
                mathjax_page("3.2.2", ready=False),
                tmp_path / "m.pdf",
                paper_format="A4",
            )

        assert "raw TeX" in pdf_text(tmp_path / "m.pdf")
        (line,) = log_event(caplog, "render.ready_timeout")
        assert "pending=mathjax" in line

    async def test_images_that_arrive_after_load_are_printed(
        self,
        renderer: Renderer,
        site: Site,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """An image still loading when the ready check starts is waited for."""
        html = page(
            "<p>Late image</p><script>addEventListener('load', () => {"
            " const img = new Image(); img.src = '/late.png';"
            " document.body.append(img); });</script>"
        )
        # The image is served only once the ready check reported it pending:
        # printed with the image means printing waited for it.
        pending = asyncio.Event()
        loop = asyncio.get_running_loop()

        class OnPending(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "x-moodle-archiver-images-loading" in record.getMessage():
                    loop.call_soon_threadsafe(pending.set)

        caplog.set_level(logging.DEBUG, logger="worker.render")
        hook = OnPending()
        logging.getLogger("worker.render").addHandler(hook)
        site.release_image.clear()
        try:
            async with renderer.session(base_url=site.url, job_id="j") as s:
                rendering = asyncio.create_task(
                    s.render(html, tmp_path / "i.pdf", paper_format="A4")
                )
                waiting = asyncio.create_task(pending.wait())
                await asyncio.wait(
                    {rendering, waiting}, return_when=asyncio.FIRST_COMPLETED
                )
                waiting.cancel()
                site.release_image.set()
                await rendering
        finally:
            site.release_image.set()
            logging.getLogger("worker.render").removeHandler(hook)

        assert pending.is_set()
        (image,) = PdfReader(tmp_path / "i.pdf").pages[0].images
        assert image.image is not None
        assert image.image.size == (64, 48)


class TestBrowserLifecycle:
    """Restarts after a page budget, on too much memory and after a crash."""

    pytestmark = browser_tests

    async def test_browser_is_replaced_after_max_pages(
        self, lifecycle_renderer: Renderer, tmp_path: Path
    ) -> None:
        """Five pages with browser_max_pages=2 need two restarts, and all print."""
        before = lifecycle_renderer.stats.browser_restarts

        async with lifecycle_renderer.session(
            base_url=UNREACHABLE_BASE, job_id="j"
        ) as s:
            await asyncio.gather(
                *(
                    s.render(
                        page(f"<p>Page number {n}</p>"),
                        tmp_path / f"{n}.pdf",
                        paper_format="A4",
                        item=n,
                    )
                    for n in range(5)
                )
            )

        assert lifecycle_renderer.stats.browser_restarts - before >= 2
        for n in range(5):
            assert f"Page number {n}" in pdf_text(tmp_path / f"{n}.pdf")

    async def test_render_after_chromium_was_killed_succeeds(
        self, renderer: Renderer, tmp_path: Path
    ) -> None:
        """A Chromium killed between two renders of a job is replaced unnoticed."""
        before = renderer.stats.browser_restarts

        async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
            await s.render(page("<p>First</p>"), tmp_path / "1.pdf", paper_format="A4")
            pid = renderer.browser_pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await s.render(page("<p>Second</p>"), tmp_path / "2.pdf", paper_format="A4")

        assert "Second" in pdf_text(tmp_path / "2.pdf")
        assert renderer.stats.browser_restarts == before + 1
        assert renderer.browser_pid not in (None, pid)

    async def test_browser_over_its_memory_limit_is_replaced(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A browser above browser_max_memory_mb is replaced before the next page."""
        renderer = Renderer(settings(browser_max_memory_mb=1))
        caplog.set_level(logging.WARNING)
        await renderer.start()
        try:
            async with renderer.session(base_url=UNREACHABLE_BASE, job_id="j") as s:
                await s.render(
                    page("<p>One</p>"), tmp_path / "1.pdf", paper_format="A4"
                )
                await s.render(
                    page("<p>Two</p>"), tmp_path / "2.pdf", paper_format="A4"
                )
        finally:
            await renderer.close()

        assert renderer.stats.browser_restarts == 1
        assert log_event(caplog, "browser.memory_exceeded")
        assert "Two" in pdf_text(tmp_path / "2.pdf")


class TestLaunchAndPatch:
    """Browser options and the script patch, without a browser."""

    def test_proxy_credentials_are_split_off(self) -> None:
        """Playwright gets the proxy server, user, password and bypass list apart."""
        proxy = proxy_options(
            "http://us%40er:p%3Ass@proxy.example:3128", ["moodle", ".lan"]
        )

        assert proxy == {
            "server": "http://proxy.example:3128",
            "username": "us@er",
            "password": "p:ss",
            "bypass": "moodle,.lan",
        }

    def test_launch_options_use_the_configured_chromium(self, tmp_path: Path) -> None:
        """chromium_path is used as is, and must exist."""
        binary = tmp_path / "chromium"
        binary.write_bytes(b"")

        options = launch_options(settings(chromium_path=str(binary)))

        assert options["executable_path"] == str(binary)
        for switch in ("--disable-background-networking", "--disable-web-security"):
            assert switch in options["args"]
        with pytest.raises(ConfigError):
            launch_options(settings(chromium_path=str(tmp_path / "missing")))

    @pytest.mark.parametrize(
        "line",
        [
            b'window.location = URL.relativeUrl("/login/index.php");',
            b"window.location=_url.default.relativeUrl('/login/index.php')",
        ],
    )
    def test_ajax_login_redirect_spellings_are_found(self, line: bytes) -> None:
        """The contract's spelling and Moodle 4's transpiled one are both patched."""
        patched, count = AJAX_LOGIN_REDIRECT.subn(lambda _: AJAX_LOGIN_PATCH, line)

        assert count == 1
        assert b"window.location" not in patched
        assert b"relativeUrl" not in patched
        assert b"\n" not in AJAX_LOGIN_PATCH
