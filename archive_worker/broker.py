"""The NATS adapter: connection, JetStream topology, and the operations on it.

This is the only module (with ``embedded``) that touches nats-py; NATS errors
become :class:`~archive_worker.errors.BrokerError` here.  Bridge, worker and
CLI all talk to JetStream through :class:`Broker`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import (
    APIError,
    NoStreamResponseError,
    NotFoundError,
    ObjectNotFoundError,
    ServiceUnavailableError,
)
from nats.js.object_store import (
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)

from . import constants as c
from .config import Settings
from .embedded import EmbeddedNats
from .errors import BrokerError, BrokerUnavailable, QueueFull
from .events import StatusEvent, decode_event, encode_event
from .jobs import JobSpec, encode_job

log = logging.getLogger(__name__)

#: JetStream error code for "maximum messages exceeded" with discard-new.
_ERR_MAX_MSGS = 10077
#: ... and for "maximum bytes exceeded".
_ERR_MAX_BYTES = 10078
#: ... and for "wrong last sequence" (an expected-sequence header failed).
_ERR_WRONG_LAST_SEQ = 10071
_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
#: A job message is small (a few KiB); this bounds the stream's bytes too.
_MAX_JOB_MSG_BYTES = 1_048_576
#: Longest a closing connection waits for its subscriptions to drain
#: (nats-py's default is 30 s, which a shutdown should not spend).
_DRAIN_TIMEOUT_S = 5
#: Timeout of JetStream API requests.
_API_TIMEOUT_S = 5.0
#: How long a publish keeps trying while its stream has no leader.  In a
#: cluster, a crashed stream leader is replaced after nats-server's Raft
#: election timeout (4-9 s); until then a publish finds no responder, gets a
#: 503 or times out.
_PUBLISH_RETRY_S = 12.0
#: First pause between publish attempts; it doubles up to the maximum.
_PUBLISH_PAUSE_S = 0.25
_PUBLISH_PAUSE_MAX_S = 2.0
#: What a publish sees while its stream elects a leader.
_ELECTION_ERRORS = (NoStreamResponseError, ServiceUnavailableError, TimeoutError)
_LIMIT_ERRORS = frozenset({_ERR_MAX_MSGS, _ERR_MAX_BYTES})
#: The stream behind the checkpoint object store (nats-py's naming).
_CHECKPOINT_STREAM = OBJ_STREAM_TEMPLATE.format(bucket=c.CHECKPOINT_BUCKET)


@dataclass
class QueueState:
    """What the jobs stream and the workers' consumer say right now.

    Attributes:
        waiting: job ids not yet delivered to any worker, oldest first.
        processing: job ids delivered and not yet acknowledged.
        limit: how many unfinished jobs the stream accepts.
        redelivered: messages being delivered more than once.
        oldest_waiting_ts: Unix time the oldest waiting job was queued.
    """

    waiting: list[str] = field(default_factory=list)
    processing: list[str] = field(default_factory=list)
    limit: int = 0
    redelivered: int = 0
    oldest_waiting_ts: float | None = None


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=settings.nats_tls_ca)
    if settings.nats_tls_cert:
        ctx.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)

    return ctx


class Broker:
    """A connection to NATS with JetStream, and the service's operations on it.

    Create with :meth:`connect` (or :func:`open_broker`, which also starts an
    embedded server when no URL is configured); close with :meth:`close`.
    nats-py reconnects on its own; :attr:`connected` follows the connection.
    """

    def __init__(self, nc: Client, settings: Settings) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=_API_TIMEOUT_S)
        self.settings = settings
        self._checkpoints: ObjectStore | None = None

    @classmethod
    async def connect(cls, settings: Settings, *, url: str, name: str) -> Broker:
        """Connect to the servers in ``url`` (comma-separated).

        Raises:
            BrokerUnavailable: no server answered within the connect timeout.
        """

        async def on_disconnect() -> None:
            if not (nc.is_closed or nc.is_draining):
                log.warning("nats.disconnected")

        async def on_reconnect() -> None:
            log.info("nats.reconnected url=%s", _url(nc))

        async def on_error(exc: Exception) -> None:
            log.warning("nats.error error=%s", exc)

        nc = Client()
        try:
            await nc.connect(
                servers=[u.strip() for u in url.split(",") if u.strip()],
                name=name,
                user=settings.nats_user,
                password=settings.nats_password,
                token=settings.nats_token,
                user_credentials=settings.nats_creds,
                tls=_ssl_context(settings),
                connect_timeout=max(1, round(settings.nats_connect_timeout_s)),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                drain_timeout=_DRAIN_TIMEOUT_S,
                reconnect_time_wait=1,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
            )
        except (NatsError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot connect to NATS at {url}: {exc}") from exc
        log.info("nats.connected url=%s", _url(nc))

        return cls(nc, settings)

    @property
    def url(self) -> str:
        """The server this client is connected to."""
        return _url(self.nc)

    @property
    def connected(self) -> bool:
        """True while the client has a live server connection."""
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        """Flush and close the connection."""
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except (NatsError, TimeoutError) as exc:
            # A subscription that cannot drain must not hold up shutdown.
            log.warning("nats.drain_failed error=%s", exc)
            with contextlib.suppress(NatsError, TimeoutError):
                await self.nc.close()

    # --- topology -------------------------------------------------------------

    def stream_configs(self) -> list[js_api.StreamConfig]:
        """The desired configuration of every stream."""
        s = self.settings
        return [
            js_api.StreamConfig(
                name=c.JOBS_STREAM,
                description="Archive jobs waiting for or held by a worker",
                subjects=[c.JOBS_SUBJECTS],
                retention=js_api.RetentionPolicy.WORK_QUEUE,
                storage=js_api.StorageType.FILE,
                max_msgs=s.queue_size,
                max_bytes=s.queue_size * _MAX_JOB_MSG_BYTES,
                max_msg_size=_MAX_JOB_MSG_BYTES,
                discard=js_api.DiscardPolicy.NEW,
                duplicate_window=s.duplicate_window_s,
                max_age=s.job_max_age_s,
                num_replicas=s.stream_replicas,
                allow_direct=True,
            ),
            js_api.StreamConfig(
                name=c.STATUS_STREAM,
                description="Status events of archive jobs",
                subjects=[c.STATUS_SUBJECTS],
                retention=js_api.RetentionPolicy.LIMITS,
                storage=js_api.StorageType.FILE,
                max_age=s.status_retention_s,
                max_msgs_per_subject=s.status_max_events_per_job,
                discard=js_api.DiscardPolicy.OLD,
                num_replicas=s.stream_replicas,
                allow_direct=True,
            ),
            js_api.StreamConfig(
                name=c.DLQ_STREAM,
                description="Jobs that exhausted their deliveries, without token",
                subjects=[c.DLQ_SUBJECTS],
                retention=js_api.RetentionPolicy.LIMITS,
                storage=js_api.StorageType.FILE,
                max_age=s.status_retention_s,
                max_msgs_per_subject=1,
                num_replicas=s.stream_replicas,
                allow_direct=True,
            ),
        ]

    def consumer_config(self) -> js_api.ConsumerConfig:
        """The desired configuration of the workers' durable consumer."""
        s = self.settings
        return js_api.ConsumerConfig(
            durable_name=c.WORKERS_CONSUMER,
            description="Shared by all archive workers",
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=s.ack_wait_s,
            # +1: the last delivery only reports FAILED and dead-letters the job.
            max_deliver=s.max_deliver + 1,
            max_ack_pending=-1,
            max_waiting=512,
            filter_subject=c.JOBS_SUBJECTS,
            num_replicas=s.stream_replicas,
        )

    async def ensure_topology(self) -> None:
        """Create or update the streams and the consumer; safe to repeat.

        Raises:
            BrokerError: JetStream refused a configuration.
        """
        try:
            for config in self.stream_configs():
                try:
                    await self.js.stream_info(config.name or "")
                except NotFoundError:
                    await self.js.add_stream(config)
                    log.info("stream.created name=%s", config.name)
                else:
                    await self.js.update_stream(config)
            await self.js.add_consumer(c.JOBS_STREAM, self.consumer_config())
        except APIError as exc:
            raise BrokerError(f"JetStream refused the topology: {exc}") from exc
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"JetStream not available: {exc}") from exc

    async def _ensure_checkpoint_bucket(self) -> None:
        """Open the checkpoint object store, creating it if it is missing.

        Called on first use, not by :meth:`ensure_topology`: only workers use
        checkpoints, and the bridge's user may not touch the bucket.

        Its TTL is the jobs stream's ``max_age``: a checkpoint cannot outlive
        the job message it belongs to, so whatever a crash leaves behind is
        gone by the time its job could not be redelivered anyway.
        """
        s = self.settings
        try:
            self._checkpoints = await self.js.object_store(c.CHECKPOINT_BUCKET)
        except NotFoundError:
            self._checkpoints = await self.js.create_object_store(
                c.CHECKPOINT_BUCKET,
                config=js_api.ObjectStoreConfig(
                    description="Rendered items of running archive jobs",
                    ttl=s.job_max_age_s,
                    storage=js_api.StorageType.FILE,
                    replicas=s.stream_replicas,
                ),
            )
            log.info("object_store.created name=%s", c.CHECKPOINT_BUCKET)

    async def topology_present(self) -> bool:
        """True when every stream and the consumer exist (for readiness)."""
        try:
            for config in self.stream_configs():
                await self.js.stream_info(config.name or "")
            await self.js.consumer_info(c.JOBS_STREAM, c.WORKERS_CONSUMER)
        except (NatsError, TimeoutError):
            return False

        return True

    # --- jobs -----------------------------------------------------------------

    async def publish_job(
        self, spec: JobSpec, *, msg_id: str, headers: dict[str, str] | None = None
    ) -> bool:
        """Queue a job.

        Returns:
            True if the job is new, False if JetStream recognised it as a
            duplicate of a job already accepted within the duplicate window.

        Raises:
            QueueFull: the jobs stream is at its limit.
            BrokerUnavailable: JetStream did not answer.
        """
        hdrs = {
            c.MSG_ID_HEADER: msg_id,
            c.JOB_ID_HEADER: spec.job_id,
            c.FLAVOUR_HEADER: spec.flavour.value,
            **(headers or {}),
        }
        try:
            ack = await self._publish(
                c.job_subject(spec.flavour.value),
                encode_job(spec),
                stream=c.JOBS_STREAM,
                headers=hdrs,
            )
        except APIError as exc:
            if exc.err_code in (_ERR_MAX_MSGS, _ERR_MAX_BYTES):
                raise QueueFull("maximum number of queued jobs exceeded") from exc
            raise BrokerError(f"JetStream refused the job: {exc.description}") from exc
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"JetStream did not take the job: {exc}") from exc

        return not ack.duplicate

    async def queue_depth(self) -> int:
        """Unfinished jobs in the jobs stream (one cheap request)."""
        try:
            stream = await self.js.stream_info(c.JOBS_STREAM)
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"JetStream did not answer: {exc}") from exc

        return int(stream.state.messages)

    async def queue_state(self) -> QueueState:
        """Read waiting and in-flight jobs from the jobs stream and consumer.

        A work-queue stream holds exactly the unfinished jobs; those the
        consumer has delivered are in flight, the rest wait.  The stream is
        bounded by ``queue_size``, so this reads at most that many headers.
        """
        try:
            stream = await self.js.stream_info(c.JOBS_STREAM)
            consumer = await self.js.consumer_info(c.JOBS_STREAM, c.WORKERS_CONSUMER)
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"JetStream did not answer: {exc}") from exc
        delivered_seq = consumer.delivered.stream_seq if consumer.delivered else 0
        state = QueueState(
            limit=self.settings.queue_size,
            redelivered=consumer.num_redelivered or 0,
        )
        remaining = stream.state.messages
        seq = stream.state.first_seq
        while remaining > 0:
            try:
                msg = await self.js.get_msg(
                    c.JOBS_STREAM,
                    seq=seq,
                    subject=c.JOBS_SUBJECTS,
                    next=True,
                    direct=True,
                )
            except NotFoundError:
                break
            except (NatsError, TimeoutError) as exc:
                raise BrokerUnavailable(f"JetStream did not answer: {exc}") from exc
            job_id = (msg.headers or {}).get(c.JOB_ID_HEADER, "")
            if msg.seq is not None and msg.seq <= delivered_seq:
                state.processing.append(job_id)
            else:
                state.waiting.append(job_id)
                if state.oldest_waiting_ts is None and msg.time is not None:
                    state.oldest_waiting_ts = msg.time.timestamp()
            seq = (msg.seq or seq) + 1
            remaining -= 1

        return state

    # --- checkpoints --------------------------------------------------------------

    async def put_checkpoint(self, name: str, data: bytes) -> None:
        """Store (or replace) one object in the checkpoint bucket.

        Raises:
            BrokerUnavailable: JetStream did not store it.
        """
        try:
            store = await self._checkpoint_store()
            await store.put(name, data)
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"checkpoint {name} not stored: {exc}") from exc

    async def get_checkpoint(self, name: str) -> bytes | None:
        """One object of the checkpoint bucket, or None if there is none.

        Raises:
            BrokerUnavailable: JetStream did not answer.
        """
        try:
            store = await self._checkpoint_store()
            result = await store.get(name)
        except ObjectNotFoundError:
            return None
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"checkpoint {name} not read: {exc}") from exc

        return bytes(result.data or b"")

    async def delete_checkpoint(self, name: str) -> bool:
        """Remove one object, its metadata and its chunks, from the bucket.

        nats-py's ``delete`` writes a "deleted" marker that stays until the
        TTL; purging both subjects instead leaves nothing of the job behind.
        The metadata goes first, so a reader never sees a half-removed object.

        Returns:
            False if there was no such object.

        Raises:
            BrokerUnavailable: JetStream did not answer.
        """
        try:
            store = await self._checkpoint_store()
            try:
                info = await store.get_info(name)
            except ObjectNotFoundError:
                return False
            encoded = base64.urlsafe_b64encode(name.encode()).decode()
            for subject in (
                OBJ_META_PRE_TEMPLATE.format(bucket=c.CHECKPOINT_BUCKET, obj=encoded),
                OBJ_CHUNKS_PRE_TEMPLATE.format(
                    bucket=c.CHECKPOINT_BUCKET, obj=info.nuid
                ),
            ):
                await self.js.purge_stream(_CHECKPOINT_STREAM, subject=subject)
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"checkpoint {name} not deleted: {exc}") from exc

        return True

    async def _checkpoint_store(self) -> ObjectStore:
        if self._checkpoints is None:
            await self._ensure_checkpoint_bucket()
        assert self._checkpoints is not None
        return self._checkpoints

    # --- status events ----------------------------------------------------------

    async def publish_event(
        self, event: StatusEvent, *, only_if_first: bool = False
    ) -> bool:
        """Append a status event to the job's subject.

        Args:
            event: the event.
            only_if_first: store it only if the job has no event yet.  The
                bridge's AWAITING_PROCESSING goes out after the job, so a fast
                worker may already have written RUNNING; this keeps the
                job's history from going backwards.

        Returns:
            False if ``only_if_first`` was set and the job already had events.

        Raises:
            BrokerUnavailable: JetStream did not store the event.
        """
        # A message id makes a retried publish idempotent (see _publish).
        headers = {c.MSG_ID_HEADER: uuid.uuid4().hex}
        if only_if_first:
            headers[_EXPECTED_LAST_SUBJECT_SEQ] = "0"
        try:
            await self._publish(
                c.status_subject(event.job_id),
                encode_event(event),
                stream=c.STATUS_STREAM,
                headers=headers,
            )
        except APIError as exc:
            if only_if_first and exc.err_code == _ERR_WRONG_LAST_SEQ:
                return False
            raise BrokerUnavailable(f"status event not stored: {exc}") from exc
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"status event not stored: {exc}") from exc

        return True

    async def publish_dead_letter(self, job_id: str, payload: bytes) -> None:
        """Keep a failed job (already stripped of its token) for operators."""
        try:
            await self._publish(
                c.dlq_subject(job_id),
                payload,
                stream=c.DLQ_STREAM,
                headers={c.MSG_ID_HEADER: uuid.uuid4().hex},
            )
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"dead letter not stored: {exc}") from exc

    async def _publish(
        self, subject: str, payload: bytes, *, stream: str, headers: dict[str, str]
    ) -> js_api.PubAck:
        """Publish to JetStream, retrying while the stream has no leader.

        Only what a leader election causes is retried (no responder, 503, a
        timeout), with a growing pause, for at most ``_PUBLISH_RETRY_S``.
        ``headers`` must carry a ``Nats-Msg-Id``: a message that was stored
        but whose acknowledgement was lost is then dropped as a duplicate.

        Raises:
            NatsError, TimeoutError: the last error once the time is up, or
                any other error at once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _PUBLISH_RETRY_S
        pause = _PUBLISH_PAUSE_S
        attempt = 1
        while True:
            try:
                return await self.js.publish(
                    subject, payload, stream=stream, headers=dict(headers)
                )
            except _ELECTION_ERRORS as exc:
                # A full stream also answers 503: that is final, not an election.
                full = isinstance(exc, APIError) and exc.err_code in _LIMIT_ERRORS
                if full or loop.time() + pause > deadline:
                    raise
                log.warning(
                    "publish.retry subject=%s attempt=%d error=%s",
                    subject,
                    attempt,
                    exc,
                )
            await asyncio.sleep(pause)
            pause = min(2 * pause, _PUBLISH_PAUSE_MAX_S)
            attempt += 1

    async def request_cancel(self, job_id: str, *, timeout_s: float = 2.0) -> bool:
        """Ask the worker holding ``job_id`` to cancel it.

        Returns:
            True if a worker answered (it held the job or saw the request).
        """
        try:
            await self.nc.request(c.cancel_subject(job_id), b"", timeout=timeout_s)
        except (NatsError, TimeoutError):
            return False

        return True

    @contextlib.asynccontextmanager
    async def follow_events(
        self, job_id: str | None = None, *, history: bool = True
    ) -> AsyncIterator[AsyncIterator[StatusEvent]]:
        """Status events of one job (or all jobs), as they are stored.

        Uses an ordered ephemeral consumer, so it sees every event of the
        subject from the start (``history``) or from now on, in order, and
        survives reconnects.  Yields an async iterator; leaving the context
        removes the consumer.
        """
        subject = c.status_subject(job_id) if job_id else c.STATUS_SUBJECTS
        policy = js_api.DeliverPolicy.ALL if history else js_api.DeliverPolicy.NEW
        try:
            sub = await self.js.subscribe(
                subject,
                ordered_consumer=True,
                deliver_policy=policy,
                stream=c.STATUS_STREAM,
            )
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot follow status events: {exc}") from exc

        async def events() -> AsyncIterator[StatusEvent]:
            async for msg in sub.messages:
                try:
                    yield decode_event(msg.data)
                except msgspec.ValidationError:
                    log.warning("status_event.undecodable subject=%s", msg.subject)

        try:
            yield events()
        finally:
            with contextlib.suppress(NatsError, TimeoutError):
                await sub.unsubscribe()

    async def last_event(self, job_id: str) -> StatusEvent | None:
        """The newest status event of a job, or None if there is none."""
        try:
            msg = await self.js.get_last_msg(
                c.STATUS_STREAM, c.status_subject(job_id), direct=True
            )
        except NotFoundError:
            return None
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"JetStream did not answer: {exc}") from exc
        try:
            return decode_event(msg.data or b"")
        except msgspec.ValidationError:
            log.warning("status_event.undecodable job_id=%s", job_id)
            return None


_LOOPBACK = "127.0.0.1"


async def _listening(host: str, port: int) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()

    return True


def _url(nc: Client) -> str:
    url = nc.connected_url
    return url.geturl() if url is not None else "-"


@contextlib.asynccontextmanager
async def open_broker(settings: Settings, *, name: str) -> AsyncIterator[Broker]:
    """Connect to NATS, starting an embedded server if no URL is configured.

    Without ``nats_url``, a server already listening on the embedded port of
    this machine (another ``archive-worker`` process's embedded server) is
    used; otherwise this process starts one.  So ``archive-worker bridge``
    and ``archive-worker worker`` started side by side share one server.
    The streams and the consumer are created or updated before this yields;
    on exit the connection is drained and an embedded server stopped.
    """
    async with contextlib.AsyncExitStack() as stack:
        url = settings.nats_url
        port = settings.embedded_nats_port
        if not url and port and await _listening(_LOOPBACK, port):
            url = f"nats://{_LOOPBACK}:{port}"
            log.info("embedded_nats.shared url=%s", url)
        if not url:
            server = EmbeddedNats(f"{settings.data_dir}/nats", port=port)
            await stack.enter_async_context(server)
            url = server.url
            assert url is not None
        broker = await Broker.connect(settings, url=url, name=name)
        stack.push_async_callback(broker.close)
        await broker.ensure_topology()
        yield broker
