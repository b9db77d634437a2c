"""The worker's side of the jobs stream: fetching, leases and acknowledgements.

A :class:`Delivery` is one job message lent to this worker.  Its ack wait is
a short lease; :meth:`Delivery.extend` renews it while the job runs, so a
worker that dies loses its jobs back to the queue within about one lease.
nats-py errors are translated to :class:`~archive_worker.errors.BrokerError`
here, like in :mod:`archive_worker.broker`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from . import constants as c
from .broker import Broker
from .errors import BrokerUnavailable

log = logging.getLogger(__name__)

#: How long a final acknowledgement is tried before giving up; the lease
#: then runs out and the job comes back, which the worker recognises from its
#: terminal status event and acknowledges without work.  The time covers a
#: consumer leader election in a cluster (nats-server's Raft election timeout
#: is 4-9 s), during which an ack finds no responder at once.
_ACK_RETRY_S = 12.0
#: First pause between attempts; it doubles up to the maximum.
_ACK_PAUSE_S = 0.25
_ACK_PAUSE_MAX_S = 2.0
_ACK_TIMEOUT_S = 2.0


class Delivery:
    """One job message held by this worker."""

    def __init__(self, msg: Msg, nc: Client) -> None:
        self._msg = msg
        self._nc = nc
        meta = msg.metadata
        self.data: bytes = msg.data
        self.headers: dict[str, str] = dict(msg.headers or {})
        self.num_delivered: int = meta.num_delivered
        self.stream_seq: int = meta.sequence.stream
        self.queued_at: float = time.time()
        if meta.timestamp is not None:
            self.queued_at = meta.timestamp.timestamp()

    @property
    def job_id(self) -> str:
        """The job id from the message header ('' if missing)."""
        return self.headers.get(c.JOB_ID_HEADER, "")

    def adopt(self, newer: Delivery) -> None:
        """Continue under a redelivery of the same message.

        When a lease runs out while this worker still works on the job (NATS
        was away longer than the ack wait), JetStream hands the message out
        again, possibly to this very worker.  The running job then carries
        on under the new delivery: its acks and lease renewals go to the new
        reply subject, and no second run starts.
        """
        self._msg = newer._msg
        self.num_delivered = newer.num_delivered

    async def extend(self) -> None:
        """Renew the lease (``+WPI``); errors are logged, not raised."""
        try:
            await self._msg.in_progress()
        except (NatsError, TimeoutError) as exc:
            log.warning("lease.extend_failed job_id=%s error=%s", self.job_id, exc)

    async def ack(self) -> None:
        """Acknowledge for good; the message leaves the work queue."""
        await self._confirmed(self._msg.ack_sync, "ack")

    async def term(self) -> None:
        """Stop redelivery; the job failed for good."""
        # +TERM is fire-and-forget in the protocol; term() then a flush makes
        # sure it left this process before the lease matters again.
        await self._confirmed(self._term_and_flush, "term")

    async def nak(self, delay_s: float = 0.0) -> None:
        """Hand the job back for redelivery after ``delay_s`` seconds."""
        try:
            await self._msg.nak(delay=delay_s or None)
        except (NatsError, TimeoutError) as exc:
            log.warning("lease.nak_failed job_id=%s error=%s", self.job_id, exc)

    async def _term_and_flush(self) -> None:
        await self._msg.term()
        await self._nc.flush(timeout=int(_ACK_TIMEOUT_S))

    async def _confirmed(
        self, action: Callable[[], Awaitable[object]], name: str
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ACK_RETRY_S
        pause = _ACK_PAUSE_S
        attempt = 1
        while True:
            try:
                await asyncio.shield(action())
                return
            except (NatsError, TimeoutError) as exc:
                log.warning(
                    "lease.%s_failed job_id=%s attempt=%d error=%s",
                    name,
                    self.job_id,
                    attempt,
                    exc,
                )
            if loop.time() + pause > deadline:
                break
            await asyncio.sleep(pause)
            pause = min(2 * pause, _ACK_PAUSE_MAX_S)
            attempt += 1
        log.error("lease.%s_gave_up job_id=%s", name, self.job_id)


class JobQueue:
    """Pull access to the shared workers' consumer."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._sub: JetStreamContext.PullSubscription | None = None

    async def open(self) -> None:
        """Bind to the durable consumer (created by ``ensure_topology``)."""
        try:
            self._sub = await self._broker.js.pull_subscribe_bind(
                durable=c.WORKERS_CONSUMER, stream=c.JOBS_STREAM
            )
        except (NatsError, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot bind to the jobs consumer: {exc}") from exc

    async def fetch(self, count: int, *, timeout_s: float) -> list[Delivery]:
        """Take up to ``count`` jobs, waiting at most ``timeout_s`` for any.

        An empty queue is normal and returns an empty list.
        """
        assert self._sub is not None, "open() first"
        try:
            msgs = await self._sub.fetch(batch=count, timeout=timeout_s)
        except (NatsTimeoutError, TimeoutError):
            return []
        except NatsError as exc:
            raise BrokerUnavailable(f"fetch failed: {exc}") from exc

        return [Delivery(m, self._broker.nc) for m in msgs]

    async def close(self) -> None:
        """Stop the pull subscription."""
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except (NatsError, TimeoutError) as exc:
                log.debug("jobqueue.unsubscribe_failed error=%s", exc)
            self._sub = None


async def subscribe_cancel(
    broker: Broker, callback: Callable[[str], Awaitable[None]]
) -> Subscription:
    """Call ``callback(job_id)`` for every cancel request on the control subject."""

    async def on_msg(msg: Msg) -> None:
        job_id = msg.subject.rsplit(".", 1)[-1]
        await callback(job_id)
        if msg.reply:
            await msg.respond(b"ok")

    try:
        sub = await broker.nc.subscribe(f"{c.CANCEL_SUBJECT_PREFIX}.*", cb=on_msg)
        # Once this returns, the server knows the subscription: a cancel
        # request sent right after must find it.
        await broker.nc.flush()
    except (NatsError, TimeoutError) as exc:
        raise BrokerUnavailable(f"cannot subscribe to cancel requests: {exc}") from exc

    return sub
