"""Status reporting of one job: to Moodle in its plugin's vocabulary, and on NATS.

Moodle hears about transitions and, at most every ``status_interval_s``,
about progress; NATS hears about every step.  Two rules from the contract
shape this class: FINISHED is never sent to Moodle (Moodle sets it itself when
it accepts the upload), and nothing is sent to Moodle after a terminal
status, because Moodle deletes the job's token at that point (2.7).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from archive_worker.errors import BrokerError, JobError
from archive_worker.events import StatusEvent
from archive_worker.jobs import JobSpec, JobStatus

log = logging.getLogger(__name__)


class StatusSink(Protocol):
    """Where status events go (the broker, or a list in tests)."""

    async def publish_event(self, event: StatusEvent) -> object:
        """Store one event."""


class MoodleStatus(Protocol):
    """The part of the Moodle client that takes status updates."""

    async def update_status(
        self, status: JobStatus, *, progress: int | None = None
    ) -> bool:
        """Send one status to Moodle; True if Moodle accepted it."""


class StatusReporter:
    """Publishes a job's transitions and progress.

    Args:
        spec: the job.
        moodle: the job's Moodle client (or None when Moodle is not told).
        sink: where events are published.
        worker_id: this worker process.
        delivery: the JetStream delivery count of the job message.
        trace_id: the job's trace id, copied into every event.
        interval_s: minimum time between progress updates to Moodle.
    """

    def __init__(
        self,
        spec: JobSpec,
        moodle: MoodleStatus | None,
        sink: StatusSink,
        *,
        worker_id: str,
        delivery: int | None = None,
        trace_id: str | None = None,
        interval_s: float = 15.0,
    ) -> None:
        self.spec = spec
        self._moodle = moodle
        self._sink = sink
        self._worker_id = worker_id
        self._delivery = delivery
        self._trace_id = trace_id
        self._interval_s = interval_s
        self._last_moodle_call = 0.0
        self._moodle_closed = False
        self.status = JobStatus.AWAITING_PROCESSING
        self.progress: int | None = None

    async def transition(
        self,
        status: JobStatus,
        *,
        stage: str,
        progress: int | None = None,
        item: int | None = None,
        error: JobError | None = None,
        to_moodle: bool = True,
    ) -> None:
        """Record a new state: Moodle first (if it may be told), then NATS.

        In this order a subscriber that sees a terminal event knows that
        Moodle has been told as well.
        """
        self.status = status
        if progress is not None:
            self.progress = progress
        if to_moodle and status is not JobStatus.FINISHED:
            await self._tell_moodle(status, progress)
        await self._publish(
            status, stage=stage, progress=progress, item=item, error=error
        )

    async def progress_step(
        self, done: int, total: int, *, stage: str, item: int
    ) -> None:
        """One more report done: event always, Moodle at the configured interval."""
        self.progress = round(done / total * 100) if total else 100
        if time.monotonic() - self._last_moodle_call >= self._interval_s:
            await self._tell_moodle(JobStatus.RUNNING, self.progress)
        await self._publish(
            JobStatus.RUNNING, stage=stage, progress=self.progress, item=item
        )

    async def _tell_moodle(self, status: JobStatus, progress: int | None) -> None:
        if self._moodle is None or self._moodle_closed:
            return
        if status.is_terminal:
            # Moodle deletes the token with this call; nothing may follow it.
            self._moodle_closed = True
        self._last_moodle_call = time.monotonic()
        sent_progress = progress if status is JobStatus.RUNNING else None
        await self._moodle.update_status(status, progress=sent_progress)

    async def _publish(
        self,
        status: JobStatus,
        *,
        stage: str,
        progress: int | None = None,
        item: int | None = None,
        error: JobError | None = None,
    ) -> None:
        event = StatusEvent(
            job_id=self.spec.job_id,
            flavour=self.spec.flavour.value,
            status=status,
            progress=progress,
            stage=stage,
            item=item,
            error_code=error.code if error else None,
            error=error.describe() if error else None,
            worker_id=self._worker_id,
            delivery=self._delivery,
            trace_id=self._trace_id,
            moodle=self.spec.moodle_ref(),
        )
        try:
            await self._sink.publish_event(event)
        except BrokerError as exc:
            # The job goes on: Moodle is the system of record for its status.
            log.warning(
                "status_event.lost status=%s stage=%s error=%s", status, stage, exc
            )
