"""``status``, ``workers`` and ``streams``: the fleet as a whole."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import msgspec
from rich.console import Console

from archive_worker import constants as c
from archive_worker.broker import Broker

from . import natsio
from .model import FleetStatus, StreamRow, WorkerSnapshot
from .output import age, clock, since, table

log = logging.getLogger(__name__)

#: How long ``workers`` collects registry answers.  Every worker answers a
#: ``$SRV.STATS`` request at once; half a second covers a loaded process and
#: a cluster hop, and keeps the commands under a second.
GATHER_WINDOW_S = 0.5
#: The micro service verb the registry is read with.
STATS_SUBJECT = f"$SRV.STATS.{c.MICRO_SERVICE_NAME}"


async def workers(
    broker: Broker, *, window_s: float = GATHER_WINDOW_S
) -> list[WorkerSnapshot]:
    """Every registered worker's snapshot, by worker id."""
    replies = await natsio.scatter_gather(broker, STATS_SUBJECT, window_s=window_s)
    found: dict[str, WorkerSnapshot] = {}
    for data in replies:
        try:
            stats = json.loads(data)
            for endpoint in stats.get("endpoints") or []:
                if endpoint.get("data"):
                    snap = msgspec.convert(endpoint["data"], WorkerSnapshot)
                    found[snap.worker_id] = snap
                    break
        except (ValueError, msgspec.ValidationError) as exc:
            log.warning("registry.bad_answer error=%s", exc)

    return sorted(found.values(), key=lambda w: w.worker_id)


async def fleet_status(broker: Broker) -> FleetStatus:
    """Queue, in-flight jobs, redeliveries, workers and dead letters at once."""
    state, fleet, dlq, jobs = await asyncio.gather(
        broker.queue_state(),
        workers(broker),
        natsio.stream_info(broker, c.DLQ_STREAM),
        natsio.stream_info(broker, c.JOBS_STREAM),
    )
    # The stream's limit, not this command's settings: the roles set it.
    limit = int(jobs["config"].get("max_msgs") or state.limit) if jobs else state.limit
    slots_total = sum(w.slots_total for w in fleet)
    slots_busy = sum(w.slots_busy for w in fleet)

    return FleetStatus(
        queue_depth=len(state.waiting) + len(state.processing),
        queue_limit=limit,
        waiting=len(state.waiting),
        in_flight=len(state.processing),
        redeliveries=state.redelivered,
        oldest_waiting_age_s=since(state.oldest_waiting_ts),
        workers=len(fleet),
        slots_free=max(0, slots_total - slots_busy),
        slots_total=slots_total,
        dead_letters=int(dlq["state"]["messages"]) if dlq else 0,
    )


async def streams(broker: Broker) -> list[StreamRow]:
    """The service's streams and the workers' consumer, limits and state."""
    names = (c.JOBS_STREAM, c.STATUS_STREAM, c.DLQ_STREAM)
    infos = await asyncio.gather(*(natsio.stream_info(broker, n) for n in names))
    rows = []
    for name, info in zip(names, infos, strict=True):
        if info is None:
            rows.append(
                StreamRow(
                    name=name,
                    kind="stream",
                    messages=0,
                    bytes=0,
                    limits={},
                    state={"missing": True},
                )
            )
            continue
        cfg, st = info["config"], info["state"]
        rows.append(
            StreamRow(
                name=name,
                kind="stream",
                messages=int(st.get("messages", 0)),
                bytes=int(st.get("bytes", 0)),
                limits=_pick(
                    cfg,
                    "retention",
                    "max_msgs",
                    "max_bytes",
                    "max_age",
                    "max_msgs_per_subject",
                    "discard",
                    "num_replicas",
                    "duplicate_window",
                ),
                state=_pick(
                    st, "first_seq", "last_seq", "consumer_count", "num_subjects"
                ),
            )
        )
    consumer = await natsio.consumer_info(broker)
    if consumer is not None:
        cfg = consumer.get("config", {})
        rows.append(
            StreamRow(
                name=f"{c.JOBS_STREAM}/{c.WORKERS_CONSUMER}",
                kind="consumer",
                messages=int(consumer.get("num_pending", 0))
                + int(consumer.get("num_ack_pending", 0)),
                bytes=0,
                limits=_pick(
                    cfg, "ack_wait", "max_deliver", "max_ack_pending", "max_waiting"
                ),
                state=_pick(
                    consumer,
                    "num_pending",
                    "num_ack_pending",
                    "num_redelivered",
                    "num_waiting",
                ),
            )
        )

    return rows


#: Durations nats-py reports in nanoseconds; shown in seconds as ``<key>_s``.
_NANOS = frozenset({"max_age", "duplicate_window", "ack_wait"})


def _pick(data: dict[str, Any], *keys: str) -> dict[str, object]:
    picked: dict[str, object] = {}
    for key in keys:
        value = data.get(key)
        if value is None:
            continue
        if key in _NANOS:
            picked[f"{key}_s"] = round(float(value) / 1e9, 3)
        else:
            picked[key] = value.value if hasattr(value, "value") else value
    return picked


# --- rendering ---------------------------------------------------------------------


def render_status(s: FleetStatus, out: Console) -> None:
    """Print the fleet status as a key/value table."""
    rows = [
        (
            "queue",
            f"{s.queue_depth}/{s.queue_limit} ({s.waiting} waiting, {s.in_flight} in flight)",
        ),
        ("oldest waiting", age(s.oldest_waiting_age_s)),
        ("redeliveries", s.redeliveries),
        ("workers", f"{s.workers} ({s.slots_free}/{s.slots_total} slots free)"),
        ("dead letters", s.dead_letters),
    ]
    out.print(table(None, ("", ""), rows, header=False))


def render_workers(fleet: list[WorkerSnapshot], out: Console) -> None:
    """Print the registry."""
    if not fleet:
        out.print("no worker answered")
        return
    rows = [
        (
            w.worker_id,
            w.host,
            w.version,
            f"{w.slots_busy}/{w.slots_total}",
            w.jobs_done,
            w.jobs_failed,
            w.pages_rendered,
            w.browser_restarts,
            age(w.uptime_s),
            clock(w.time),
        )
        for w in fleet
    ]
    cols = (
        "worker",
        "host",
        "version",
        "busy",
        "done",
        "failed",
        "pages",
        "restarts",
        "uptime",
        "last seen",
    )
    out.print(table(None, cols, rows))


def render_streams(rows: list[StreamRow], out: Console) -> None:
    """Print streams and consumer."""
    cells = [
        (
            r.name,
            r.kind,
            r.messages,
            r.bytes,
            " ".join(f"{k}={v}" for k, v in r.limits.items()),
            " ".join(f"{k}={v}" for k, v in r.state.items()),
        )
        for r in rows
    ]
    out.print(
        table(None, ("name", "kind", "messages", "bytes", "limits", "state"), cells)
    )
