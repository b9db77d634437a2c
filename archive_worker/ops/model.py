"""Data shapes of the operator commands, shared with the worker registry.

Each command computes one of these and prints it either as a table or, with
``--json``, as the struct encoded by msgspec; scripts can rely on the field
names below.
"""

from __future__ import annotations

import msgspec

from archive_worker.events import StatusEvent


class WorkerSnapshot(msgspec.Struct, kw_only=True):
    """What one worker process reports about itself (registry stats).

    Attributes:
        worker_id: the process's id in events and logs.
        host: the machine it runs on.
        version: the package version it runs.
        slots_busy: jobs running now.
        slots_total: its configured job slots.
        jobs_done: jobs it finished.
        jobs_failed: jobs it ended as FAILED, TIMEOUT or CANCELED.
        jobs_retried: jobs it handed back for a later delivery.
        pages_rendered: PDFs its browser printed.
        browser_restarts: browsers launched to replace an earlier one.
        started_at: Unix time the process started taking jobs.
        uptime_s: seconds since then.
        running_jobs: ids of the jobs it runs now.
        time: Unix time of this snapshot (the "last seen" of the worker).
    """

    worker_id: str
    host: str
    version: str
    slots_busy: int
    slots_total: int
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_retried: int = 0
    pages_rendered: int = 0
    browser_restarts: int = 0
    started_at: float = 0.0
    uptime_s: float = 0.0
    running_jobs: list[str] = []
    time: float = 0.0


class FleetStatus(msgspec.Struct, kw_only=True):
    """The fleet at a glance (``status``)."""

    queue_depth: int
    queue_limit: int
    waiting: int
    in_flight: int
    redeliveries: int
    oldest_waiting_age_s: float | None
    workers: int
    slots_free: int
    slots_total: int
    dead_letters: int


class JobRow(msgspec.Struct, kw_only=True):
    """One job as ``jobs`` lists it: its newest event, flattened."""

    job_id: str
    flavour: str
    status: str
    progress: int | None
    stage: str | None
    worker_id: str | None
    updated_age_s: float
    courseid: int | None = None
    cmid: int | None = None
    quizid: int | None = None
    taskid: int | None = None
    base_url: str | None = None
    error: str | None = None


class JobHistory(msgspec.Struct, kw_only=True):
    """Everything known about one job (``job <id>``)."""

    job_id: str
    status: str | None
    error: str | None
    error_code: str | None
    trace_id: str | None
    events: list[StatusEvent]
    dead_letter: dict[str, object] | None = None


class StreamRow(msgspec.Struct, kw_only=True):
    """One stream or consumer with its limits and state (``streams``)."""

    name: str
    kind: str
    messages: int
    bytes: int
    limits: dict[str, object]
    state: dict[str, object]


class CheckResult(msgspec.Struct, kw_only=True):
    """One probe of ``check``: ok, warning or critical, and why."""

    name: str
    level: str
    detail: str


class DeadLetter(msgspec.Struct, kw_only=True):
    """One dead-lettered job (stored without its Moodle token)."""

    job_id: str
    flavour: str
    error: str
    error_code: str | None
    deliveries: int | None
    worker_id: str | None
    failed_at: float
    base_url: str | None
    job: dict[str, object]
