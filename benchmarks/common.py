"""Shared pieces of the benchmarks: machine facts, statistics, process sampling,
subprocess roles, and jobs of any size built from the reference attempts.

A worker or bridge under test always runs as a subprocess (``archive-worker
worker``/``bridge``, configured by ``ARCHIVE_WORKER_*`` and ``NATS_URL``), so
that the CPU time and memory measured are its own and its Chromium's, not
the benchmark's or the Moodle simulator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from archive_worker.config import Settings, load_settings
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.model import SimJob
from archive_worker.moodle_sim.scenario import REFERENCE_ATTEMPTS, reference_quiz

MIB = 1024 * 1024


@dataclass
class Scenario:
    """What one scenario hands back: rows for the table and JSON, targets."""

    name: str
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def target(self, name: str, limit: str, value: Any, met: bool) -> None:
        """Record a target, its limit, the measured value and the verdict."""
        self.targets.append(
            {"target": name, "limit": limit, "value": value, "met": met}
        )


# --- the machine ----------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Facts the README quotes next to the figures."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    chromium = _command_output(["/usr/bin/chromium", "--version"])
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_total_mib": psutil.virtual_memory().total // MIB,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "chromium": chromium.splitlines()[-1] if chromium else "",
        "ghostscript": _command_output(["gs", "--version"]),
        "load_average_at_start": list(os.getloadavg()),
    }


def _command_output(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


# --- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, NaN for no values."""
    return statistics.fmean(values) if values else float("nan")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- process trees ----------------------------------------------------------------------


def process_class(proc: psutil.Process) -> str:
    """A coarse name for a process of a worker's tree, for CPU breakdowns."""
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except psutil.Error:
        return "gone"
    joined = " ".join(cmd)
    if "--type=renderer" in joined:
        return "chromium-renderer"
    if "--type=gpu-process" in joined:
        return "chromium-gpu"
    if "--type=" in joined:
        return "chromium-other"
    if "chrom" in name or "chrom" in joined.split(" ", 1)[0]:
        return "chromium-browser"
    if name == "node" or ("playwright" in joined and "node" in joined):
        return "playwright-driver"
    if name in ("gs", "ghostscript"):
        return "ghostscript"
    if "python" in name or "archive-worker" in joined:
        return "python-worker"
    return str(name)


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of ``root`` and its live descendants, plus reaped ones.

    Reaped children are in their parent's cumulative times, so the delta of
    two readings is the whole tree's CPU between them.
    """
    total = 0.0
    try:
        parent = psutil.Process(root)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return total
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _pss_rss(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return pss, rss


class TreeSampler:
    """Samples the memory and per-process CPU of process trees in a thread.

    ``peak_pss``/``peak_rss`` are the largest sums over all roots seen at one
    sampling instant (PSS counts shared pages once; summed RSS overstates a
    multi-process Chromium).  ``own_cpu`` keeps each pid's last seen user+
    system time and its class, for a breakdown of where CPU went.
    """

    def __init__(self, roots: Sequence[int], interval_s: float = 0.2) -> None:
        self.roots = list(roots)
        self.interval_s = interval_s
        self.peak_pss = 0
        self.peak_rss = 0
        #: PSS per process class (MiB) at the instant of ``peak_pss``.
        self.peak_breakdown: dict[str, float] = {}
        self.samples = 0
        self._first_cpu: dict[int, float] = {}
        self._last_cpu: dict[int, float] = {}
        self._class: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def reset_peak(self) -> None:
        """Start a new peak (between two measured phases)."""
        self.peak_pss = self.peak_rss = 0
        self.peak_breakdown = {}

    def cpu_by_class(self) -> dict[str, float]:
        """CPU seconds per process class since the sampler started."""
        out: dict[str, float] = {}
        for pid, last in self._last_cpu.items():
            cls = self._class.get(pid, "?")
            out[cls] = out.get(cls, 0.0) + last - self._first_cpu.get(pid, 0.0)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self, *, first: bool = False) -> None:
        pss_sum = rss_sum = 0
        by_class: dict[str, int] = {}
        for root in self.roots:
            try:
                parent = psutil.Process(root)
                procs = [parent, *parent.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                pss, rss = _pss_rss(proc.pid)
                pss_sum += pss
                rss_sum += rss
                try:
                    t = proc.cpu_times()
                except psutil.Error:
                    continue
                if proc.pid not in self._class:
                    self._class[proc.pid] = process_class(proc)
                    if first:
                        self._first_cpu[proc.pid] = t.user + t.system
                self._last_cpu[proc.pid] = t.user + t.system
                cls = self._class[proc.pid]
                by_class[cls] = by_class.get(cls, 0) + pss
        self.samples += 1
        if pss_sum > self.peak_pss:
            self.peak_pss = pss_sum
            self.peak_breakdown = {
                k: round(v / MIB, 1)
                for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])
            }
        self.peak_rss = max(self.peak_rss, rss_sum)


# --- subprocess roles -------------------------------------------------------------------


def role_env(nats_url: str, **settings: Any) -> dict[str, str]:
    """Environment for an ``archive-worker`` subprocess with these settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ARCHIVE_WORKER_", "QUIZ_ARCHIVER_", "MOODLE_ARCHIVER_"))
    }
    env["NATS_URL"] = nats_url
    env["ARCHIVE_WORKER_LOG_FORMAT"] = "json"
    for key, value in settings.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        env["ARCHIVE_WORKER_" + key.upper()] = str(value)
    return env


@contextlib.asynccontextmanager
async def role_process(
    role: str, env: dict[str, str], log_path: Path, *, ready_text: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``archive-worker <role>`` until the block ends (then SIGTERM it).

    Waits until ``ready_text`` shows up in its log (stderr).
    """
    log_file = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from archive_worker.cli import main; main()",
        role,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_file,
        stderr=log_file,
    )
    try:
        deadline = time.monotonic() + 60
        while ready_text not in (text := _read_log(log_path)):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{role} did not start:\n{text[-2000:]}")
            await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 40)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log_file.close()


def _read_log(path: Path) -> str:
    return path.read_text(errors="replace")


def bench_settings(nats_url: str, tmp: Path, **overrides: Any) -> Settings:
    """Settings for the benchmark's own side (bridge in process, broker)."""
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "host": "127.0.0.1",
        "port": 0,
        "data_dir": str(tmp / "data"),
        "work_dir": str(tmp / "work"),
        "log_level": "WARNING",
    }
    values.update(overrides)
    return load_settings(environ={}, overrides=values)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-") as name:
        yield Path(name)


# --- jobs of any size -------------------------------------------------------------------

_tokens = iter(range(10**9))


def new_token() -> str:
    """A fresh 32-hex web service token."""
    return f"{next(_tokens):032x}"


def quiz_job(
    sim: MoodleSimulator, attempts: int, *, backups: bool = False
) -> tuple[SimJob, dict[str, Any]]:
    """A quiz_archiver job of ``attempts`` attempts from the reference pages.

    The three reference pages (24, 25, 23) are reused in turn under new ids
    (1001, 1002, ...) with a metadata row each, so any size is possible.
    """
    ids = list(REFERENCE_ATTEMPTS)
    job, body = reference_quiz(sim, token=new_token(), backups=backups)
    if attempts <= len(ids):
        chosen = ids[:attempts]
    else:
        rows = {row["attemptid"]: row for row in job.metadata}
        chosen = []
        for n in range(attempts):
            source = ids[n % len(ids)]
            new_id = 1001 + n
            name = f"attempt-{new_id}"
            job.add_item(new_id, job.items[source].html, foldername=name, filename=name)
            row = copy.deepcopy(rows[source])
            row["attemptid"] = new_id
            job.metadata.append(row)
            chosen.append(new_id)
    body["task_archive_quiz_attempts"]["attemptids"] = chosen
    return job, body
