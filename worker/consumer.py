"""The worker loop: take jobs from JetStream, run them, settle their messages.

A worker process has ``job_slots`` slots and fetches only as many messages as
it has free slots.  While a job runs, its lease (the consumer's ack wait) is
renewed every third of the ack wait; if the process dies, the job is
redelivered to another worker within about one lease.

How a job ends, and what happens to its message:

==========================  ===================  =============  ==========
outcome                     Moodle hears         NATS event     message
==========================  ===================  =============  ==========
uploaded                    (sets FINISHED)      FINISHED       ack
transient error, tries left nothing              AWAITING_...   nak+delay
permanent error / last try  FAILED               FAILED         term + DLQ
over ``job_timeout_s``      TIMEOUT              TIMEOUT        term
canceled by an operator     FAILED / CANCELED    CANCELED       term
worker shutting down        nothing              AWAITING_...   nak
already terminal (redeliv.) nothing              nothing        ack
==========================  ===================  =============  ==========
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec

from archive_worker.broker import Broker
from archive_worker.config import Settings
from archive_worker.errors import BrokerError, JobCanceled, JobError, JobTimeout
from archive_worker.events import Stage, is_cancel_request
from archive_worker.jobqueue import Delivery, JobQueue, subscribe_cancel
from archive_worker.jobs import JobSpec, JobStatus, decode_job, without_token
from archive_worker.logs import bind_job, bound_fields
from archive_worker.moodle import MoodleClient
from archive_worker.telemetry import Telemetry, job_trace

from .checkpoint import JobCheckpoints, clear_checkpoints
from .pipeline import JobRunner
from .render import Renderer
from .status import StatusReporter

log = logging.getLogger(__name__)

#: Longest wait of one fetch; also bounds how quickly the loop sees a stop.
FETCH_WAIT_S = 1.0
#: How long cancelled jobs get to hand their messages back at shutdown.
HAND_BACK_TIMEOUT_S = 10.0
#: Pause after a failed fetch (NATS away) before trying again.
FETCH_ERROR_PAUSE_S = 1.0


def default_worker_id() -> str:
    """``<host>-<pid>``: unique per process, readable for operators."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerStats:
    """Counters of one worker process (exposed in its registry entry)."""

    started_at: float = field(default_factory=time.time)
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_retried: int = 0
    jobs_handed_back: int = 0


@dataclass
class _Running:
    delivery: Delivery
    task: asyncio.Task[None]
    cancel_requested: bool = False


class WorkerService:
    """Pulls jobs and runs up to ``settings.job_slots`` of them at once.

    Args:
        settings: service settings.
        broker: connected broker (topology ensured).
        renderer: the process's started renderer.
        http: shared HTTP session for Moodle calls.
        worker_id: name of this process in events and the registry.
    """

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        renderer: Renderer,
        *,
        http: aiohttp.ClientSession,
        worker_id: str | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry or Telemetry.disabled()
        self.broker = broker
        self.renderer = renderer
        self.http = http
        self.worker_id = worker_id or settings.worker_id or default_worker_id()
        self.stats = WorkerStats()
        self._running: dict[str, _Running] = {}
        self._slot_freed = asyncio.Event()
        self._handing_back = False

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<WorkerService {self.worker_id} busy={len(self._running)}/"
            f"{self.settings.job_slots} done={s.jobs_done} failed={s.jobs_failed}>"
        )

    @property
    def running_jobs(self) -> list[str]:
        """Ids of the jobs this process is working on."""
        return list(self._running)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and run jobs until ``stop`` is set, then drain.

        On stop, no more jobs are fetched; running jobs get
        ``settings.drain_grace_s`` to finish, the rest are handed back to the
        queue (``nak``) for another worker.
        """
        queue = JobQueue(self.broker)
        await queue.open()
        cancel_sub = await subscribe_cancel(self.broker, self._on_cancel)
        log.info(
            "worker.started worker_id=%s slots=%d",
            self.worker_id,
            self.settings.job_slots,
        )
        try:
            await self._fetch_loop(queue, stop)
        finally:
            await queue.close()
            await self._drain()
            with contextlib.suppress(Exception):
                await cancel_sub.unsubscribe()
            log.info("worker.stopped %r", self)

    async def _fetch_loop(self, queue: JobQueue, stop: asyncio.Event) -> None:
        while not stop.is_set():
            free = self.settings.job_slots - len(self._running)
            if free <= 0:
                await _wait_any(self._slot_freed, stop)
                self._slot_freed.clear()
                continue
            try:
                deliveries = await queue.fetch(free, timeout_s=FETCH_WAIT_S)
            except BrokerError as exc:
                log.warning("worker.fetch_failed error=%s", exc)
                await _wait_any(stop, timeout_s=FETCH_ERROR_PAUSE_S)
                continue
            for delivery in deliveries:
                self._start(delivery)

    def _start(self, delivery: Delivery) -> None:
        key = delivery.job_id or f"seq-{delivery.stream_seq}"
        running = self._running.get(key)
        if running is not None:
            # Our own job, redelivered after its lease ran out: keep the one
            # run going under the new delivery instead of starting another.
            log.warning(
                "job.redelivered_while_running job_id=%s delivery=%d",
                key,
                delivery.num_delivered,
            )
            running.delivery.adopt(delivery)
            return
        task = asyncio.create_task(self._handle(delivery), name=f"job-{key}")
        self._running[key] = _Running(delivery, task)

        def done(_: asyncio.Task[None]) -> None:
            self._running.pop(key, None)
            self._slot_freed.set()

        task.add_done_callback(done)

    async def _drain(self) -> None:
        if not self._running:
            return
        tasks = [r.task for r in self._running.values()]
        log.info(
            "worker.draining jobs=%d grace_s=%s",
            len(tasks),
            self.settings.drain_grace_s,
        )
        _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_grace_s)
        if pending:
            self._handing_back = True
            for t in pending:
                t.cancel()
            _, stuck = await asyncio.wait(pending, timeout=HAND_BACK_TIMEOUT_S)
            if stuck:
                # Their leases run out and JetStream hands the jobs to
                # another worker; a stuck task must not keep this one alive.
                log.error(
                    "worker.hand_back_stuck jobs=%s",
                    ",".join(t.get_name() for t in stuck),
                )

    async def _on_cancel(self, job_id: str) -> None:
        running = self._running.get(job_id)
        if running is None:
            return
        log.info("job.cancel_requested job_id=%s", job_id)
        running.cancel_requested = True
        running.task.cancel()

    # --- one job --------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        try:
            spec = decode_job(delivery.data)
        except msgspec.ValidationError as exc:
            log.error("job.undecodable seq=%d error=%s", delivery.stream_seq, exc)
            await delivery.term()
            return
        with (
            job_trace(
                self.telemetry,
                delivery.headers,
                queued_at=delivery.queued_at,
                delivery=delivery.num_delivered,
                job_id=spec.job_id,
                flavour=spec.flavour.value,
            ) as trace_id,
            bind_job(job_id=spec.job_id, flavour=spec.flavour.value, trace_id=trace_id),
        ):
            if await self._cancel_requested(spec, delivery):
                return
            last = await self._last_status(spec.job_id)
            if last is not None and last.is_terminal:
                log.info("job.already_ended status=%s", last)
                await delivery.ack()
                await self._clear_checkpoints(spec)
                return
            await self._run(spec, delivery)

    async def _cancel_requested(self, spec: JobSpec, delivery: Delivery) -> bool:
        """End a job an operator canceled while it was queued, without work.

        The operator's ``cancel`` only writes a marker event (see
        ``events.cancel_request``); Moodle hears of the cancellation from
        here, so that workers remain the only ones talking to Moodle.
        """
        try:
            last = await self.broker.last_event(spec.job_id)
        except BrokerError:
            return False
        if last is None or not is_cancel_request(last):
            return False
        moodle = MoodleClient(spec, self.settings, session=self.http)
        reporter = StatusReporter(
            spec,
            moodle,
            self.broker,
            worker_id=self.worker_id,
            delivery=delivery.num_delivered,
            trace_id=bound_fields().get("trace_id"),
        )
        await self._end(
            delivery,
            reporter,
            JobStatus.CANCELED,
            JobCanceled("canceled by an operator while queued", stage=Stage.QUEUED),
        )

        return True

    async def _last_status(self, job_id: str) -> JobStatus | None:
        try:
            event = await self.broker.last_event(job_id)
        except BrokerError:
            return None
        return event.status if event else None

    async def _run(self, spec: JobSpec, delivery: Delivery) -> None:
        moodle = MoodleClient(spec, self.settings, session=self.http)
        reporter = StatusReporter(
            spec,
            moodle,
            self.broker,
            worker_id=self.worker_id,
            delivery=delivery.num_delivered,
            trace_id=bound_fields().get("trace_id"),
            interval_s=self.settings.status_interval_s,
        )
        if delivery.num_delivered > self.settings.max_deliver:
            error = JobError(
                f"gave up after {self.settings.max_deliver} deliveries",
                stage=Stage.START,
            )
            await self._fail(spec, delivery, reporter, error)
            return
        work_dir = Path(tempfile.mkdtemp(prefix="job-", dir=self._work_root()))
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        log.info("job.started delivery=%d", delivery.num_delivered)
        try:
            await self._execute(spec, delivery, reporter, moodle, work_dir)
        finally:
            heartbeat.cancel()
            await asyncio.to_thread(shutil.rmtree, work_dir, True)

    async def _execute(
        self,
        spec: JobSpec,
        delivery: Delivery,
        reporter: StatusReporter,
        moodle: MoodleClient,
        work_dir: Path,
    ) -> None:
        timeout = asyncio.timeout(self.settings.job_timeout_s)
        try:
            async with (
                timeout,
                self.renderer.session(
                    base_url=spec.moodle.base_url, job_id=spec.job_id
                ) as pages,
            ):
                runner = JobRunner(
                    spec,
                    self.settings,
                    moodle=moodle,
                    pages=pages,
                    reporter=reporter,
                    work_dir=work_dir,
                    checkpoints=JobCheckpoints(
                        self.broker,
                        spec.job_id,
                        resume=delivery.num_delivered > 1,
                    ),
                )
                await runner.run()
        except TimeoutError:
            if not timeout.expired():
                raise
            await self._end(
                delivery,
                reporter,
                JobStatus.TIMEOUT,
                JobTimeout(f"job exceeded {self.settings.job_timeout_s:g} s"),
            )
        except asyncio.CancelledError:
            await self._cancelled(spec, delivery, reporter)
        except JobError as exc:
            await self._job_error(spec, delivery, reporter, exc)
        except Exception as exc:
            log.exception("job.crashed")
            await self._fail(
                spec, delivery, reporter, JobError(f"internal error: {exc!r}")
            )
        else:
            await reporter.transition(
                JobStatus.FINISHED, stage=Stage.DONE, progress=100
            )
            await delivery.ack()
            self.stats.jobs_done += 1
            self.telemetry.job_ended(JobStatus.FINISHED, spec.flavour.value)
            await self._clear_checkpoints(spec)
            log.info("job.finished")

    async def _cancelled(
        self, spec: JobSpec, delivery: Delivery, reporter: StatusReporter
    ) -> None:
        running = self._running.get(spec.job_id)
        if running is not None and running.cancel_requested:
            # The cancellation is handled here; later awaits must not see it.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._end(
                delivery,
                reporter,
                JobStatus.CANCELED,
                JobCanceled("canceled by an operator", stage=Stage.START),
            )
            return
        # Shutdown past the grace period: another worker takes over.
        self.stats.jobs_handed_back += 1
        await reporter.transition(
            JobStatus.AWAITING_PROCESSING, stage=Stage.QUEUED, to_moodle=False
        )
        await delivery.nak()
        log.warning("job.handed_back")
        raise asyncio.CancelledError

    async def _job_error(
        self, spec: JobSpec, delivery: Delivery, reporter: StatusReporter, exc: JobError
    ) -> None:
        if exc.transient and delivery.num_delivered < self.settings.max_deliver:
            delay = min(
                self.settings.retry_backoff_s * 2 ** (delivery.num_delivered - 1),
                self.settings.retry_backoff_max_s,
            )
            self.stats.jobs_retried += 1
            self.telemetry.job_ended("retried", spec.flavour.value)
            log.warning("job.retry delay_s=%.0f error=%s", delay, exc.describe())
            await reporter.transition(
                JobStatus.AWAITING_PROCESSING,
                stage=Stage.QUEUED,
                error=exc,
                to_moodle=False,
            )
            await delivery.nak(delay)
            return
        await self._fail(spec, delivery, reporter, exc)

    async def _fail(
        self, spec: JobSpec, delivery: Delivery, reporter: StatusReporter, exc: JobError
    ) -> None:
        # The dead letter is stored before the terminal event goes out, so
        # whoever sees FAILED can find the dead letter.
        payload = msgspec.json.encode(
            {
                "job": without_token(spec),
                "error": exc.describe(),
                "error_code": exc.code,
                "deliveries": delivery.num_delivered,
                "worker_id": self.worker_id,
                "failed_at": time.time(),
            }
        )
        try:
            await self.broker.publish_dead_letter(spec.job_id, payload)
        except BrokerError as err:
            log.warning("dead_letter.lost error=%s", err)
        await self._end(delivery, reporter, JobStatus.FAILED, exc)

    async def _end(
        self,
        delivery: Delivery,
        reporter: StatusReporter,
        status: JobStatus,
        exc: JobError,
    ) -> None:
        self.stats.jobs_failed += 1
        self.telemetry.job_ended(status, reporter.spec.flavour.value)
        log.error("job.%s error=%s", status.value.lower(), exc.describe())
        await reporter.transition(
            status, stage=exc.stage or Stage.START, item=exc.attempt, error=exc
        )
        await delivery.term()
        await self._clear_checkpoints(reporter.spec)

    async def _clear_checkpoints(self, spec: JobSpec) -> None:
        """A job that ended needs no checkpoints (see ``worker.checkpoint``)."""
        item_ids = spec.reports.ids if spec.reports is not None else []
        await clear_checkpoints(self.broker, spec.job_id, item_ids)

    async def _heartbeat(self, delivery: Delivery) -> None:
        interval = self.settings.ack_wait_s / 3
        while True:
            await asyncio.sleep(interval)
            await delivery.extend()

    def _work_root(self) -> str:
        root = self.settings.work_dir or tempfile.gettempdir()
        Path(root).mkdir(parents=True, exist_ok=True)
        return root


async def _wait_any(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(
            waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for w in waiters:
            w.cancel()
