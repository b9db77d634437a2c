"""The deployment files: NATS server configs, compose files, Kubernetes manifests.

The NATS configs are tested for real: a ``nats-server`` started from
``deploy/nats/single.conf`` (on loopback, with a temporary store) and the
service's own broker code connecting as each role's user.  The container
image is not built here (that takes minutes): ``scripts/container-smoke``
does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from archive_worker import constants as c
from archive_worker.broker import Broker
from archive_worker.config import FIELD_NAMES, Settings, env_name, load_settings
from archive_worker.embedded import EmbeddedNats, find_nats_server
from archive_worker.events import StatusEvent
from archive_worker.jobqueue import JobQueue, subscribe_cancel
from archive_worker.jobs import (
    JobSpec,
    JobStatus,
    job_identity,
)

from .conftest import SECRET_TOKEN, make_job_spec

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
#: The files nats-server is started with; the others are included by them.
SERVER_CONFIGS = [
    DEPLOY / "nats" / n
    for n in ("single.conf", "cluster-1.conf", "cluster-2.conf", "cluster-3.conf")
]

#: The secrets the NATS configs read from the environment.
NATS_SECRETS = {
    "BRIDGE_PASSWORD": "pw-bridge-4f1c",
    "WORKER_PASSWORD": "pw-worker-9a0e",
    "CLI_PASSWORD": "pw-cli-27b3",
    "SYS_PASSWORD": "pw-sys-c81d",
    "ROUTE_PASSWORD": "pw-route-5e62",
    "JS_KEY": "key-0d9b3f6a8c2e4b17a5d0e9f3c6b8a142",
}

#: How long a test waits for the server to refuse something.
DENIAL_TIMEOUT_S = 5.0
SERVER_READY_TIMEOUT_S = 10.0


def _nats_env(store_dir: Path | None = None, **changes: str | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", ""), **NATS_SECRETS}
    if store_dir is not None:
        env["NATS_STORE_DIR"] = str(store_dir)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _password(user: str) -> str:
    return NATS_SECRETS[f"{user.upper()}_PASSWORD"]


# --- a nats-server started from a shipped config ------------------------------

_LISTEN_RE = re.compile(r"Listening for client connections on ([\d.]+):(\d+)")


class ConfiguredNats:
    """``nats-server -c <config>`` on loopback with any free ports.

    :class:`~archive_worker.embedded.EmbeddedNats` passes ``--store_dir``,
    which nats-server refuses next to a config file that sets ``store_dir``;
    the shipped configs take it from ``$NATS_STORE_DIR`` instead.
    """

    def __init__(self, config: Path, store_dir: Path) -> None:
        self.config = config
        self.store_dir = store_dir
        self.url = ""
        self.log: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ConfiguredNats:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> str:
        """Start and wait for "Server is ready" in the server's log."""
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
            env=_nats_env(self.store_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.wait_for(self._until_ready(), SERVER_READY_TIMEOUT_S)
        assert self._proc.stderr is not None
        self._reader = asyncio.create_task(self._read_rest(self._proc.stderr))
        return self.url

    async def _until_ready(self) -> None:
        assert self._proc is not None
        assert self._proc.stderr is not None
        while line := (await self._proc.stderr.readline()).decode():
            self.log.append(line)
            if match := _LISTEN_RE.search(line):
                self.url = f"nats://{match[1]}:{match[2]}"
            if "Server is ready" in line:
                return
        raise AssertionError("nats-server exited:\n" + "".join(self.log))

    async def _read_rest(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            self.log.append(line.decode())

    async def stop(self) -> None:
        """Stop cleanly (SIGTERM), so the store is flushed to disk."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        if self._reader is not None:
            await self._reader


@pytest.fixture
async def nats_single(tmp_path: Path) -> AsyncIterator[ConfiguredNats]:
    """A nats-server running deploy/nats/single.conf."""
    async with ConfiguredNats(DEPLOY / "nats" / "single.conf", tmp_path / "nats") as s:
        yield s


@dataclass
class Session:
    """A plain nats-py connection as one user, collecting the server's refusals."""

    nc: Client
    js: JetStreamContext
    errors: asyncio.Queue[Exception] = field(default_factory=asyncio.Queue)

    async def denied(self, action: Awaitable[object], subject: str) -> None:
        """Run ``action``; the server must refuse ``subject`` to this user."""
        task = asyncio.ensure_future(action)
        try:
            error = await asyncio.wait_for(self.errors.get(), DENIAL_TIMEOUT_S)
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        # nats-py lowercases the server's message, subject included.
        message = str(error)
        assert "permissions violation" in message, message
        assert f'"{subject.lower()}"' in message, message


@pytest.fixture
async def connect(
    nats_single: ConfiguredNats,
) -> AsyncIterator[Callable[[str], Awaitable[Session]]]:
    """Open plain connections to the single-node server as a given user."""
    sessions: list[Session] = []

    async def factory(user: str) -> Session:
        errors: asyncio.Queue[Exception] = asyncio.Queue()

        async def on_error(exc: Exception) -> None:
            errors.put_nowait(exc)

        nc = Client()
        await nc.connect(
            nats_single.url,
            user=user,
            password=_password(user),
            error_cb=on_error,
            allow_reconnect=False,
        )
        session = Session(nc, nc.jetstream(timeout=2), errors)
        sessions.append(session)
        return session

    yield factory
    for session in sessions:
        await session.nc.close()


@pytest.fixture
async def role_broker(
    nats_single: ConfiguredNats, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[[str], Awaitable[Broker]]]:
    """The service's own Broker, connected as a given user."""
    brokers: list[Broker] = []

    async def factory(user: str) -> Broker:
        settings = make_settings(
            nats_url=nats_single.url, nats_user=user, nats_password=_password(user)
        )
        broker = await Broker.connect(settings, url=nats_single.url, name=user)
        brokers.append(broker)
        return broker

    yield factory
    for broker in brokers:
        await broker.close()


async def _queue_job(bridge: Broker, token: str = SECRET_TOKEN) -> JobSpec:
    spec = make_job_spec(token)
    _, msg_id = job_identity(spec.flavour, spec.moodle.base_url, token)
    assert await bridge.publish_job(spec, msg_id=msg_id)
    return spec


# --- configs ------------------------------------------------------------------


class TestNatsConfigs:
    @pytest.mark.parametrize("config", SERVER_CONFIGS, ids=lambda p: p.name)
    def test_config_is_valid(self, config: Path, tmp_path: Path) -> None:
        """nats-server -t accepts every shipped server config."""
        result = subprocess.run(
            [find_nats_server(), "-t", "-c", str(config)],
            env=_nats_env(tmp_path),
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "is valid" in result.stderr

    def test_missing_secret_stops_the_server(self, tmp_path: Path) -> None:
        """Without a password in the environment nats-server refuses to start."""
        result = subprocess.run(
            [find_nats_server(), "-t", "-c", str(DEPLOY / "nats" / "single.conf")],
            env=_nats_env(tmp_path, WORKER_PASSWORD=None),
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode != 0
        assert "WORKER_PASSWORD" in result.stderr

    def test_cluster_nodes_share_accounts_and_cluster(self) -> None:
        """Each cluster config names its node and includes the shared parts."""
        texts = [(DEPLOY / "nats" / f"cluster-{n}.conf").read_text() for n in (1, 2, 3)]
        names = [re.search(r"^server_name:\s*(\S+)", t, re.M) for t in texts]
        assert [m[1] for m in names if m] == ["nats-1", "nats-2", "nats-3"]
        for text in texts:
            assert "include ./accounts.conf" in text
            assert "include ./cluster-common.conf" in text


# --- permissions, with the service's own code ----------------------------------


class TestRolePermissions:
    async def test_every_role_can_create_the_topology(
        self, role_broker: Callable[[str], Awaitable[Broker]]
    ) -> None:
        """ensure_topology() works as bridge, worker and cli, in any order."""
        for user in ("worker", "bridge", "cli"):
            broker = await role_broker(user)
            await broker.ensure_topology()
            assert await broker.topology_present()

    async def test_bridge_queues_jobs_and_reads_status(
        self, role_broker: Callable[[str], Awaitable[Broker]]
    ) -> None:
        """The bridge publishes a job, lists the queue and reads the last event."""
        bridge = await role_broker("bridge")
        worker = await role_broker("worker")
        await bridge.ensure_topology()
        spec = await _queue_job(bridge)
        assert (await bridge.queue_state()).waiting == [spec.job_id]
        event = StatusEvent(
            job_id=spec.job_id, flavour=spec.flavour.value, status=JobStatus.RUNNING
        )
        await worker.publish_event(event)
        last = await bridge.last_event(spec.job_id)
        assert last is not None
        assert last.status is JobStatus.RUNNING

    async def test_worker_takes_and_settles_jobs(
        self, role_broker: Callable[[str], Awaitable[Broker]]
    ) -> None:
        """The worker fetches, extends, acks and dead-letters through its own code."""
        bridge = await role_broker("bridge")
        worker = await role_broker("worker")
        await worker.ensure_topology()
        spec = await _queue_job(bridge)
        queue = JobQueue(worker)
        await queue.open()
        try:
            (delivery,) = await queue.fetch(1, timeout_s=2)
            assert delivery.job_id == spec.job_id
            await delivery.extend()
            await delivery.ack()
        finally:
            await queue.close()
        await worker.publish_dead_letter(spec.job_id, b"{}")
        assert (await worker.queue_state()).waiting == []
        info = await worker.js.stream_info(c.JOBS_STREAM)
        assert info.state.messages == 0

    async def test_worker_answers_cancel_and_service_pings(
        self,
        role_broker: Callable[[str], Awaitable[Broker]],
        connect: Callable[[str], Awaitable[Session]],
    ) -> None:
        """A worker receives cancel requests and answers $SRV pings as a micro service."""
        from nats.micro import add_service

        worker = await role_broker("worker")
        cli = await role_broker("cli")
        canceled: list[str] = []

        async def on_cancel(job_id: str) -> None:
            canceled.append(job_id)

        sub = await subscribe_cancel(worker, on_cancel)
        service = await add_service(
            worker.nc, name=c.MICRO_SERVICE_NAME, version="0.1.0"
        )
        await worker.nc.flush()  # the service's subscriptions reach the server
        try:
            assert await cli.request_cancel("job-1")
            assert canceled == ["job-1"]
            reply = await cli.nc.request(f"$SRV.PING.{c.MICRO_SERVICE_NAME}", b"")
            assert msgspec.json.decode(reply.data)["name"] == c.MICRO_SERVICE_NAME
        finally:
            await service.stop()
            await sub.unsubscribe()

    async def test_worker_keeps_checkpoints(
        self, connect: Callable[[str], Awaitable[Session]]
    ) -> None:
        """The worker creates the checkpoint bucket and puts, gets, deletes objects."""
        worker = await connect("worker")
        store = await worker.js.create_object_store(c.CHECKPOINT_BUCKET)
        await store.put("job-1/attempt-23.pdf", b"%PDF-1.7 ...")
        got = await store.get("job-1/attempt-23.pdf")
        assert got.data == b"%PDF-1.7 ..."
        await store.delete("job-1/attempt-23.pdf")
        assert worker.errors.empty()

    async def test_bridge_cannot_take_or_settle_jobs(
        self,
        role_broker: Callable[[str], Awaitable[Broker]],
        connect: Callable[[str], Awaitable[Session]],
    ) -> None:
        """The bridge may not pull jobs, ack them, or listen on the job subjects."""
        cli = await role_broker("cli")
        await cli.ensure_topology()
        await _queue_job(cli)
        bridge = await connect("bridge")
        sub = await bridge.js.pull_subscribe_bind(
            durable=c.WORKERS_CONSUMER, stream=c.JOBS_STREAM
        )
        await bridge.denied(
            sub.fetch(1, timeout=DENIAL_TIMEOUT_S),
            f"$JS.API.CONSUMER.MSG.NEXT.{c.JOBS_STREAM}.{c.WORKERS_CONSUMER}",
        )
        held = await cli.js.pull_subscribe_bind(
            durable=c.WORKERS_CONSUMER, stream=c.JOBS_STREAM
        )
        (msg,) = await held.fetch(1, timeout=2)
        await bridge.denied(bridge.nc.publish(msg.reply, b"+ACK"), msg.reply)
        await bridge.denied(bridge.nc.subscribe(c.JOBS_SUBJECTS), c.JOBS_SUBJECTS)

    async def test_worker_cannot_queue_jobs(
        self,
        role_broker: Callable[[str], Awaitable[Broker]],
        connect: Callable[[str], Awaitable[Session]],
    ) -> None:
        """A worker may not publish to archive.jobs.> nor listen to it."""
        await (await role_broker("cli")).ensure_topology()
        worker = await connect("worker")
        subject = c.job_subject("quiz_archiver")
        await worker.denied(worker.js.publish(subject, b"{}"), subject)
        await worker.denied(worker.nc.subscribe(c.JOBS_SUBJECTS), c.JOBS_SUBJECTS)

    @pytest.mark.parametrize("user", ["bridge", "worker"])
    async def test_roles_cannot_destroy(
        self,
        user: str,
        role_broker: Callable[[str], Awaitable[Broker]],
        connect: Callable[[str], Awaitable[Session]],
    ) -> None:
        """Neither role may delete or purge a stream, the consumer or a message."""
        cli = await role_broker("cli")
        await cli.ensure_topology()
        await _queue_job(cli)
        session = await connect(user)
        js = session.js
        jobs, workers = c.JOBS_STREAM, c.WORKERS_CONSUMER
        attempts: list[tuple[Awaitable[object], str]] = [
            (js.delete_stream(jobs), f"$JS.API.STREAM.DELETE.{jobs}"),
            (js.purge_stream(jobs), f"$JS.API.STREAM.PURGE.{jobs}"),
            (
                js.delete_consumer(jobs, workers),
                f"$JS.API.CONSUMER.DELETE.{jobs}.{workers}",
            ),
            (js.delete_msg(jobs, 1), f"$JS.API.STREAM.MSG.DELETE.{jobs}"),
            (
                js.delete_stream(c.STATUS_STREAM),
                f"$JS.API.STREAM.DELETE.{c.STATUS_STREAM}",
            ),
        ]
        for action, subject in attempts:
            await session.denied(action, subject)
        info = await cli.js.stream_info(c.JOBS_STREAM)
        assert info.state.messages == 1

    async def test_cli_manages_everything(
        self, role_broker: Callable[[str], Awaitable[Broker]]
    ) -> None:
        """The operator creates, reads, purges and deletes streams."""
        cli = await role_broker("cli")
        await cli.ensure_topology()
        await _queue_job(cli)
        assert len((await cli.queue_state()).waiting) == 1
        await cli.js.purge_stream(c.JOBS_STREAM)
        assert await cli.js.delete_stream(c.DLQ_STREAM)

    async def test_system_user_monitors_servers(
        self, nats_single: ConfiguredNats
    ) -> None:
        """The sys user of the system account gets answers on $SYS."""
        nc = Client()
        await nc.connect(
            nats_single.url,
            user="sys",
            password=_password("sys"),
            allow_reconnect=False,
        )
        try:
            reply = await nc.request("$SYS.REQ.SERVER.PING", b"", timeout=2)
            assert msgspec.json.decode(reply.data)["server"]["name"] == "archive-nats"
        finally:
            await nc.close()

    async def test_wrong_password_is_refused(self, nats_single: ConfiguredNats) -> None:
        """A role's user name with another role's password does not connect."""
        nc = Client()
        with pytest.raises(NatsError, match="Authorization Violation"):
            await nc.connect(
                nats_single.url,
                user="cli",
                password=_password("bridge"),
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
        await nc.close()


def _stored_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


class TestEncryptionAtRest:
    async def test_token_is_not_stored_in_clear(
        self, tmp_path: Path, make_settings: Callable[..., Settings]
    ) -> None:
        """With single.conf a job's Moodle token is not readable in the store."""
        # The control: the embedded server has no cipher, the token is on disk.
        async with EmbeddedNats(tmp_path / "plain", port=0) as plain:
            assert plain.url
            broker = await Broker.connect(
                make_settings(nats_url=plain.url), url=plain.url, name="test"
            )
            await broker.ensure_topology()
            await _queue_job(broker)
            await broker.close()
        assert SECRET_TOKEN.encode() in _stored_bytes(tmp_path / "plain")

        async with ConfiguredNats(
            DEPLOY / "nats" / "single.conf", tmp_path / "encrypted"
        ) as server:
            settings = make_settings(
                nats_url=server.url, nats_user="cli", nats_password=_password("cli")
            )
            broker = await Broker.connect(settings, url=server.url, name="test")
            await broker.ensure_topology()
            await _queue_job(broker)
            await broker.close()
        stored = _stored_bytes(tmp_path / "encrypted")
        assert len(stored) > 0
        assert SECRET_TOKEN.encode() not in stored


# --- compose ------------------------------------------------------------------

#: Environment names the service reads (anything else would be ignored).
SERVICE_ENV_NAMES = {env_name(f) for f in FIELD_NAMES} | {"NATS_URL"}


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _env_references(*configs: Path) -> set[str]:
    """The ``$NAME`` environment references of NATS config files."""
    text = "\n".join(
        line.split("#", 1)[0] for p in configs for line in p.read_text().splitlines()
    )
    return set(re.findall(r"(?<![\w\"])\$([A-Z][A-Z0-9_]*)\b", text))


def _service_settings(env: dict[str, str]) -> Settings:
    """Validate an environment as the service would read it."""
    unknown = set(env) - SERVICE_ENV_NAMES
    assert not unknown, f"not settings of the service: {sorted(unknown)}"
    return load_settings(environ=env)


class TestCompose:
    def test_services_wait_for_a_healthy_nats(self) -> None:
        """bridge and worker start once NATS is healthy, and have health checks."""
        services = _load_yaml(DEPLOY / "compose.yaml")["services"]
        assert set(services) == {"nats", "bridge", "worker"}
        for name in ("bridge", "worker"):
            assert services[name]["depends_on"] == {
                "nats": {"condition": "service_healthy"}
            }
            assert services[name]["command"] == [name]
        for service in services.values():
            assert service["healthcheck"]["test"][0] == "CMD"
        assert services["worker"]["deploy"]["replicas"] == 2
        assert services["bridge"]["ports"] == ["${ARCHIVE_WORKER_PUBLISH:-8080}:8080"]

    def test_nats_gets_every_secret_its_config_reads(self) -> None:
        """The nats service mounts deploy/nats and sets each $VAR single.conf needs."""
        nats = _load_yaml(DEPLOY / "compose.yaml")["services"]["nats"]
        assert "./nats:/etc/nats:ro" in nats["volumes"]
        assert nats["command"] == ["--config", "/etc/nats/single.conf"]
        needed = _env_references(
            DEPLOY / "nats" / "single.conf", DEPLOY / "nats" / "accounts.conf"
        )
        assert needed == set(nats["environment"])

    @pytest.mark.parametrize("role", ["bridge", "worker"])
    def test_roles_log_in_as_their_own_user(self, role: str) -> None:
        """Each role's settings are valid and name its own NATS user and password."""
        service = _load_yaml(DEPLOY / "compose.yaml")["services"][role]
        env = {k: str(v) for k, v in service["environment"].items()}
        assert env["ARCHIVE_WORKER_NATS_USER"] == role
        assert env["ARCHIVE_WORKER_NATS_PASSWORD"].startswith(
            "${" + role.upper() + "_PASSWORD:?"
        )
        settings = _service_settings(env)
        assert settings.nats_url == "nats://nats:4222"

    def test_gen_env_writes_every_secret(self, tmp_path: Path) -> None:
        """deploy/gen-env writes each secret the NATS configs read, once."""
        out = tmp_path / ".env"
        subprocess.run([DEPLOY / "gen-env", out], check=True, capture_output=True)
        values = dict(
            line.split("=", 1)
            for line in out.read_text().splitlines()
            if line and not line.startswith("#")
        )
        assert set(values) == set(NATS_SECRETS)
        assert len(set(values.values())) == len(values)
        again = subprocess.run([DEPLOY / "gen-env", out], capture_output=True)
        assert again.returncode != 0
        # The generated values must be accepted by nats-server as they are.
        result = subprocess.run(
            [find_nats_server(), "-t", "-c", str(DEPLOY / "nats" / "cluster-1.conf")],
            env={"PATH": os.environ.get("PATH", ""), "NATS_STORE_DIR": "/x", **values},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr

    def test_single_container_keeps_its_data(self) -> None:
        """compose.single.yaml runs `up` with the data folder on a volume."""
        services = _load_yaml(DEPLOY / "compose.single.yaml")["services"]
        (service,) = services.values()
        assert service["command"] == ["up"]
        assert "archive-worker-data:/var/lib/archive-worker" in service["volumes"]
        _service_settings({k: str(v) for k, v in service["environment"].items()})


# --- Kubernetes ------------------------------------------------------------------

#: The Kubernetes version whose API schemas the manifests are checked against.
KUBERNETES_VERSION = "1.30.0"

#: What we use of KEDA's ScaledObject (keda.sh/v1alpha1), which is a CRD and
#: so not among the core API schemas.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "nats-jetstream"},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": [
                                    "natsServerMonitoringEndpoint",
                                    "account",
                                    "stream",
                                    "consumer",
                                    "lagThreshold",
                                ],
                                "properties": {
                                    "natsServerMonitoringEndpoint": {"type": "string"},
                                    "account": {"type": "string"},
                                    "stream": {"type": "string"},
                                    "consumer": {"type": "string"},
                                    "lagThreshold": {
                                        "type": "string",
                                        "pattern": "^[0-9]+$",
                                    },
                                    "activationLagThreshold": {
                                        "type": "string",
                                        "pattern": "^[0-9]+$",
                                    },
                                    "useHttps": {"enum": ["true", "false"]},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict[str, Any]]:
    """deploy/kubernetes rendered by `kubectl kustomize`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl not found: scripts/install-system-deps installs it "
            "(Debian package kubernetes-client)"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes")],
        capture_output=True,
        text=True,
        check=True,
    )
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [
        o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
    ]
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


class TestKubernetes:
    def test_objects_match_the_api_schemas(
        self, k8s_objects: list[dict[str, Any]]
    ) -> None:
        """Every object passes the Kubernetes API schema (strict), KEDA's its own."""
        import jsonschema
        import kubernetes_validate

        kinds = []
        for obj in k8s_objects:
            kinds.append(obj["kind"])
            if obj["apiVersion"].startswith("keda.sh/"):
                jsonschema.validate(obj, SCALED_OBJECT_SCHEMA)
            else:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            assert obj["metadata"].get("namespace", "archive-worker") == (
                "archive-worker"
            )
        assert sorted(kinds) == sorted(
            [
                "Namespace",
                "ConfigMap",
                "Secret",
                "Deployment",
                "Deployment",
                "Service",
                "PodDisruptionBudget",
                "PodDisruptionBudget",
                "ScaledObject",
            ]
        )

    def test_strict_validation_rejects_a_misspelt_field(
        self, k8s_objects: list[dict[str, Any]]
    ) -> None:
        """The control: a typo in a Deployment fails the schema check."""
        import kubernetes_validate

        broken = _find(k8s_objects, "Deployment", "archive-worker")
        broken = {**broken, "spec": {**broken["spec"], "replica": 2}}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)

    def test_config_map_holds_valid_settings(
        self, k8s_objects: list[dict[str, Any]]
    ) -> None:
        """Every ConfigMap key is a setting of the service and its value is valid."""
        data = _find(k8s_objects, "ConfigMap", "archive-worker-config")["data"]
        settings = _service_settings(data)
        assert settings.stream_replicas == 3

    def test_worker_has_time_to_drain(self, k8s_objects: list[dict[str, Any]]) -> None:
        """The grace period covers the drain with a margin of at least 15 s."""
        data = _find(k8s_objects, "ConfigMap", "archive-worker-config")["data"]
        drain_s = _service_settings(data).drain_grace_s
        worker = _find(k8s_objects, "Deployment", "archive-worker")
        grace_s = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace_s >= drain_s + 15

    def test_roles_use_their_own_credentials(
        self, k8s_objects: list[dict[str, Any]]
    ) -> None:
        """Each Deployment logs in as its role, with a key present in the Secret."""
        secret = _find(k8s_objects, "Secret", "archive-worker-nats")
        for name, role in (("archive-bridge", "bridge"), ("archive-worker", "worker")):
            container = _container(_find(k8s_objects, "Deployment", name))
            assert container["args"] == [role]
            env = {e["name"]: e for e in container["env"]}
            assert env["ARCHIVE_WORKER_NATS_USER"]["value"] == role
            ref = env["ARCHIVE_WORKER_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] == f"{role}-password"
            assert ref["key"] in secret["stringData"]
            assert container["resources"]["requests"]

    def test_bridge_is_probed_and_served(
        self, k8s_objects: list[dict[str, Any]]
    ) -> None:
        """The Service and the probes reach the bridge's port 8080."""
        bridge = _find(k8s_objects, "Deployment", "archive-bridge")
        labels = bridge["spec"]["template"]["metadata"]["labels"]
        container = _container(bridge)
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        (http,) = [p for p in container["ports"] if p["name"] == "http"]
        assert http["containerPort"] == Settings().port
        service = _find(k8s_objects, "Service", "archive-bridge")
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["port"] == 8080

    def test_disruption_budgets_select_the_pods(
        self, k8s_objects: list[dict[str, Any]]
    ) -> None:
        """Each PodDisruptionBudget selects the pods of its Deployment."""
        for name in ("archive-bridge", "archive-worker"):
            pods = _find(k8s_objects, "Deployment", name)["spec"]["template"]
            budget = _find(k8s_objects, "PodDisruptionBudget", name)
            selector = budget["spec"]["selector"]["matchLabels"]
            assert selector.items() <= pods["metadata"]["labels"].items()

    def test_keda_scales_workers_on_the_jobs_consumer(
        self, k8s_objects: list[dict[str, Any]]
    ) -> None:
        """The ScaledObject targets the workers and names our stream and consumer."""
        scaled = _find(k8s_objects, "ScaledObject", "archive-worker")
        assert scaled["spec"]["scaleTargetRef"]["name"] == "archive-worker"
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["metadata"]["stream"] == c.JOBS_STREAM
        assert trigger["metadata"]["consumer"] == c.WORKERS_CONSUMER
        accounts = (DEPLOY / "nats" / "accounts.conf").read_text()
        assert re.search(rf"^\s+{trigger['metadata']['account']} \{{", accounts, re.M)
