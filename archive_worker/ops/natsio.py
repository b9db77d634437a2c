"""The operator commands' NATS adapter: batched reads, discovery, DLQ edits.

Like :mod:`archive_worker.broker` (which it builds on), this is a module
where nats-py is allowed; its errors become
:class:`~archive_worker.errors.BrokerError` here.  What it adds is what only
operators need:

* **Batched direct gets.**  One ``$JS.API.DIRECT.GET`` request with
  ``multi_last`` returns the newest message of every subject matching a
  filter (nats-server 2.11+), and one with ``next_by_subj`` and ``batch``
  returns a subject's history.  The server streams the messages to an inbox
  and ends with a ``204 EOB`` status, so hundreds of jobs cost one round
  trip, which is what lets ``jobs`` answer within a second on a loaded fleet.
* **Scatter-gather** for the NATS micro service verbs (``$SRV.STATS...``):
  every worker answers the same request, so replies are collected for a
  short window instead of taking the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError

from archive_worker import constants as c
from archive_worker.broker import Broker, _ssl_context
from archive_worker.config import Settings
from archive_worker.embedded import running_url
from archive_worker.errors import BrokerError, BrokerUnavailable

#: Subjects one ``multi_last`` request may return; nats-server caps a direct
#: get batch, and ``jobs`` shows far fewer rows than this anyway.
MAX_BATCH = 10_000
#: Time to wait for the next message of a batch before giving up; batches
#: arrive back to back, so this only matters when the server went away.
BATCH_GAP_S = 2.0
_DIRECT_GET = "$JS.API.DIRECT.GET"
_STATUS_HEADER = "Status"


@dataclass(frozen=True)
class StoredMsg:
    """One message read from a stream."""

    subject: str
    seq: int
    time: float
    data: bytes


def ops_url(settings: Settings) -> str:
    """The NATS URL operator commands use.

    Without a configured URL the service runs an embedded server inside the
    ``up`` process; the commands connect to that one (the URL it announced
    in the data folder, else ``embedded_nats_port`` on loopback) and never
    start a server of their own.
    """
    if settings.nats_url:
        return settings.nats_url
    announced = running_url(f"{settings.data_dir}/nats")
    return announced or f"nats://127.0.0.1:{settings.embedded_nats_port}"


@contextlib.asynccontextmanager
async def connect(
    settings: Settings, *, timeout_s: float | None = None
) -> AsyncIterator[Broker]:
    """Connect once, without the roles' endless reconnects, and close on exit.

    Raises:
        BrokerUnavailable: no server answered within ``timeout_s`` (default:
            the configured connect timeout).
    """
    url = ops_url(settings)
    limit = timeout_s or settings.nats_connect_timeout_s
    nc = Client()
    try:
        async with asyncio.timeout(limit):
            await nc.connect(
                servers=[u.strip() for u in url.split(",") if u.strip()],
                name="archive-worker cli",
                user=settings.nats_user,
                password=settings.nats_password,
                token=settings.nats_token,
                user_credentials=settings.nats_creds,
                tls=_ssl_context(settings),
                connect_timeout=max(1, round(limit)),
                allow_reconnect=False,
                # nats-py tries each server until it passed this count, then
                # gives up (0 would mean: retry forever).
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                error_cb=_quiet,
            )
    except (NatsError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(f"cannot connect to NATS at {url}: {exc}") from None
    broker = Broker(nc, settings)
    try:
        yield broker
    finally:
        with contextlib.suppress(NatsError, TimeoutError):
            await nc.close()


async def _quiet(exc: Exception) -> None:
    """Connection errors surface as exceptions; nats-py need not log them."""


def _parse_time(text: str | None) -> float:
    if not text:
        return 0.0
    # RFC 3339 with nanoseconds; Python parses microseconds at most.
    head, _, frac = text.rstrip("Z").partition(".")
    stamp = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()

    return stamp + (float("0." + frac) if frac else 0.0)


async def _direct_batch(
    broker: Broker, stream: str, request: dict[str, Any]
) -> list[StoredMsg]:
    """Run one batched direct get and collect its messages up to the EOB."""
    nc = broker.nc
    inbox = nc.new_inbox()
    out: list[StoredMsg] = []
    try:
        sub = await nc.subscribe(inbox)
        try:
            await nc.publish(
                f"{_DIRECT_GET}.{stream}", json.dumps(request).encode(), reply=inbox
            )
            while True:
                msg = await sub.next_msg(timeout=BATCH_GAP_S)
                headers = msg.headers or {}
                status = headers.get(_STATUS_HEADER)
                if status == "404":
                    break
                if status is not None:
                    if status != "204":
                        raise BrokerError(f"direct get on {stream} answered {status}")
                    break
                out.append(
                    StoredMsg(
                        subject=headers.get("Nats-Subject", ""),
                        seq=int(headers.get("Nats-Sequence", "0")),
                        time=_parse_time(headers.get("Nats-Time-Stamp")),
                        data=msg.data,
                    )
                )
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
    except (NatsError, TimeoutError) as exc:
        raise BrokerUnavailable(f"JetStream did not answer: {exc}") from exc

    return out


async def last_per_subject(
    broker: Broker, stream: str, subjects: str
) -> list[StoredMsg]:
    """The newest message of every subject of ``stream`` matching ``subjects``."""
    return await _direct_batch(
        broker, stream, {"multi_last": [subjects], "batch": MAX_BATCH}
    )


async def subject_history(broker: Broker, stream: str, subject: str) -> list[StoredMsg]:
    """Every stored message of one subject, oldest first."""
    return await _direct_batch(
        broker, stream, {"seq": 1, "next_by_subj": subject, "batch": MAX_BATCH}
    )


async def scatter_gather(
    broker: Broker, subject: str, *, window_s: float, payload: bytes = b""
) -> list[bytes]:
    """Publish one request and collect every reply that arrives in ``window_s``."""
    nc = broker.nc
    inbox = nc.new_inbox()
    replies: list[bytes] = []
    try:
        sub = await nc.subscribe(inbox)
        try:
            await nc.publish(subject, payload, reply=inbox)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + window_s
            while (left := deadline - loop.time()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except (NatsError, TimeoutError):
                    break
                replies.append(msg.data)
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
    except NatsError as exc:
        raise BrokerUnavailable(f"NATS request {subject} failed: {exc}") from exc

    return replies


async def stream_info(broker: Broker, name: str) -> dict[str, Any] | None:
    """A stream's config and state as plain data, or None if it does not exist."""
    try:
        info = await broker.js.stream_info(name)
    except NotFoundError:
        return None
    except (NatsError, TimeoutError) as exc:
        raise BrokerUnavailable(f"JetStream did not answer: {exc}") from exc

    return {"config": info.config.as_dict(), "state": info.state.as_dict()}


async def consumer_info(broker: Broker) -> dict[str, Any] | None:
    """The workers' consumer as plain data, or None if it does not exist."""
    try:
        info = await broker.js.consumer_info(c.JOBS_STREAM, c.WORKERS_CONSUMER)
    except NotFoundError:
        return None
    except (NatsError, TimeoutError) as exc:
        raise BrokerUnavailable(f"JetStream did not answer: {exc}") from exc
    data: dict[str, Any] = info.as_dict()

    return data


async def jetstream_available(broker: Broker) -> bool:
    """True when the server answers JetStream account requests."""
    try:
        await broker.js.account_info()
    except (NatsError, TimeoutError):
        return False

    return True


async def purge_subject(broker: Broker, stream: str, subject: str | None) -> None:
    """Remove every message of ``subject`` (or all of ``stream``)."""
    try:
        await broker.js.purge_stream(stream, subject=subject)
    except (NatsError, TimeoutError) as exc:
        raise BrokerUnavailable(f"purge of {stream} failed: {exc}") from exc
