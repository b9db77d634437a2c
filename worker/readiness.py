"""Waiting until a loaded report page is ready to print (contract 3.5).

``js/readysignal.js`` does the waiting inside the page: images, web fonts,
MathJax 2/3/4, GeoGebra applets and VPL code editors.  It enforces the
timeout itself and answers with which components it found and which are
still pending, so a timeout can name what the page was waiting for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from archive_worker.errors import RenderError

if TYPE_CHECKING:
    from playwright.async_api import Page

    from archive_worker.config import Settings

log = logging.getLogger(__name__)

#: Ready-signal timings from contract 4 (poll 250 ms, GeoGebra quiet 2000 ms)
#: and 3.5 (an unknown MathJax version is waited for 3 s).
READY_POLL_MS = 250
GEOGEBRA_QUIET_MS = 2000
UNKNOWN_MATHJAX_MS = 3000

#: The ready script enforces its timeout itself; this extra time only bounds
#: a renderer so busy that the script's own timer cannot fire.
READY_GRACE_S = 5.0

READY_SCRIPT = files("worker").joinpath("js/readysignal.js").read_text("utf-8")


async def wait_until_ready(page: Page, settings: Settings, item: int | None) -> bool:
    """Wait for the page's ready signal, as far as the settings ask for it.

    Args:
        page: a page whose load event has fired.
        settings: ``wait_for_ready_signal``, ``ready_signal_timeout_s`` and
            ``continue_after_ready_signal_timeout`` are used.
        item: the attempt or submission id, for errors and logs.

    Returns:
        True when the page is ready (or waiting is off); False when it timed
        out and ``continue_after_ready_signal_timeout`` lets it print anyway
        (logged as ``render.ready_timeout`` at WARNING).

    Raises:
        RenderError: the ready signal timed out and printing anyway is off.
        playwright.async_api.Error: the page or browser went away.
    """
    if not settings.wait_for_ready_signal:
        return True
    timeout_s = settings.ready_signal_timeout_s
    options = {
        "timeoutMs": timeout_s * 1000,
        "pollMs": READY_POLL_MS,
        "geogebraQuietMs": GEOGEBRA_QUIET_MS,
        "unknownMathJaxMs": UNKNOWN_MATHJAX_MS,
    }
    started = time.monotonic()
    try:
        result: dict[str, Any] = await asyncio.wait_for(
            page.evaluate(READY_SCRIPT, options), timeout_s + READY_GRACE_S
        )
    except TimeoutError:
        result = {"ready": False, "components": {}}
    components: dict[str, bool | None] = result.get("components", {})
    if result.get("ready"):
        log.debug(
            "render.ready item=%s ms=%d components=%s",
            _item(item),
            (time.monotonic() - started) * 1000,
            _names(components, lambda state: state is not None),
        )
        return True
    if not settings.continue_after_ready_signal_timeout:
        raise RenderError(
            f"Ready signal not received after {timeout_s:g} seconds.",
            stage="render",
            attempt=item,
        )
    log.warning(
        "render.ready_timeout item=%s timeout_s=%g pending=%s",
        _item(item),
        timeout_s,
        _names(components, lambda state: state is False),
    )

    return False


def _names(components: dict[str, bool | None], keep: Any) -> str:
    return ",".join(name for name, state in components.items() if keep(state)) or "-"


def _item(item: int | None) -> str:
    return "-" if item is None else str(item)
