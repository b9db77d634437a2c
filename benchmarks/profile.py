"""Scenario ``profile``: where a worker's time goes on a 50-attempt job.

Two views of one run (one worker process, 2 slots, 2 renders at a time,
PDF/A off): CPU seconds per process class of the worker's tree (Python,
Playwright's Node driver, Chromium's browser, renderer and GPU processes),
and py-spy's samples of the Python process (``--nonblocking``, 100 Hz,
idle excluded) summed by function (self time) and by source file
(inclusive).  The raw py-spy output is kept next to the JSON results.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

from .common import Scenario, scratch_dir
from .harness import measured_stack, run_batch

TOP = 12


async def run(quick: bool, out_dir: Path = Path("bench-results")) -> Scenario:
    """Profile the worker during one job; see the module docstring."""
    sc = Scenario("profile", "5. Where the time goes (50-attempt job)")
    size = 6 if quick else 50
    beside = Path(sys.executable).parent / "py-spy"
    spy = str(beside) if beside.is_file() else shutil.which("py-spy")
    with scratch_dir("profile") as tmp:
        async with measured_stack(tmp, job_slots=2, pdfa_conversion=False) as stack:
            await run_batch(stack, [1])
            raw = tmp / "pyspy.txt"
            proc = None
            if spy:
                proc = await asyncio.create_subprocess_exec(
                    spy,
                    "record",
                    "--pid",
                    str(stack.worker_pids[0]),
                    "--rate",
                    "100",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                await asyncio.sleep(1.0)
            before = stack.sampler.cpu_by_class()
            row = await run_batch(stack, [size], label=f"{size} attempts")
            after = stack.sampler.cpu_by_class()
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                await asyncio.wait_for(proc.wait(), 30)
        by_class = {k: round(after.get(k, 0.0) - before.get(k, 0.0), 2) for k in after}
        total = sum(by_class.values()) or 1.0
        sc.rows.append(row)
        for name, seconds in sorted(by_class.items(), key=lambda kv: -kv[1]):
            sc.rows.append(
                {
                    "case": f"CPU: {name}",
                    "cpu_s": seconds,
                    "share": f"{seconds / total:.0%}",
                    "cpu_s_per_attempt": round(seconds / size, 3),
                }
            )
        _keep_profile(sc, raw, out_dir)
    return sc


def _keep_profile(sc: Scenario, raw: Path, out_dir: Path) -> None:
    if not raw.is_file():
        sc.notes.append("py-spy not available or not permitted; no Python profile")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = out_dir / "profile-pyspy.txt"
    shutil.copy(raw, kept)
    self_time, by_file, samples = summarise(raw.read_text())
    sc.extra["pyspy_samples"] = samples
    sc.extra["pyspy_top_self"] = self_time
    sc.extra["pyspy_top_files_inclusive"] = by_file
    sc.notes.append(f"py-spy raw stacks kept in {kept}")
    for name, share in list(self_time.items())[:6]:
        sc.notes.append(f"python self time {share:>6}: {name}")
    for name, share in list(by_file.items())[:6]:
        sc.notes.append(f"python inclusive {share:>6}: {name}")


def summarise(text: str) -> tuple[dict[str, str], dict[str, str], int]:
    """Top functions by self samples and files by inclusive samples."""
    self_time: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f.strip()]
        if frames:
            self_time[_short(frames[-1])] += count
        for file in {_file(f) for f in frames}:
            by_file[file] += count

    def share(counter: Counter[str]) -> dict[str, str]:
        return {k: f"{v / max(total, 1):.1%}" for k, v in counter.most_common(TOP)}

    return share(self_time), share(by_file), total


def _short(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)".
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({_tail(path)})"


def _file(frame: str) -> str:
    _, _, where = frame.partition(" (")
    return _tail(where.rstrip(")").rsplit(":", 1)[0])


def _tail(path: str) -> str:
    parts = Path(path).parts
    for anchor in ("site-packages", "main", "lib"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[idx + 1 :])
    return "/".join(parts[-2:])
