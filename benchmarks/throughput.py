"""Scenario ``throughput``: jobs of 1, 10 and 50 attempts, and 8 jobs of 10
attempts at once, on one worker process with 1 and with 2 job slots.

Production settings (``render_concurrency`` 2, INFO logs as JSON, backups
off so that the work is the attempts only); PDF/A off, plus one row of the
10-attempt job with PDF/A on.  Per row: wall time from the first POST to the
last terminal status, attempts per minute, CPU seconds per attempt of the
worker's whole process tree (Python, Playwright driver, Chromium,
Ghostscript), the peak PSS of that tree, and nats-server CPU per job.
"""

from __future__ import annotations

from .common import Scenario, scratch_dir
from .harness import measured_stack, run_batch

PEAK_MIB_TARGET = 400.0
FLAT_TOLERANCE = 0.15


async def run(quick: bool) -> Scenario:
    """Both slot settings, then one PDF/A row; see the module docstring."""
    sc = Scenario("throughput", "2. Job throughput and cost (one worker process)")
    batches: list[tuple[str, list[int]]] = (
        [("1 attempt", [1]), ("3 attempts", [3]), ("4 jobs x 3 at once", [3] * 4)]
        if quick
        else [
            ("1 attempt", [1]),
            ("10 attempts", [10]),
            ("50 attempts", [50]),
            ("8 jobs x 10 at once", [10] * 8),
        ]
    )
    for slots in (1, 2):
        with scratch_dir("throughput") as tmp:
            async with measured_stack(
                tmp, job_slots=slots, pdfa_conversion=False
            ) as stack:
                await run_batch(stack, [1])  # warm-up, discarded
                rows = []
                for label, sizes in batches:
                    row = await run_batch(stack, sizes, label=label)
                    rows.append({"slots": slots, "pdfa": False, **row})
                sc.rows += rows
        if slots == 2:
            peak = max(r["peak_pss_mib"] for r in rows)
            sc.target(
                "peak PSS of worker + Chromium, 2 slots (MiB)",
                f"<= {PEAK_MIB_TARGET:g}",
                peak,
                peak <= PEAK_MIB_TARGET,
            )
        single = [r for r in rows if r["jobs"] == 1]
        cpu = [r["cpu_s_per_attempt"] for r in single]
        spread = max(cpu) / min(cpu) - 1 if min(cpu) > 0 else float("inf")
        sizes_text = "/".join(str(r["attempts"]) for r in single)
        sc.target(
            f"CPU s/attempt flat over {sizes_text} attempts, {slots} slot(s)",
            f"max/min - 1 <= {FLAT_TOLERANCE:.0%}",
            f"{'/'.join(str(c) for c in cpu)} ({spread:+.0%})",
            spread <= FLAT_TOLERANCE,
        )
    with scratch_dir("throughput-pdfa") as tmp:
        async with measured_stack(tmp, job_slots=2, pdfa_conversion=True) as stack:
            await run_batch(stack, [1])
            size = 3 if quick else 10
            row = await run_batch(stack, [size], label=f"{size} attempts, PDF/A")
            sc.rows.append({"slots": 2, "pdfa": True, **row})
    sc.notes.append(
        "the 1-attempt job carries the whole per-job constant (context, status"
        " calls, ZIP, upload), so it is the most expensive per attempt"
    )
    return sc
