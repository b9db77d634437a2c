"""``jobs``, ``job``, ``watch`` and ``cancel``: jobs from the status stream.

Listing reads the newest event of every job in one batched direct get (see
:mod:`.natsio`), so it stays fast with hundreds of jobs; a job's history is
one more such request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Collection

import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from archive_worker import constants as c
from archive_worker.broker import Broker
from archive_worker.errors import ArchiveWorkerError
from archive_worker.events import StatusEvent, cancel_request, decode_event

from . import natsio
from .model import JobHistory, JobRow
from .output import age, clock, table

#: How long ``cancel`` waits for a running job to report its end.
CANCEL_WAIT_S = 10.0


class JobNotFound(ArchiveWorkerError):
    """No status event names the job (or the prefix is ambiguous)."""


def _decode_all(msgs: list[natsio.StoredMsg]) -> list[StatusEvent]:
    events = []
    for msg in msgs:
        with contextlib.suppress(msgspec.ValidationError):
            events.append(decode_event(msg.data))
    return events


def _row(event: StatusEvent, now: float) -> JobRow:
    ref = event.moodle
    return JobRow(
        job_id=event.job_id,
        flavour=event.flavour,
        status=event.status.value,
        progress=event.progress,
        stage=event.stage,
        worker_id=event.worker_id,
        updated_age_s=round(max(0.0, now - event.time), 1),
        courseid=ref.courseid if ref else None,
        cmid=ref.cmid if ref else None,
        quizid=ref.quizid if ref else None,
        taskid=ref.taskid if ref else None,
        base_url=ref.base_url if ref else None,
        error=event.error,
    )


async def list_jobs(
    broker: Broker,
    *,
    statuses: Collection[str] = (),
    max_age_s: float | None = None,
    limit: int = 50,
) -> list[JobRow]:
    """The most recently updated jobs, newest first.

    Args:
        broker: connected broker.
        statuses: keep only these statuses (case-insensitive); empty = all.
        max_age_s: keep only jobs updated within this many seconds.
        limit: at most this many rows.
    """
    msgs = await natsio.last_per_subject(broker, c.STATUS_STREAM, c.STATUS_SUBJECTS)
    now = time.time()
    wanted = {s.upper() for s in statuses}
    rows = [
        _row(e, now)
        for e in _decode_all(msgs)
        if (not wanted or e.status.value in wanted)
        and (max_age_s is None or now - e.time <= max_age_s)
    ]
    rows.sort(key=lambda r: r.updated_age_s)

    return rows[:limit]


async def resolve_job_id(broker: Broker, text: str) -> str:
    """A full job id from a full id or a unique prefix.

    Raises:
        JobNotFound: no job, or more than one, matches.
    """
    with contextlib.suppress(ValueError):
        return str(uuid.UUID(text))
    msgs = await natsio.last_per_subject(broker, c.STATUS_STREAM, c.STATUS_SUBJECTS)
    prefix = c.status_subject(text.lower())
    matches = sorted({m.subject for m in msgs if m.subject.startswith(prefix)})
    if len(matches) != 1:
        raise JobNotFound(
            f"no job matches {text!r}"
            if not matches
            else f"{text!r} matches {len(matches)} jobs; give more of the id"
        )

    return matches[0].rsplit(".", 1)[-1]


async def job_history(broker: Broker, text: str) -> JobHistory:
    """Every stored event of a job, plus its dead letter if it has one.

    Raises:
        JobNotFound: the job has no events.
    """
    job_id = await resolve_job_id(broker, text)
    msgs, dead = await asyncio.gather(
        natsio.subject_history(broker, c.STATUS_STREAM, c.status_subject(job_id)),
        natsio.subject_history(broker, c.DLQ_STREAM, c.dlq_subject(job_id)),
    )
    events = _decode_all(msgs)
    if not events:
        raise JobNotFound(f"job {job_id} has no status events")
    last = events[-1]
    failed = next((e for e in reversed(events) if e.error), None)

    return JobHistory(
        job_id=job_id,
        status=last.status.value,
        error=failed.error if failed else None,
        error_code=failed.error_code if failed else None,
        trace_id=next((e.trace_id for e in reversed(events) if e.trace_id), None),
        events=events,
        dead_letter=msgspec.json.decode(dead[-1].data) if dead else None,
    )


class CancelResult(msgspec.Struct, kw_only=True):
    """What ``cancel`` did: ``state`` is running, queued or ended."""

    job_id: str
    state: str
    detail: str
    final_status: str | None = None


async def cancel_job(
    broker: Broker, text: str, *, wait_s: float = CANCEL_WAIT_S
) -> CancelResult:
    """Cancel a queued or running job; the worker tells Moodle.

    A running job's worker is asked over ``archive.control.cancel.<id>`` and
    ends it as CANCELED (FAILED to quiz_archiver) without upload; this waits
    up to ``wait_s`` for that event.  For a queued job (or one waiting for a
    retry) a cancel marker is stored as its newest event, and the next worker
    to take it reports the cancellation to Moodle and drops it unrun.  The
    marker is written in both cases, so that a job whose worker dies in
    between is still canceled on redelivery.

    Raises:
        JobNotFound: unknown job.
    """
    job_id = await resolve_job_id(broker, text)
    last = await broker.last_event(job_id)
    if last is None:
        raise JobNotFound(f"job {job_id} has no status events")
    if last.status.is_terminal:
        return CancelResult(
            job_id=job_id,
            state="ended",
            detail=f"job already ended as {last.status.value}",
            final_status=last.status.value,
        )
    await broker.publish_event(cancel_request(job_id, last.flavour, last.moodle))
    state = await broker.queue_state()
    running = job_id in state.processing and await broker.request_cancel(job_id)
    if not running:
        return CancelResult(
            job_id=job_id,
            state="queued",
            detail="cancel recorded; the next worker to take the job reports it canceled to Moodle",
        )
    final = await _wait_for_end(broker, job_id, wait_s)
    detail = (
        f"worker ended the job as {final}"
        if final
        else f"cancel sent; no end reported within {wait_s:g} s"
    )

    return CancelResult(
        job_id=job_id, state="running", detail=detail, final_status=final
    )


async def _wait_for_end(broker: Broker, job_id: str, wait_s: float) -> str | None:
    with contextlib.suppress(TimeoutError):
        async with (
            asyncio.timeout(wait_s),
            broker.follow_events(job_id, history=True) as events,
        ):
            async for event in events:
                if event.status.is_terminal:
                    return event.status.value
    return None


async def watch(
    broker: Broker,
    job_id: str | None,
    *,
    as_json: bool,
    out: Console,
    timeout_s: float | None = None,
) -> str | None:
    """Follow status events live until the job ends (or forever, for all jobs).

    Returns:
        The final status of ``job_id``, or None when watching all jobs (or
        the timeout passed first).
    """
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}% {task.fields[status]}"),
        console=out,
        disable=as_json,
    )
    tasks: dict[str, TaskID] = {}
    with contextlib.suppress(TimeoutError), progress:
        async with (
            asyncio.timeout(timeout_s),
            broker.follow_events(job_id, history=job_id is not None) as events,
        ):
            async for event in events:
                if as_json:
                    out.print(
                        msgspec.json.encode(event).decode(),
                        markup=False,
                        soft_wrap=True,
                    )
                else:
                    _show(progress, tasks, event)
                if job_id is not None and event.status.is_terminal:
                    return event.status.value
    return None


def _show(progress: Progress, tasks: dict[str, TaskID], event: StatusEvent) -> None:
    label = f"{event.job_id[:8]} {event.flavour}"
    if event.job_id not in tasks:
        tasks[event.job_id] = progress.add_task(label, total=100, status="")
    task = tasks[event.job_id]
    status = event.status.value + (f" ({event.stage})" if event.stage else "")
    progress.update(task, completed=event.progress or 0, status=status)
    if event.status.is_terminal:
        tail = f": {event.error}" if event.error else ""
        progress.console.print(
            f"{clock(event.time)} {label} {event.status.value}{tail}", markup=False
        )
        progress.remove_task(task)
        del tasks[event.job_id]


# --- rendering ---------------------------------------------------------------------


def render_jobs(rows: list[JobRow], out: Console) -> None:
    """Print the job list."""
    if not rows:
        out.print("no jobs")
        return
    cells = [
        (
            r.job_id,
            r.flavour,
            _moodle_ids(r),
            r.status,
            None if r.progress is None else f"{r.progress}%",
            r.stage,
            age(r.updated_age_s),
            r.worker_id,
        )
        for r in rows
    ]
    out.print(
        table(
            None,
            (
                "job",
                "flavour",
                "moodle",
                "status",
                "progress",
                "stage",
                "updated",
                "worker",
            ),
            cells,
        )
    )


def _moodle_ids(r: JobRow) -> str:
    if r.taskid is not None:
        return f"task {r.taskid}"
    return f"course {r.courseid} cm {r.cmid} quiz {r.quizid}"


def render_history(h: JobHistory, out: Console) -> None:
    """Print one job's history and error."""
    first = h.events[0]
    ref = first.moodle
    out.print(f"job      {h.job_id}", markup=False)
    out.print(f"flavour  {first.flavour}", markup=False)
    if ref is not None:
        out.print(
            f"moodle   {ref.base_url} {msgspec.json.encode(ref).decode()}", markup=False
        )
    out.print(f"status   {h.status}", markup=False)
    out.print(f"trace    {h.trace_id or '-'}", markup=False)
    if h.error:
        out.print(f"error    [{h.error_code}] {h.error}", markup=False)
    cells = [
        (
            clock(e.time),
            e.status.value,
            e.stage,
            e.item,
            None if e.progress is None else f"{e.progress}%",
            e.worker_id,
            e.delivery,
            e.error,
        )
        for e in h.events
    ]
    out.print(
        table(
            None,
            (
                "time",
                "status",
                "stage",
                "item",
                "progress",
                "worker",
                "delivery",
                "error",
            ),
            cells,
        )
    )
    if h.dead_letter is not None:
        out.print("dead letter: yes (see `archive-worker dlq show`)")


def render_cancel(r: CancelResult, out: Console) -> None:
    """Print what cancel did."""
    out.print(f"{r.job_id}: {r.state}: {r.detail}", markup=False)
