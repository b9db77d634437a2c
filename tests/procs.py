"""Helpers for fault tests: service roles in child processes, and big jobs.

A :class:`RoleProcess` runs ``archive-worker worker`` or ``archive-worker
bridge`` as a real child process, configured only through ``ARCHIVE_WORKER_*``
variables and ``NATS_URL``, so that tests can ``kill -9`` it, send it SIGTERM
or measure its memory.  Its JSON log lines (stderr) are collected; tests wait
for a line, never for time.  :func:`many_item_job` registers a quiz_archiver
job with many small attempts in the Moodle simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from archive_worker.broker import Broker
from archive_worker.events import StatusEvent
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.model import SimJob
from archive_worker.moodle_sim.scenario import reference_quiz

#: The console script next to the test interpreter.
CLI = str(Path(sys.executable).with_name("archive-worker"))
#: Longest a role may take to say it is ready (Chromium start included).
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RoleProcess:
    """One ``archive-worker <role>`` child process with collected log lines.

    Args:
        role: ``worker`` or ``bridge``.
        settings: field -> value, passed as ``ARCHIVE_WORKER_<FIELD>``.
        nats_url: the test's nats-server.
    """

    def __init__(
        self, role: str, settings: Mapping[str, object], *, nats_url: str
    ) -> None:
        self.role = role
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("ARCHIVE_WORKER_")
        }
        self.env.update(
            {f"ARCHIVE_WORKER_{k.upper()}": _env_value(v) for k, v in settings.items()}
        )
        self.env |= {
            "NATS_URL": nats_url,
            "ARCHIVE_WORKER_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.setdefault("ARCHIVE_WORKER_LOG_LEVEL", "INFO")
        self.lines: list[dict[str, Any]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._new_line = asyncio.Condition()
        self._eof = False

    @property
    def pid(self) -> int:
        """Process id of the child."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit code once the child has ended."""
        return None if self._proc is None else self._proc.returncode

    async def start(self, ready: str) -> None:
        """Start the child and wait for a log line containing ``ready``."""
        self._proc = await asyncio.create_subprocess_exec(
            CLI,
            self.role,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        await self.wait_for_line(ready, timeout_s=READY_TIMEOUT_S)

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stderr is not None
        while line := await self._proc.stderr.readline():
            text = line.decode(errors="replace").strip()
            try:
                record = json.loads(text)
            except ValueError:
                record = {"event": text, "raw": True}
            if not isinstance(record, dict):
                record = {"event": text, "raw": True}
            async with self._new_line:
                self.lines.append(record)
                self._new_line.notify_all()
        async with self._new_line:
            self._eof = True
            self._new_line.notify_all()

    async def wait_for_line(self, text: str, *, timeout_s: float) -> dict[str, Any]:
        """The first log record whose event contains ``text``.

        Raises:
            AssertionError: the child ended or ``timeout_s`` passed first.
        """
        seen = 0
        async with asyncio.timeout(timeout_s), self._new_line:
            while True:
                for record in self.lines[seen:]:
                    if text in str(record.get("event", "")):
                        return record
                seen = len(self.lines)
                if self._eof:
                    tail = "\n".join(str(r) for r in self.lines[-20:])
                    raise AssertionError(
                        f"{self.role} ended before logging {text!r}:\n{tail}"
                    )
                await self._new_line.wait()

    def events(self, text: str) -> list[str]:
        """Event texts of every record so far that contains ``text``."""
        return [str(r["event"]) for r in self.lines if text in str(r.get("event", ""))]

    def kill(self) -> None:
        """``kill -9`` the child."""
        os.kill(self.pid, signal.SIGKILL)

    async def terminate(self, *, timeout_s: float = 30.0) -> int:
        """Send SIGTERM and wait for the exit code."""
        os.kill(self.pid, signal.SIGTERM)
        return await self.wait(timeout_s=timeout_s)

    async def wait(self, *, timeout_s: float) -> int:
        """Wait for the child to end; its exit code."""
        assert self._proc is not None
        code = await asyncio.wait_for(self._proc.wait(), timeout_s)
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self) -> None:
        """End the child if it still runs (SIGTERM, then SIGKILL)."""
        if self._proc is None or self._proc.returncode is not None:
            if self._reader is not None:
                await self._reader
            return
        try:
            await self.terminate(timeout_s=20.0)
        except TimeoutError:
            self.kill()
            await self.wait(timeout_s=10.0)

    def rss_kb(self) -> int:
        """Resident memory of the child (not its children), in KiB."""
        return rss_kb(self.pid)


def rss_kb(pid: int) -> int:
    """``VmRSS`` of a process from ``/proc``, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for pid {pid}")


@contextlib.asynccontextmanager
async def role(
    name: str, settings: Mapping[str, object], *, nats_url: str
) -> AsyncIterator[RoleProcess]:
    """Start a role, yield it, and make sure it is gone afterwards."""
    proc = RoleProcess(name, settings, nats_url=nats_url)
    ready = "worker.started" if name == "worker" else "bridge.listening"
    try:
        await proc.start(ready)
        yield proc
    finally:
        await proc.stop()


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


# --- jobs -------------------------------------------------------------------------


def item_page(item_id: int, *, busy_ms: int = 0) -> str:
    """A tiny report page; ``busy_ms`` keeps Chromium's main thread busy on load."""
    script = ""
    if busy_ms:
        script = (
            "<script>const t = Date.now() + "
            f"{busy_ms}; while (Date.now() < t) {{}}</script>"
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Attempt {item_id}</title></head>"
        f'<body class="quiz-archiver-report"><h1>Attempt {item_id}</h1>'
        f"<p>Report text of attempt {item_id}.</p>{script}</body></html>"
    )


def many_item_job(
    sim: MoodleSimulator,
    *,
    token: str,
    count: int,
    attachments: bool = False,
    busy_ms: int = 0,
    first_id: int = 1001,
) -> tuple[SimJob, dict[str, Any]]:
    """A quiz_archiver job of ``count`` small attempts, plus its request body.

    Attempt ids run from ``first_id``; each attempt's folder and file are
    ``attempt-<id>``; with ``attachments`` each has one text file in slot 1.
    """
    job, body = reference_quiz(
        sim, token=token, attempt_ids=[24], backups=False, attachments=False
    )
    job.items.clear()
    template = job.metadata[0]
    job.metadata = []
    ids = list(range(first_id, first_id + count))
    for item_id in ids:
        name = f"attempt-{item_id}"
        job.add_item(
            item_id, item_page(item_id, busy_ms=busy_ms), foldername=name, filename=name
        )
        if attachments:
            job.add_attachment(
                item_id,
                "answer.txt",
                f"Answer of attempt {item_id}.\n".encode(),
                group="1",
                mimetype="text/plain",
            )
        job.metadata.append({**template, "attemptid": item_id, "userid": item_id})
    task = body["task_archive_quiz_attempts"]
    task["attemptids"] = ids
    task["sections"]["attachments"] = "1" if attachments else "0"

    return job, body


async def wait_for_event(
    broker: Broker,
    job_id: str,
    predicate: Callable[[StatusEvent], bool],
    *,
    timeout_s: float,
    seen: list[StatusEvent] | None = None,
) -> StatusEvent:
    """The first status event of ``job_id`` (history included) that matches."""
    async with asyncio.timeout(timeout_s), broker.follow_events(job_id) as events:
        async for event in events:
            if seen is not None:
                seen.append(event)
            if predicate(event):
                return event
    raise AssertionError(f"event stream of {job_id} ended")


async def wait_done(job: SimJob, *, timeout_s: float) -> None:
    """Wait until Moodle has the job in a final state."""
    await asyncio.wait_for(job.done.wait(), timeout_s)
