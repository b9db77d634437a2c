"""The Moodle web service client of one archive job: :class:`MoodleClient`.

It builds each function's parameters and delegates the rest: the protocol
to :mod:`.wire`, answer checks to :mod:`.reports`, file transfers to
:mod:`.transfer`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from opentelemetry.trace import SpanKind

from .. import __version__, telemetry
from ..config import Settings
from ..errors import (
    BackupFailed,
    ChecksumMismatch,
    JobError,
    MoodleBadResponse,
    MoodleError,
    MoodleRejected,
    redact,
)
from ..jobs import BackupTask, Flavour, JobSpec, JobStatus
from . import transfer, wire
from .reports import Attachment, Report, parse_metadata, parse_report
from .wire import APIS, BACKUP_STATUS_FUNCTION, Route, shorten

log = logging.getLogger(__name__)

#: Ids per metadata call.  All parameters travel in the query string, and the
#: reference worker's batch of 100 keeps URLs below common server limits
#: (contract 2.1.1).
METADATA_BATCH_SIZE = 100


class MoodleClient:
    """Calls Moodle's web services for one job, with the job's token.

    Use as an async context manager, or call :meth:`close` when done.  The
    client closes only an HTTP session it created itself; a session passed in
    stays open.  Cancellation propagates from every method; a download
    cancelled half-way removes its partial file.

    Timeouts: REST calls have ``http_connect_timeout_s`` and
    ``http_read_timeout_s`` (no data for that long fails the call);
    downloads add the total ``http_transfer_timeout_s``; uploads and
    ``process_uploaded_artifact`` have connect and total limits only.
    TLS is verified unless ``skip_https_cert_validation``; requests go
    through ``proxy_server_url`` unless the host is in
    ``proxy_bypass_domains``.

    Args:
        spec: the job; its flavour selects the wsfunctions and vocabulary.
        settings: timeouts, TLS, proxy and size limits.
        session: an existing aiohttp session to use instead of a new one.
    """

    def __init__(
        self,
        spec: JobSpec,
        settings: Settings,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._spec = spec
        self._settings = settings
        self._api = APIS[spec.flavour]
        self._session = session
        self._owns_session = session is None
        self._base_url = spec.moodle.base_url.rstrip("/")
        self._route = Route.create(settings, spec.moodle)

    async def __aenter__(self) -> MoodleClient:
        self._http()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # --- status -----------------------------------------------------------

    async def update_status(
        self, status: JobStatus, *, progress: int | None = None
    ) -> bool:
        """Report the job's status with the flavour's own function.

        quiz_archiver gets the status string and, with ``progress``,
        ``statusextras={"progress": n}``; local_archiving drivers get the task
        status code and ``progress`` only together with RUNNING (2.2.1, 2.3).

        Args:
            status: the new job status.
            progress: percent of reports done.

        Returns:
            True if Moodle answered OK.  Status updates never fail a job, so
            every failure is logged at WARNING and answered with False.
        """
        params = self._status_params(status, progress)
        try:
            data = await self._call(self._api.status, params, stage="status")
        except MoodleError:
            return False  # already logged by _call
        answer = data.get("status")
        if answer == "OK":
            return True
        log.warning(
            "moodle.status.rejected wsfunction=%s status=%s answer=%s",
            self._api.status,
            status.value,
            redact(str(answer)),
        )

        return False

    def _status_params(self, status: JobStatus, progress: int | None) -> dict[str, Any]:
        if self._spec.flavour is Flavour.QUIZ_ARCHIVER:
            extras = None if progress is None else json.dumps({"progress": progress})
            return {
                "jobid": self._spec.job_id,
                "status": status.quiz_archiver_value,
                "statusextras": extras,
            }
        with_progress = progress is not None and status is JobStatus.RUNNING

        return {
            **self._task_ids(),
            "status": status.task_status_code,
            "progress": progress if with_progress else None,
        }

    def _task_ids(self) -> dict[str, Any]:
        return {"uuid": self._spec.job_id, "taskid": self._spec.taskid}

    def _quiz_ids(self) -> dict[str, Any]:
        spec = self._spec
        return {
            "jobid": spec.job_id,
            "courseid": spec.courseid,
            "cmid": spec.cmid,
            "quizid": spec.quizid,
        }

    def _job_ids(self) -> dict[str, Any]:
        if self._spec.flavour is Flavour.QUIZ_ARCHIVER:
            return self._quiz_ids()
        return self._task_ids()

    # --- reports ----------------------------------------------------------

    async def generate_report(self, item_id: int) -> Report:
        """Fetch the report of one attempt or submission (2.2.2, 2.3, 2.4).

        Args:
            item_id: attempt id (quiz flavours) or submission id (assign).

        Returns:
            The validated report with its attachment list (unfiltered).

        Raises:
            MoodleUnavailable: Moodle is unreachable, slow or answered 5xx.
            MoodleRejected: an error object or a non-OK status.
            MoodleBadResponse: wrong shape or types, ids not echoed, or an
                unsafe folder, file or attachment name or download URL.
            DownloadTooLarge: the answer exceeds ``report_max_bytes``.
        """
        tasks = self._spec.reports
        if tasks is None:
            raise JobError("the job has no report task", stage="report")
        params: dict[str, Any] = {
            **self._job_ids(),
            self._api.item_key: item_id,
            "foldernamepattern": tasks.foldername_pattern,
            "filenamepattern": tasks.filename_pattern,
            "sections": tasks.sections,
        }
        if self._spec.flavour is not Flavour.ARCHIVINGMOD_ASSIGN:
            params["attachments"] = tasks.fetch_attachments
        data = await self._call(
            self._api.report, params, stage="report", item=item_id, quirk=True
        )

        return parse_report(
            data, item_id, spec=self._spec, api=self._api, base_url=self._base_url
        )

    # --- metadata -----------------------------------------------------------

    async def get_metadata(self, item_ids: list[int]) -> list[dict[str, Any]]:
        """Fetch the metadata rows of attempts or submissions (2.2.3, 2.3, 2.4).

        Ids are sent in batches of :data:`METADATA_BATCH_SIZE`; the rows of
        all batches are concatenated in Moodle's order, each dict in Moodle's
        key order.

        Args:
            item_ids: the ids to describe.

        Returns:
            The rows.

        Raises:
            MoodleUnavailable, MoodleRejected, DownloadTooLarge: as for calls.
            MoodleBadResponse: rows missing, or (quiz_archiver) the course,
                module or quiz id differs from the job's.
        """
        rows: list[dict[str, Any]] = []
        for start in range(0, len(item_ids), METADATA_BATCH_SIZE):
            batch = item_ids[start : start + METADATA_BATCH_SIZE]
            params = {**self._job_ids(), self._api.ids_param: batch}
            data = await self._call(self._api.metadata, params, stage="metadata")
            rows.extend(parse_metadata(data, spec=self._spec, api=self._api))

        return rows

    # --- backups ------------------------------------------------------------

    async def backup_ready(self, backup: BackupTask) -> bool:
        """Ask whether a Moodle backup is ready (quiz_archiver, 2.2.4).

        Unlike the reference (contract 5.3), a failed backup fails the job at
        once instead of being polled until the job times out.

        Args:
            backup: the backup of the job.

        Returns:
            True on ``SUCCESS``, False on ``E_BACKUP_PENDING``.

        Raises:
            BackupFailed: any other status (``E_BACKUP_FAILED``,
                ``E_BACKUP_NOT_FOUND``, ``E_ACCESS_DENIED`` ...), or a job of
                another flavour.
            MoodleUnavailable, MoodleRejected, MoodleBadResponse: as for calls.
        """
        if self._spec.flavour is not Flavour.QUIZ_ARCHIVER:
            raise BackupFailed(
                f"{self._spec.flavour.value} jobs have no Moodle backups",
                stage="backup",
            )
        params = {"jobid": self._spec.job_id, "backupid": backup.backupid}
        data = await self._call(BACKUP_STATUS_FUNCTION, params, stage="backup")
        status = data.get("status")
        if status == "SUCCESS":
            return True
        if status == "E_BACKUP_PENDING":
            return False

        raise BackupFailed(
            f"backup {backup.backupid} ({backup.filename}): Moodle answered "
            f"status {status!r}",
            stage="backup",
        )

    # --- downloads ----------------------------------------------------------

    async def download_attachment(self, attachment: Attachment, target: Path) -> int:
        """Download an attachment and verify its SHA-1 (2.5).

        Args:
            attachment: as returned by :meth:`generate_report`.
            target: file to write; removed again on any failure.

        Returns:
            The number of bytes written.

        Raises:
            MoodleBadResponse: the URL is not a pluginfile URL of this Moodle.
            DownloadTooLarge: over ``attachment_max_bytes``.
            ChecksumMismatch: the content does not match ``contenthash``.
            MoodleRejected: HTTP 4xx, or a Moodle error object instead of
                the file.
            MoodleUnavailable: network error, HTTP 5xx, stall or time limit.
            ArchiveError: the file cannot be written.
        """
        item = attachment.item_id
        with transfer.failures_logged("download", attachment.download_url):
            transfer.check_file_url(
                self._base_url, attachment.download_url, "attachments", item
            )
            digest = hashlib.sha1(usedforsecurity=False)
            size = await transfer.download(
                self._http(),
                self._route,
                attachment.download_url,
                target,
                limit=self._settings.attachment_max_bytes,
                stage="attachments",
                item=item,
                digest=digest,
            )
            if digest.hexdigest() != attachment.contenthash.lower():
                await asyncio.to_thread(target.unlink, missing_ok=True)
                raise ChecksumMismatch(
                    f"attachment {shorten(attachment.filename)}: SHA-1 "
                    f"{digest.hexdigest()} differs from Moodle's "
                    f"{attachment.contenthash}",
                    stage="attachments",
                    attempt=item,
                )

        return size

    async def download_backup(self, backup: BackupTask, target: Path) -> int:
        """Check (HEAD) and download a Moodle backup (2.5).

        Args:
            backup: the backup; its URL must be a pluginfile URL of the job's
                Moodle.
            target: file to write; removed again on any failure.

        Returns:
            The number of bytes written.

        Raises:
            MoodleBadResponse: foreign URL, or a Content-Type other than
                ``application/vnd.moodle.backup``.
            DownloadTooLarge: Content-Length or the transfer passes
                ``backup_max_bytes``.
            MoodleRejected, MoodleUnavailable, ArchiveError: as for
                :meth:`download_attachment`.
        """
        limit = self._settings.backup_max_bytes
        with transfer.failures_logged("download", backup.download_url):
            transfer.check_file_url(self._base_url, backup.download_url, "backup", None)
            await transfer.check_backup_head(self._http(), self._route, backup, limit)
            return await transfer.download(
                self._http(),
                self._route,
                backup.download_url,
                target,
                limit=limit,
                stage="backup",
                item=None,
            )

    # --- upload ---------------------------------------------------------------

    async def upload_archive(self, archive: Path, *, sha256: str) -> None:
        """Upload the archive and have Moodle process it (2.6).

        The ZIP goes to ``upload.php`` as ``<archive_filename>.zip``.  When the
        job names a ``max_upload_bytes`` and the archive is larger, it is sent
        in parts ``<name>.zip.chunk%09d.bin`` of at most that size, streamed
        from disk, the first into a fresh draft item and the rest into the
        same one.  ``artifact_count`` is sent only for chunked uploads, except
        to archivingmod_assign, which requires it: released quiz_archiver and
        archivingmod_quiz versions reject the parameter (2.2.5, 2.3, 2.4).

        Args:
            archive: the ZIP file.
            sha256: lowercase hex SHA-256 of the whole archive.

        Raises:
            MoodleRejected: upload.php refused a file, or the process function
                answered an error object or a non-OK status.
            MoodleBadResponse: upload.php's answer lacks the file record.
            MoodleUnavailable: network error, HTTP 5xx or time limit.
        """
        name = f"{self._spec.archive_filename}.zip"
        size = (await asyncio.to_thread(archive.stat)).st_size
        parts = transfer.plan_parts(name, size, self._spec.moodle.max_upload_bytes)
        log.info(
            "moodle.upload.started bytes=%d parts=%d function=%s",
            size,
            len(parts),
            self._api.process,
        )
        with transfer.failures_logged("upload", self._spec.moodle.upload_url):
            upload = functools.partial(transfer.upload_part, self._http(), self._route)
            record = await upload(archive, parts[0], itemid=0)
            for part in parts[1:]:
                more = await upload(archive, part, itemid=record["itemid"])
                if more["itemid"] != record["itemid"]:
                    raise MoodleBadResponse(
                        f"upload.php stored part {part[0]} in another draft item",
                        stage="upload",
                    )
        filename = name if len(parts) > 1 else str(record["filename"])
        await self._process_artifact(record, filename, sha256.lower(), len(parts))
        log.info("moodle.upload.complete bytes=%d parts=%d", size, len(parts))

    async def _process_artifact(
        self, record: dict[str, Any], filename: str, sha256: str, count: int
    ) -> None:
        chunked = count > 1
        send_count = chunked or self._spec.flavour is Flavour.ARCHIVINGMOD_ASSIGN
        params = {
            **(
                {"jobid": self._spec.job_id}
                if self._is_quiz_archiver
                else self._task_ids()
            ),
            "artifact_component": record["component"],
            "artifact_contextid": record["contextid"],
            "artifact_userid": record["userid"],
            "artifact_filearea": record["filearea"],
            "artifact_filename": filename,
            "artifact_filepath": record["filepath"],
            "artifact_itemid": record["itemid"],
            "artifact_sha256sum": sha256,
            "artifact_count": count if send_count else None,
        }
        data = await self._call(
            self._api.process, params, stage="upload", long_running=True
        )
        if data.get("status") != "OK":
            raise MoodleRejected(
                f"{self._api.process} answered status {data.get('status')!r}",
                stage="upload",
            )

    @property
    def _is_quiz_archiver(self) -> bool:
        return self._spec.flavour is Flavour.QUIZ_ARCHIVER

    # --- transport --------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"moodle-archive-worker/{__version__}"},
                trust_env=False,
            )
        return self._session

    async def _call(
        self,
        wsfunction: str,
        params: Mapping[str, Any],
        *,
        stage: str,
        item: int | None = None,
        quirk: bool = False,
        long_running: bool = False,
    ) -> dict[str, Any]:
        """Call a wsfunction and return its answer object.

        Logs the call at DEBUG and any failure at WARNING, then re-raises it.
        """
        log.debug("moodle.call wsfunction=%s item=%s", wsfunction, item)
        started = time.monotonic()
        try:
            # The span names the function, never the URL: its query has the token.
            with telemetry.span(
                "moodle.call",
                kind=SpanKind.CLIENT,
                wsfunction=wsfunction,
                stage=stage,
                item=item,
            ):
                data = await wire.request(
                    self._http(),
                    self._route,
                    wsfunction,
                    params,
                    stage=stage,
                    item=item,
                    quirk=quirk,
                    long_running=long_running,
                )
        except MoodleError as exc:
            log.warning(
                "moodle.call.failed wsfunction=%s stage=%s item=%s error=%s",
                wsfunction,
                stage,
                item,
                exc.message,
            )
            raise
        log.debug(
            "moodle.call.complete wsfunction=%s item=%s duration_ms=%d",
            wsfunction,
            item,
            (time.monotonic() - started) * 1000,
        )

        return data
