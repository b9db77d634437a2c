"""One job, end to end: reports, attachments, metadata, backups, archive, upload.

The order follows the reference worker (contract 3.2): RUNNING, every report
in the given order, the metadata table, the backups, FINALIZING, checksums
and ZIP, upload.  Reports are fetched from Moodle one after the other (so
that folder names are resolved deterministically), while up to
``render_concurrency`` of them render, post-process and download their
attachments at the same time.  Everything is written to the job's work
folder as it arrives; only the reports being rendered are held in memory.

The runner raises :class:`~archive_worker.errors.JobError` on failure and
leaves the terminal status to the consumer, which knows about deliveries,
time limits and cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Protocol

from archive_worker.config import Settings
from archive_worker.errors import PostprocessError
from archive_worker.events import Stage
from archive_worker.jobs import BackupTask, Flavour, JobSpec, JobStatus, ReportTask
from archive_worker.moodle import MoodleClient, Report
from archive_worker.telemetry import stage_span

from .archive import BuiltArchive, ReportSlot, Workspace
from .checkpoint import ItemCheckpoint, JobCheckpoints
from .pdf import convert_to_pdfa, optimize_images
from .status import StatusReporter

log = logging.getLogger(__name__)


class PageRenderer(Protocol):
    """What the pipeline needs from a render session."""

    async def render(
        self, html: str, target: Path, *, paper_format: str, item: int | None = None
    ) -> None:
        """Print ``html`` to a PDF at ``target``."""


class JobRunner:
    """Runs the work of one job; see the module docstring for the order.

    Args:
        spec: the job.
        settings: service settings (limits, concurrency, PDF options).
        moodle: client bound to the job's Moodle and token.
        pages: render session of the job (a fresh browser context).
        reporter: status to Moodle and NATS.
        work_dir: the job's private folder; removed by the caller.
        checkpoints: where finished items are saved and restored from;
            None = no checkpoints.
    """

    def __init__(
        self,
        spec: JobSpec,
        settings: Settings,
        *,
        moodle: MoodleClient,
        pages: PageRenderer,
        reporter: StatusReporter,
        work_dir: Path,
        checkpoints: JobCheckpoints | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.moodle = moodle
        self.pages = pages
        self.reporter = reporter
        self.work_dir = work_dir
        self.checkpoints = checkpoints
        self.workspace = Workspace(work_dir / "content", spec)
        self.items_done = 0
        self._waiting_for_backup = False

    async def run(self) -> BuiltArchive:
        """Do the job's work and upload the archive.

        Returns:
            The archive that Moodle accepted.

        Raises:
            JobError: a stage failed; ``stage`` and ``attempt`` say where.
        """
        started = time.monotonic()
        await self.reporter.transition(JobStatus.RUNNING, stage=Stage.START, progress=0)
        if self.spec.reports is not None:
            await self._reports(self.spec.reports)
            if self.spec.reports.fetch_metadata:
                await self._metadata(self.spec.reports)
        if self.spec.backups:
            await _gather_first_error(self._backup(b) for b in self.spec.backups)

        await self.reporter.transition(JobStatus.FINALIZING, stage=Stage.PACK)
        with stage_span(Stage.PACK):
            archive = await asyncio.to_thread(
                self.workspace.build,
                self.work_dir / "out",
                compression=self.settings.zip_compression,
            )
        log.info(
            "archive.built members=%d bytes=%d sha256=%s",
            len(archive.members),
            archive.size,
            archive.sha256,
        )
        # Same status, new stage: Moodle already knows FINALIZING.
        await self.reporter.transition(
            JobStatus.FINALIZING, stage=Stage.UPLOAD, to_moodle=False
        )
        with stage_span(Stage.UPLOAD, bytes=archive.size):
            await self.moodle.upload_archive(archive.path, sha256=archive.sha256)
        log.info(
            "job.uploaded items=%d bytes=%d seconds=%.1f",
            self.items_done,
            archive.size,
            time.monotonic() - started,
        )

        return archive

    # --- reports ----------------------------------------------------------------

    async def _reports(self, task: ReportTask) -> None:
        slots = asyncio.Semaphore(self.settings.render_concurrency)
        running: list[asyncio.Task[None]] = []
        try:
            for item_id in task.ids:
                await slots.acquire()
                _raise_first_failure(running)
                # A checkpointed item skips the report call and the render;
                # it is still added here, in report order, so that folder
                # collisions resolve as they did the first time.
                saved = await self._restore(item_id)
                if saved is not None:
                    report = saved.report()
                else:
                    with stage_span(Stage.REPORT, item=item_id):
                        report = await self.moodle.generate_report(item_id)
                slot = self.workspace.add_report(
                    item_id, report.foldername, report.filename
                )
                running.append(
                    asyncio.create_task(self._item(report, slot, task, slots, saved))
                )
            await _gather_first_error(running)
        finally:
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _item(
        self,
        report: Report,
        slot: ReportSlot,
        task: ReportTask,
        slots: asyncio.Semaphore,
        saved: ItemCheckpoint | None = None,
    ) -> None:
        try:
            if saved is not None:
                html = slot.html if task.keep_html_files else None
                await asyncio.to_thread(saved.write, slot.pdf, html)
            else:
                if task.keep_html_files:
                    await asyncio.to_thread(
                        slot.html.write_text, report.html, encoding="utf-8"
                    )
                with stage_span(Stage.RENDER, item=report.item_id):
                    await self.pages.render(
                        report.html,
                        slot.pdf,
                        paper_format=task.paper_format,
                        item=report.item_id,
                    )
                await self._postprocess(slot, task)
            await self._attachments(report, slot, task)
        finally:
            slots.release()
        if saved is None and self.checkpoints is not None:
            await self.checkpoints.save(
                report, slot.pdf, keep_html=task.keep_html_files
            )
        self.items_done += 1
        await self.reporter.progress_step(
            self.items_done, len(task.ids), stage=Stage.RENDER, item=report.item_id
        )

    async def _restore(self, item_id: int) -> ItemCheckpoint | None:
        if self.checkpoints is None:
            return None
        return await self.checkpoints.load(item_id)

    async def _postprocess(self, slot: ReportSlot, task: ReportTask) -> None:
        try:
            if task.image_optimize is not None:
                await optimize_images(slot.pdf, task.image_optimize)
            if self.settings.pdfa_conversion:
                await convert_to_pdfa(slot.pdf, self.settings)
        except PostprocessError as exc:
            exc.stage, exc.attempt = exc.stage or Stage.RENDER, slot.item_id
            raise

    async def _attachments(
        self, report: Report, slot: ReportSlot, task: ReportTask
    ) -> None:
        if self.spec.flavour is Flavour.ARCHIVINGMOD_ASSIGN:
            wanted = task.attachment_types or {}
            selected = [a for a in report.attachments if wanted.get(a.group, True)]
        else:
            selected = report.attachments if task.fetch_attachments else []
        for attachment in selected:
            target = slot.attachment_path(attachment.group, attachment.filename)
            await self.moodle.download_attachment(attachment, target)

    async def _metadata(self, task: ReportTask) -> None:
        with stage_span(Stage.METADATA):
            rows = await self.moodle.get_metadata(task.ids)
        await asyncio.to_thread(self.workspace.write_metadata, rows)

    # --- backups ----------------------------------------------------------------

    async def _backup(self, backup: BackupTask) -> None:
        while not await self.moodle.backup_ready(backup):
            if not self._waiting_for_backup:
                self._waiting_for_backup = True
                await self.reporter.transition(
                    JobStatus.WAITING_FOR_BACKUP, stage=Stage.BACKUP
                )
            log.debug("backup.pending backupid=%s", backup.backupid)
            # Polling Moodle is the only way to learn about the backup.
            await asyncio.sleep(self.settings.backup_poll_s)
        target = self.workspace.backup_path(backup.filename)
        with stage_span(Stage.BACKUP, backupid=backup.backupid):
            size = await self.moodle.download_backup(backup, target)
        log.info("backup.downloaded filename=%s bytes=%d", backup.filename, size)


def _raise_first_failure(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


async def _gather_first_error(aws: Iterable[Awaitable[None]]) -> None:
    """Await all, cancelling the rest and re-raising the first error."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        for next_done in asyncio.as_completed(tasks):
            await next_done
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
