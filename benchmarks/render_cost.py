"""Scenario ``render``: pipeline cost per attempt against a bare print loop.

*Bare*: Playwright in this process, one Chromium already running with the
worker's binary and flags (:func:`worker.browser.launch_options`), one
context with the worker's viewport, and for each attempt a new page whose
``<base>/mock/attempt`` is routed to the report HTML, loaded, printed with
the worker's PDF options and closed.  Warm-up iterations are discarded.

*Pipeline*: a worker subprocess takes whole jobs through the bridge and
NATS: report fetched from the simulator, rendered, checksummed, zipped and
uploaded.  Its steady-state cost per attempt is the slope between a small
and a large job, ``(T(large) - T(small)) / (large - small)``, which removes
the per-job constant (context, status calls, backups off).  Both are run
with 1 and with 2 renders at a time; PDF/A is off except in its own row.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from playwright.async_api import Browser, async_playwright

from archive_worker.config import Settings
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.scenario import REFERENCE_ATTEMPTS, reference_quiz
from worker.browser import launch_options

from .common import Scenario, bench_settings, mean, new_token, percentile, scratch_dir
from .harness import measured_stack, run_batch

TARGET_RATIO = 1.10


async def bare_loop(
    settings: Settings,
    base_url: str,
    pages: list[str],
    *,
    iterations: int,
    warmup: int,
    concurrency: int,
) -> dict[str, Any]:
    """Print ``pages`` in turn; return per-attempt wall and per-print times."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(**launch_options(settings))
        try:
            return await _loop(
                browser, settings, base_url, pages, iterations, warmup, concurrency
            )
        finally:
            await browser.close()


async def _loop(
    browser: Browser,
    settings: Settings,
    base_url: str,
    pages: list[str],
    iterations: int,
    warmup: int,
    concurrency: int,
) -> dict[str, Any]:
    width = settings.viewport_width
    context = await browser.new_context(
        viewport={"width": width, "height": int(width / (16 / 9))},
        service_workers="block",
    )
    url = base_url.rstrip("/") + "/mock/attempt"
    margin = settings.page_margin
    counter = iter(range(10**9))
    times: list[float] = []

    async def print_one(html: str) -> float:
        started = time.monotonic()
        page = await context.new_page()
        try:
            body = html.encode()
            await page.route(
                url,
                lambda route: route.fulfill(
                    status=200, content_type="text/html; charset=utf-8", body=body
                ),
            )
            await page.goto(url, wait_until="load")
            await page.pdf(
                format="A4",
                print_background=True,
                display_header_footer=False,
                margin={
                    "top": margin,
                    "right": margin,
                    "bottom": margin,
                    "left": margin,
                },
            )
        finally:
            await page.close()
        return time.monotonic() - started

    async def lane(total: int, record: bool) -> None:
        while (n := next(counter)) < total:
            took = await print_one(pages[n % len(pages)])
            if record:
                times.append(took)

    await asyncio.gather(*(lane(warmup, False) for _ in range(concurrency)))
    counter = iter(range(10**9))
    started = time.monotonic()
    await asyncio.gather(*(lane(iterations, True) for _ in range(concurrency)))
    wall = time.monotonic() - started
    await context.close()
    return {
        "s_per_attempt": wall / iterations,
        "print_ms_p50": percentile(times, 50) * 1000,
        "print_ms_mean": mean(times) * 1000,
    }


async def run(quick: bool) -> Scenario:
    """Measure both and compare; see the module docstring."""
    sc = Scenario("render", "1. Render cost: pipeline vs bare Playwright print")
    small, large = (3, 9) if quick else (6, 30)
    warmup, iterations = (2, 6) if quick else (4, 30)
    for concurrency in (1, 2):
        bare = await _bare(concurrency, warmup, iterations)
        sc.rows.append(
            {
                "case": f"bare print, {concurrency} at a time",
                "pdfa": False,
                "attempts": iterations,
                "s_per_attempt": round(bare["s_per_attempt"], 3),
                "print_ms_p50": round(bare["print_ms_p50"]),
            }
        )
        pipe = await _pipeline(concurrency, small, large, pdfa=False)
        sc.rows.append(pipe)
        ratio = pipe["s_per_attempt"] / bare["s_per_attempt"]
        pipe["ratio_to_bare"] = round(ratio, 2)
        sc.target(
            f"pipeline/bare per attempt, {concurrency} at a time",
            f"<= {TARGET_RATIO}",
            round(ratio, 2),
            ratio <= TARGET_RATIO,
        )
    pdfa_small, pdfa_large = (1, 3) if quick else (3, 9)
    sc.rows.append(await _pipeline(1, pdfa_small, pdfa_large, pdfa=True))
    sc.notes.append(
        "pipeline s_per_attempt = (T(large job) - T(small job)) / (large - small);"
        " render_ms = the worker's own render.complete durations (page open"
        " to PDF written) in the large job"
    )
    return sc


async def _bare(concurrency: int, warmup: int, iterations: int) -> dict[str, Any]:
    with scratch_dir("bare") as tmp:
        settings = bench_settings("nats://127.0.0.1:1", tmp)
        async with MoodleSimulator() as sim:
            job, _ = reference_quiz(sim, token=new_token(), backups=False)
            pages = [job.items[i].html for i in REFERENCE_ATTEMPTS]
            return await bare_loop(
                settings,
                sim.base_url,
                pages,
                iterations=iterations,
                warmup=warmup,
                concurrency=concurrency,
            )


async def _pipeline(
    concurrency: int, small: int, large: int, *, pdfa: bool
) -> dict[str, Any]:
    with scratch_dir("pipeline") as tmp:
        async with measured_stack(
            tmp, job_slots=1, render_concurrency=concurrency, pdfa_conversion=pdfa
        ) as stack:
            await run_batch(stack, [1])  # warm-up: first context, first page
            first = await run_batch(stack, [small])
            second = await run_batch(stack, [large])
    slope = (second["wall_s"] - first["wall_s"]) / (large - small)
    cpu_slope = (
        second["cpu_s_per_attempt"] * large - first["cpu_s_per_attempt"] * small
    ) / (large - small)
    return {
        "case": f"pipeline, {concurrency} at a time",
        "pdfa": pdfa,
        "attempts": f"{small}->{large}",
        "s_per_attempt": round(slope, 3),
        "s_per_attempt_large_job": second["s_per_attempt"],
        "cpu_s_per_attempt": round(cpu_slope, 3),
        "render_ms_p50": second["render_ms_p50"],
        "status": second["status"],
    }
