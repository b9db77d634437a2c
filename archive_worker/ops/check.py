"""``check``: a self-test for operators, monitoring and container health checks.

Exit codes follow the monitoring-plugin convention: 0 ok, 1 warning,
2 critical.  Critical means the service cannot work here: NATS unreachable,
JetStream or the service's streams missing, or Chromium unable to print a
page.  Warning means it works but something needs a look: the oldest waiting
job is older than ``--max-queue-age``, the consumer counts more than
``--max-redeliveries`` redeliveries, jobs wait while no worker is
registered, or the optional Moodle URL does not answer.

``check`` never starts a NATS server: without ``NATS_URL`` it connects to the
embedded server of an ``up`` process on ``embedded_nats_port``.  Every probe
has its own short timeout, so the whole check ends well under 10 s.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import aiohttp
import msgspec
from rich.console import Console

from archive_worker.config import Settings
from archive_worker.errors import ArchiveWorkerError

from . import natsio
from .fleet import workers
from .model import CheckResult
from .output import age, since, table

OK, WARNING, CRITICAL = "ok", "warning", "critical"
EXIT_CODES = {OK: 0, WARNING: 1, CRITICAL: 2}
#: Time limits of the probes (the container health check allows 10 s).
NATS_TIMEOUT_S = 2.0
#: Chromium's cold start and first page take 2-5 s on a busy host.
BROWSER_TIMEOUT_S = 9.0
MOODLE_TIMEOUT_S = 3.0
_PAGE = "<!doctype html><html><body><p>archive-worker check</p></body></html>"


class CheckReport(msgspec.Struct, kw_only=True):
    """Every probe's result and the overall level."""

    level: str
    exit_code: int
    checks: list[CheckResult]


async def run_check(
    settings: Settings,
    *,
    browser: bool = True,
    moodle_url: str | None = None,
    max_queue_age_s: float = 900.0,
    max_redeliveries: int = 10,
) -> CheckReport:
    """Run every probe concurrently and combine them."""
    probes = [_nats(settings, max_queue_age_s, max_redeliveries)]
    if browser:
        probes.append(_browser(settings))
    if moodle_url:
        probes.append(_moodle(moodle_url))
    results: list[CheckResult] = []
    for group in await asyncio.gather(*probes):
        results.extend(group)
    level = max((r.level for r in results), key=EXIT_CODES.__getitem__, default=OK)

    return CheckReport(level=level, exit_code=EXIT_CODES[level], checks=results)


async def _nats(
    settings: Settings, max_age_s: float, max_redeliveries: int
) -> list[CheckResult]:
    url = natsio.ops_url(settings)
    try:
        async with natsio.connect(settings, timeout_s=NATS_TIMEOUT_S) as broker:
            out = [
                CheckResult(name="nats", level=OK, detail=f"connected to {broker.url}")
            ]
            if not await natsio.jetstream_available(broker):
                return [
                    *out,
                    CheckResult(
                        name="jetstream",
                        level=CRITICAL,
                        detail="JetStream not enabled or not answering",
                    ),
                ]
            if not await broker.topology_present():
                return [
                    *out,
                    CheckResult(
                        name="streams",
                        level=CRITICAL,
                        detail="streams or the workers' consumer missing",
                    ),
                ]
            out.append(
                CheckResult(
                    name="streams",
                    level=OK,
                    detail="ARCHIVE_JOBS, ARCHIVE_STATUS, ARCHIVE_DLQ and consumer present",
                )
            )
            state = await broker.queue_state()
            fleet = await workers(broker)
    except ArchiveWorkerError as exc:
        return [CheckResult(name="nats", level=CRITICAL, detail=f"{url}: {exc}")]
    oldest = since(state.oldest_waiting_ts)
    out.append(
        CheckResult(
            name="queue_age",
            level=WARNING if oldest is not None and oldest > max_age_s else OK,
            detail=(
                f"oldest waiting job {age(oldest)} (limit {age(max_age_s)}), "
                f"{len(state.waiting)} waiting"
            ),
        )
    )
    out.append(
        CheckResult(
            name="redeliveries",
            level=WARNING if state.redelivered > max_redeliveries else OK,
            detail=f"{state.redelivered} redelivered (limit {max_redeliveries})",
        )
    )
    no_workers = not fleet and bool(state.waiting)
    out.append(
        CheckResult(
            name="workers",
            level=WARNING if no_workers else OK,
            detail=f"{len(fleet)} registered" + (", jobs wait" if no_workers else ""),
        )
    )

    return out


async def _browser(settings: Settings) -> list[CheckResult]:
    from worker.render import Renderer

    quick = msgspec.structs.replace(
        settings,
        wait_for_ready_signal=False,
        pdfa_conversion=False,
        navigation_timeout_s=BROWSER_TIMEOUT_S,
    )
    renderer = Renderer(quick)
    try:
        async with asyncio.timeout(BROWSER_TIMEOUT_S):
            await renderer.start()
            with tempfile.TemporaryDirectory(prefix="archive-check-") as tmp:
                target = Path(tmp) / "check.pdf"
                async with renderer.session(
                    base_url="http://127.0.0.1", job_id="check"
                ) as pages:
                    await pages.render(_PAGE, target, paper_format="A4")
                size = target.stat().st_size
    except (ArchiveWorkerError, TimeoutError, OSError) as exc:
        return [
            CheckResult(
                name="chromium",
                level=CRITICAL,
                detail=f"cannot print a page: {str(exc) or 'timed out'}",
            )
        ]
    finally:
        await renderer.close()

    return [
        CheckResult(
            name="chromium", level=OK, detail=f"printed a test page ({size} bytes)"
        )
    ]


async def _moodle(url: str) -> list[CheckResult]:
    timeout = aiohttp.ClientTimeout(total=MOODLE_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(url, allow_redirects=True) as resp,
        ):
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return [
            CheckResult(
                name="moodle",
                level=WARNING,
                detail=f"{url} not reachable: {str(exc) or 'timed out'}",
            )
        ]
    level = OK if status < 500 else WARNING

    return [CheckResult(name="moodle", level=level, detail=f"{url} answered {status}")]


def render_check(report: CheckReport, out: Console) -> None:
    """Print each probe and the overall level."""
    out.print(
        table(
            None,
            ("check", "level", "detail"),
            [(r.name, r.level.upper(), r.detail) for r in report.checks],
        )
    )
    out.print(f"overall: {report.level.upper()}")
