"""A three-node JetStream cluster on loopback, from the shipped configs.

Each node runs ``nats-server -c deploy/nats/cluster-N.conf`` with the
addresses overridden by flags, as the comment at the top of
``cluster-common.conf`` describes: clients and monitoring on OS-assigned
ports, routes on free loopback ports picked beforehand (every node must know
the others' route addresses before any of them starts).  Everything else,
the accounts and per-role users included, is the shipped configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from archive_worker.embedded import find_nats_server

ROOT = Path(__file__).resolve().parents[1]
NATS_DEPLOY = ROOT / "deploy" / "nats"

#: The secrets the configs read from the environment (accounts.conf and
#: cluster-common.conf); the nodes share them, the store keys could differ.
CLUSTER_SECRETS = {
    "BRIDGE_PASSWORD": "pw-bridge-71d3",
    "WORKER_PASSWORD": "pw-worker-b84a",
    "CLI_PASSWORD": "pw-cli-0c5e",
    "SYS_PASSWORD": "pw-sys-9f27",
    "ROUTE_PASSWORD": "pw-route-3a16",
    "JS_KEY": "key-5c1e8a7f2b9d4e60a3f1c7b2d8e94a05",
}

#: How long one node may take to log "Server is ready".
NODE_READY_TIMEOUT_S = 10.0
#: How long a SIGTERM may take before the node is killed.
NODE_STOP_TIMEOUT_S = 10.0

_LISTEN_RE = re.compile(r"Listening for client connections on ([\d.]+):(\d+)")


def password(user: str) -> str:
    """The password of a user in ``accounts.conf`` (bridge, worker, cli, sys)."""
    return CLUSTER_SECRETS[f"{user.upper()}_PASSWORD"]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on 127.0.0.1 just now.

    The sockets are held open together so the OS hands out distinct ports,
    then closed for nats-server to take them.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])

    return ports


class ClusterNode:
    """One ``nats-server`` process of the cluster.

    Args:
        index: 1, 2 or 3; selects ``cluster-<index>.conf``.
        store_dir: the node's JetStream store (``$NATS_STORE_DIR``).
        route_port: the loopback port of this node's route listener.
        routes: the route URLs of all nodes (this one included, as shipped).
    """

    def __init__(
        self, index: int, store_dir: Path, route_port: int, routes: list[str]
    ) -> None:
        self.name = f"nats-{index}"
        self.config = NATS_DEPLOY / f"cluster-{index}.conf"
        self.store_dir = store_dir
        self.route_port = route_port
        self.routes = routes
        self.url = ""
        self.log: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start the node and wait until it logs "Server is ready".

        Raises:
            AssertionError: the process exited first (its log is included).
            TimeoutError: it did not get ready within ``NODE_READY_TIMEOUT_S``.
        """
        env = {
            "PATH": os.environ.get("PATH", ""),
            "NATS_STORE_DIR": str(self.store_dir),
            **CLUSTER_SECRETS,
        }
        self._proc = await asyncio.create_subprocess_exec(
            find_nats_server(),
            "-c",
            str(self.config),
            "-a",
            "127.0.0.1",
            "-p",
            "-1",
            "-m",
            "-1",
            "--cluster",
            f"nats://127.0.0.1:{self.route_port}",
            "--routes",
            ",".join(self.routes),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.wait_for(self._until_ready(), NODE_READY_TIMEOUT_S)
        assert self._proc.stderr is not None
        self._reader = asyncio.create_task(self._read_rest(self._proc.stderr))

    async def _until_ready(self) -> None:
        assert self._proc is not None
        assert self._proc.stderr is not None
        while line := (await self._proc.stderr.readline()).decode():
            self.log.append(line)
            if match := _LISTEN_RE.search(line):
                self.url = f"nats://{match[1]}:{match[2]}"
            if "Server is ready" in line:
                return
        raise AssertionError(f"{self.name} exited:\n" + "".join(self.log))

    async def _read_rest(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            self.log.append(line.decode())

    async def kill(self) -> None:
        """SIGKILL: the node vanishes without a goodbye, as in a crash."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()

    async def stop(self) -> None:
        """SIGTERM (SIGKILL after ``NODE_STOP_TIMEOUT_S``), then reap the log."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), NODE_STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            await self._reader
            self._reader = None


class NatsCluster:
    """Three nodes from ``cluster-1/2/3.conf``; an async context manager.

    Args:
        base_dir: parent of the nodes' store folders.
    """

    def __init__(self, base_dir: Path) -> None:
        ports = free_ports(3)
        routes = [f"nats://127.0.0.1:{p}" for p in ports]
        self.nodes = [
            ClusterNode(i, base_dir / f"nats-{i}", port, routes)
            for i, port in enumerate(ports, start=1)
        ]

    async def __aenter__(self) -> NatsCluster:
        try:
            await asyncio.gather(*(n.start() for n in self.nodes))
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def urls(self) -> str:
        """The client URLs of all nodes, comma-separated (``NATS_URL``)."""
        return ",".join(n.url for n in self.nodes)

    def node(self, name: str) -> ClusterNode:
        """The node whose ``server_name`` is ``name``."""
        return next(n for n in self.nodes if n.name == name)

    async def stop(self) -> None:
        """Stop every node that still runs."""
        await asyncio.gather(*(n.stop() for n in self.nodes))


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout_s: float,
    interval_s: float = 0.1,
    what: str = "condition",
) -> None:
    """Poll ``check`` until it returns True, at most ``timeout_s`` seconds.

    For state only the server knows (a leader elected, a stream drained),
    where there is nothing to wait on.

    Raises:
        TimeoutError: ``check`` did not become true in time (names ``what``).
    """
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if await check():
                    return
                await asyncio.sleep(interval_s)
    except TimeoutError:
        raise TimeoutError(f"{what} not reached within {timeout_s:g} s") from None
