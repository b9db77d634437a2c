"""The Moodle web service client of one archive job.

:class:`MoodleClient` speaks the web service API of the job's flavour
(contract section 2): the REST calls, the ``pluginfile.php`` downloads and the
``upload.php`` upload.  It is the only module that talks HTTP to Moodle, so it
is also the boundary where aiohttp's exceptions become ours
(:mod:`archive_worker.errors`):

* connection errors, timeouts and HTTP 5xx raise
  :class:`~archive_worker.errors.MoodleUnavailable` (transient);
* Moodle's error objects (``errorcode``/``exception``), HTTP 4xx and
  non-OK business statuses raise :class:`~archive_worker.errors.MoodleRejected`;
* answers of the wrong shape, type, content type, or with unsafe names raise
  :class:`~archive_worker.errors.MoodleBadResponse`;
* size limits raise :class:`~archive_worker.errors.DownloadTooLarge`, a wrong
  SHA-1 :class:`~archive_worker.errors.ChecksumMismatch`, a failed backup
  :class:`~archive_worker.errors.BackupFailed`.

Every error carries ``stage`` and, where there is one, ``attempt`` (the
attempt or submission id).  The token travels in query strings and form
fields only: messages and log lines use :func:`~archive_worker.errors.redact_url`,
and aiohttp's own exceptions are never chained, because some of them quote the
full request URL, token included.

Logging (logger ``archive_worker.moodle``): every call at DEBUG as
``moodle.call``, failures at WARNING as ``moodle.call.failed``, rejected status
updates at WARNING as ``moodle.status.rejected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from opentelemetry.trace import SpanKind

from . import __version__, telemetry
from .config import Settings
from .errors import (
    ArchiveError,
    BackupFailed,
    ChecksumMismatch,
    DownloadTooLarge,
    JobError,
    MoodleBadResponse,
    MoodleError,
    MoodleRejected,
    MoodleUnavailable,
    redact,
    redact_url,
)
from .jobs import BackupTask, Flavour, JobSpec, JobStatus

__all__ = ["Attachment", "MoodleClient", "Report", "encode_params"]

log = logging.getLogger(__name__)

#: Ids per metadata call.  All parameters travel in the query string, and the
#: reference worker's batch of 100 keeps URLs below common server limits
#: (contract 2.1.1).
METADATA_BATCH_SIZE = 100
#: Download and upload I/O unit.  The reference reads 320 MB at a time and can
#: overshoot its limit by that much; 1 MiB keeps the overshoot negligible.
IO_CHUNK_BYTES = 1 << 20
#: Downloads smaller than this are checked for a Moodle error object instead
#: of the file (contract 2.5; the reference's threshold).
ERROR_SNIFF_BYTES = 10_240
#: The only Content-Type Moodle serves backups with (contract 2.5).
BACKUP_CONTENT_TYPE = "application/vnd.moodle.backup"
PLUGINFILE_PATH = "/webservice/pluginfile.php/"
#: Characters Moodle removes from expanded folder names, and that we therefore
#: refuse (contract 2.2.2); file names also may not contain ``/``.
FOLDERNAME_FORBIDDEN = frozenset('\\.:;*?!"<>|\0')
FILENAME_FORBIDDEN = FOLDERNAME_FORBIDDEN | {"/"}
#: Moodle 4.3 can wrap report answers in stray tags; the reference strips
#: these character sets from both ends (contract 2.1.2).
REPORT_QUIRK_LEAD = "<html><body>"
REPORT_QUIRK_TAIL = "</body></html>"
#: Keys of an upload.php answer that process_uploaded_artifact needs (2.6).
UPLOAD_FILE_FIELDS = (
    "component",
    "contextid",
    "userid",
    "filearea",
    "filename",
    "filepath",
    "itemid",
)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_SHA1_HEX = re.compile(r"[0-9a-fA-F]{40}")
_ATTACHMENT_TYPE = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Attachment:
    """A file attached to an attempt or submission, as Moodle describes it.

    Attributes:
        group: quiz flavours: the slot number as text; assign: the type
            (``assignment``, ``submission``, ``feedback``, ``annotation``).
        filename: the file name, checked to be a single safe path segment.
        filesize: size in bytes according to Moodle.
        mimetype: Moodle's MIME type.
        contenthash: SHA-1 of the content, lowercase hex.
        download_url: a ``webservice/pluginfile.php`` URL of the job's Moodle.
        item_id: the attempt or submission the file belongs to.
    """

    group: str
    filename: str
    filesize: int
    mimetype: str
    contenthash: str
    download_url: str
    item_id: int | None = None


@dataclass(frozen=True)
class Report:
    """One attempt's or submission's report as Moodle generated it."""

    item_id: int
    foldername: str
    filename: str
    html: str
    attachments: list[Attachment]


@dataclass(frozen=True)
class _Api:
    """The wsfunction names and answer keys of one flavour."""

    status: str
    report: str
    metadata: str
    process: str
    #: ``attemptid`` or ``submissionid``: the item key of report answers.
    item_key: str
    #: ``attemptids`` or ``submissionids``: the metadata list parameter.
    ids_param: str
    #: ``attempts`` or ``submissions``: the metadata rows key.
    rows_key: str


_APIS = {
    Flavour.QUIZ_ARCHIVER: _Api(
        status="quiz_archiver_update_job_status",
        report="quiz_archiver_generate_attempt_report",
        metadata="quiz_archiver_get_attempts_metadata",
        process="quiz_archiver_process_uploaded_artifact",
        item_key="attemptid",
        ids_param="attemptids",
        rows_key="attempts",
    ),
    Flavour.ARCHIVINGMOD_QUIZ: _Api(
        status="archivingmod_quiz_update_task_status",
        report="archivingmod_quiz_generate_attempt_report",
        metadata="archivingmod_quiz_get_attempts_metadata",
        process="archivingmod_quiz_process_uploaded_artifact",
        item_key="attemptid",
        ids_param="attemptids",
        rows_key="attempts",
    ),
    Flavour.ARCHIVINGMOD_ASSIGN: _Api(
        status="archivingmod_assign_update_task_status",
        report="archivingmod_assign_generate_submission_report",
        metadata="archivingmod_assign_get_submissions_metadata",
        process="archivingmod_assign_process_uploaded_artifact",
        item_key="submissionid",
        ids_param="submissionids",
        rows_key="submissions",
    ),
}
BACKUP_STATUS_FUNCTION = "quiz_archiver_get_backup_status"


def encode_params(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Encode function parameters the way PHP decodes them (contract 2.1.1).

    Scalars become ``name=value``, sequences ``name[]=v`` per element and
    mappings ``name[key]=v`` per key.  Booleans become ``1``/``0``, never
    ``True``/``False``; ``None`` values are left out.

    Args:
        params: parameter names and values, in the order to send them.

    Returns:
        The query pairs.

    Raises:
        TypeError: a value is of a type Moodle has no encoding for.
    """
    pairs: list[tuple[str, str]] = []
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            pairs.extend((f"{name}[{k}]", _scalar(v)) for k, v in value.items())
        elif isinstance(value, list | tuple):
            pairs.extend((f"{name}[]", _scalar(v)) for v in value)
        else:
            pairs.append((name, _scalar(value)))

    return pairs


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | str):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} for Moodle")


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
        self._api = _APIS[spec.flavour]
        self._session = session
        self._owns_session = session is None
        self._base_url = spec.moodle.base_url.rstrip("/")
        self._ssl = not settings.skip_https_cert_validation
        self._proxy = _proxy_for(settings, self._base_url)
        self._call_timeout = aiohttp.ClientTimeout(
            connect=settings.http_connect_timeout_s,
            sock_connect=settings.http_connect_timeout_s,
            sock_read=settings.http_read_timeout_s,
        )
        # Downloads keep the read timeout to detect a stalled transfer.  Moodle
        # may be silent for minutes while it stores or reassembles and hashes
        # a large upload (the reference allows 1800 s there), so upload.php
        # and process_uploaded_artifact only have the total limit.
        self._download_timeout = aiohttp.ClientTimeout(
            total=settings.http_transfer_timeout_s,
            connect=settings.http_connect_timeout_s,
            sock_connect=settings.http_connect_timeout_s,
            sock_read=settings.http_read_timeout_s,
        )
        self._upload_timeout = aiohttp.ClientTimeout(
            total=settings.http_transfer_timeout_s,
            connect=settings.http_connect_timeout_s,
            sock_connect=settings.http_connect_timeout_s,
        )

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

        return self._parse_report(data, item_id)

    def _parse_report(self, data: dict[str, Any], item_id: int) -> Report:
        api, spec = self._api, self._spec

        def bad(problem: str) -> MoodleBadResponse:
            return MoodleBadResponse(
                f"{api.report} returned {problem} for {spec.item_kind} {item_id}",
                stage="report",
                attempt=item_id,
            )

        status = data.get("status")
        if status != "OK" and (status is not None or not self._is_quiz):
            raise MoodleRejected(
                f"{api.report} answered status {status!r} for "
                f"{spec.item_kind} {item_id}",
                stage="report",
                attempt=item_id,
            )
        expected: dict[str, int | None] = {api.item_key: item_id}
        if spec.flavour is Flavour.QUIZ_ARCHIVER:
            expected |= {"courseid": spec.courseid, "cmid": spec.cmid}
            expected |= {"quizid": spec.quizid}
        keys = [*expected, "foldername", "filename", "report", "attachments"]
        missing = [key for key in keys if key not in data]
        if missing:
            raise bad(f"an incomplete response (missing {', '.join(missing)})")
        for key, value in expected.items():
            if not _is_int(data[key]) or data[key] != value:
                raise bad(f"{key}={data[key]!r} where {value!r} was expected")
        for key in ("foldername", "filename", "report"):
            if not isinstance(data[key], str):
                raise bad(f"a {key} that is not a string")
        if not isinstance(data["attachments"], list):
            raise bad("an attachment list that is not a list")
        for key, check in (
            ("foldername", _folder_problem),
            ("filename", _file_problem),
        ):
            problem = check(data[key])
            if problem:
                raise bad(f"an unsafe {key} {_shorten(data[key])}: {problem}")
        attachments = [
            self._parse_attachment(entry, item_id, bad) for entry in data["attachments"]
        ]

        return Report(
            item_id=item_id,
            foldername=data["foldername"],
            filename=data["filename"],
            html=data["report"],
            attachments=attachments,
        )

    def _parse_attachment(
        self, entry: object, item_id: int, bad: Callable[[str], MoodleBadResponse]
    ) -> Attachment:
        group_key = "slot" if self._is_quiz else "type"
        keys = (group_key, "filename", "filesize", "mimetype", "contenthash")
        if not isinstance(entry, dict) or any(k not in entry for k in keys):
            raise bad("an attachment entry of the wrong shape")
        group = entry[group_key]
        if self._is_quiz and not _is_int(group):
            raise bad("an attachment slot that is not an integer")
        if not self._is_quiz and not (
            isinstance(group, str) and _ATTACHMENT_TYPE.fullmatch(group)
        ):
            raise bad(f"an invalid attachment type {_shorten(group)}")
        name, url = entry["filename"], entry.get("downloadurl")
        problem = _attachment_name_problem(name)
        if problem:
            raise bad(f"an unsafe attachment filename {_shorten(name)}: {problem}")
        if not _is_int(entry["filesize"]) or entry["filesize"] < 0:
            raise bad(f"an invalid size for attachment {_shorten(name)}")
        if not isinstance(entry["mimetype"], str):
            raise bad(f"an invalid mimetype for attachment {_shorten(name)}")
        digest = entry["contenthash"]
        if not isinstance(digest, str) or not _SHA1_HEX.fullmatch(digest):
            raise bad(f"an invalid contenthash for attachment {_shorten(name)}")
        if not isinstance(url, str) or not self._is_pluginfile_url(url):
            raise bad(f"a download URL outside this Moodle for {_shorten(name)}")

        return Attachment(
            group=str(group),
            filename=name,
            filesize=entry["filesize"],
            mimetype=entry["mimetype"],
            contenthash=digest.lower(),
            download_url=url,
            item_id=item_id,
        )

    @property
    def _is_quiz(self) -> bool:
        return self._spec.flavour is not Flavour.ARCHIVINGMOD_ASSIGN

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
            rows.extend(self._parse_metadata(data))

        return rows

    def _parse_metadata(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        api, spec = self._api, self._spec

        def bad(problem: str) -> MoodleBadResponse:
            return MoodleBadResponse(
                f"{api.metadata} returned {problem}", stage="metadata"
            )

        if data.get("status") != "OK":
            raise MoodleRejected(
                f"{api.metadata} answered status {data.get('status')!r}",
                stage="metadata",
            )
        rows = data.get(api.rows_key)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise bad(f"no valid {api.rows_key} list")
        if spec.flavour is Flavour.QUIZ_ARCHIVER:
            for key in ("courseid", "cmid", "quizid"):
                if data.get(key) != getattr(spec, key):
                    raise bad(f"{key}={data.get(key)!r}, not the job's")

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
        with _failures_logged("download", attachment.download_url):
            self._check_file_url(attachment.download_url, "attachments", item)
            digest = hashlib.sha1(usedforsecurity=False)
            size = await self._download(
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
                    f"attachment {_shorten(attachment.filename)}: SHA-1 "
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
        with _failures_logged("download", backup.download_url):
            self._check_file_url(backup.download_url, "backup", None)
            await self._check_backup_head(backup)
            return await self._download(
                backup.download_url,
                target,
                limit=self._settings.backup_max_bytes,
                stage="backup",
                item=None,
            )

    async def _check_backup_head(self, backup: BackupTask) -> None:
        url = backup.download_url
        try:
            async with self._http().head(
                url,
                params=[("token", self._spec.moodle.token)],
                allow_redirects=True,
                timeout=self._call_timeout,
                proxy=self._proxy,
                ssl=self._ssl,
            ) as resp:
                await self._check_http_status(resp, "HEAD backup", "backup", None)
                content_type = resp.headers.get("Content-Type", "")
                length = resp.content_length
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable("HEAD backup", exc, "backup", None) from None
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != BACKUP_CONTENT_TYPE:
            raise MoodleBadResponse(
                f"backup {backup.filename}: Content-Type {content_type!r} is not "
                f"{BACKUP_CONTENT_TYPE}",
                stage="backup",
            )
        if length is None:
            log.warning("moodle.backup.no_length url=%s", redact_url(url))
        elif length > self._settings.backup_max_bytes:
            raise DownloadTooLarge(
                f"backup {backup.filename} has {length} bytes, more than the "
                f"limit of {self._settings.backup_max_bytes}",
                stage="backup",
            )

    def _check_file_url(self, url: str, stage: str, item: int | None) -> None:
        if not self._is_pluginfile_url(url):
            raise MoodleBadResponse(
                f"refusing to download {redact_url(url)}: not a "
                f"{PLUGINFILE_PATH} URL of {self._base_url}",
                stage=stage,
                attempt=item,
            )

    def _is_pluginfile_url(self, url: str) -> bool:
        """True if ``url`` stays inside this Moodle's pluginfile.php (SSRF guard)."""
        prefix = self._base_url + PLUGINFILE_PATH
        if not url.startswith(prefix) or _CONTROL_CHARS.search(url) or "\\" in url:
            return False
        path = urlsplit(url).path[len(urlsplit(prefix).path) :]
        segments = [unquote(s) for s in path.split("/")]

        return not any(s in (".", "..") or "/" in s or "\\" in s for s in segments)

    async def _download(
        self,
        url: str,
        target: Path,
        *,
        limit: int,
        stage: str,
        item: int | None,
        digest: Any = None,
    ) -> int:
        """GET a pluginfile URL into ``target``; removes the file on failure."""
        log.debug(
            "moodle.download.started stage=%s item=%s url=%s",
            stage,
            item,
            redact_url(url),
        )
        started = time.monotonic()
        done = False
        try:
            async with self._http().get(
                url,
                params=[("token", self._spec.moodle.token), ("forcedownload", "1")],
                timeout=self._download_timeout,
                proxy=self._proxy,
                ssl=self._ssl,
            ) as resp:
                await self._check_http_status(resp, "download", stage, item)
                size, head = await self._stream_to_file(
                    resp, target, limit, stage, item, digest
                )
            if head is not None:
                _sniff_error_object(head, "download", stage, item)
            done = True
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable("download", exc, stage, item) from None
        finally:
            if not done:
                await asyncio.to_thread(target.unlink, missing_ok=True)
        log.debug(
            "moodle.download.complete stage=%s item=%s bytes=%d duration_ms=%d",
            stage,
            item,
            size,
            (time.monotonic() - started) * 1000,
        )

        return size

    async def _stream_to_file(
        self,
        resp: aiohttp.ClientResponse,
        target: Path,
        limit: int,
        stage: str,
        item: int | None,
        digest: Any,
    ) -> tuple[int, bytes | None]:
        """Write the body to ``target``; returns its size, and itself if small."""
        what = f"download of {target.name}"
        if resp.content_length is not None and resp.content_length > limit:
            raise _too_large(what, resp.content_length, limit, stage, item)
        head = bytearray()
        total = 0
        sink = await _Sink.open(target, stage, item)
        try:
            async for chunk in resp.content.iter_chunked(IO_CHUNK_BYTES):
                total += len(chunk)
                if total > limit:
                    resp.close()
                    raise _too_large(what, total, limit, stage, item)
                if digest is not None:
                    digest.update(chunk)
                if total <= ERROR_SNIFF_BYTES:
                    head += chunk
                await sink.write(chunk)
        finally:
            await sink.close()

        return total, (bytes(head) if total <= ERROR_SNIFF_BYTES else None)

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
        parts = _plan_parts(name, size, self._spec.moodle.max_upload_bytes)
        log.info(
            "moodle.upload.started bytes=%d parts=%d function=%s",
            size,
            len(parts),
            self._api.process,
        )
        with _failures_logged("upload", self._spec.moodle.upload_url):
            record = await self._upload_part(archive, parts[0], itemid=0)
            for part in parts[1:]:
                more = await self._upload_part(archive, part, itemid=record["itemid"])
                if more["itemid"] != record["itemid"]:
                    raise MoodleBadResponse(
                        f"upload.php stored part {part[0]} in another draft item",
                        stage="upload",
                    )
        filename = name if len(parts) > 1 else str(record["filename"])
        await self._process_artifact(record, filename, sha256.lower(), len(parts))
        log.info("moodle.upload.complete bytes=%d parts=%d", size, len(parts))

    async def _upload_part(
        self, archive: Path, part: tuple[str, int, int], *, itemid: object
    ) -> dict[str, Any]:
        part_name, offset, length = part
        with aiohttp.MultipartWriter("form-data") as form:
            for field, value in (
                ("token", self._spec.moodle.token),
                ("filepath", "/"),
                ("itemid", str(itemid)),
            ):
                form.append(value).set_content_disposition("form-data", name=field)
            # PHP takes the file name literally: percent-encoding it (aiohttp's
            # default) would store "Reference%20Quiz.zip" in Moodle.
            payload = _FileSlicePayload(archive, offset, length)
            payload.set_content_disposition(
                "form-data", quote_fields=False, name="file_1", filename=part_name
            )
            form.append_payload(payload)
        log.debug("moodle.upload.part name=%s bytes=%d", part_name, length)
        try:
            async with self._http().post(
                self._spec.moodle.upload_url,
                data=form,
                timeout=self._upload_timeout,
                proxy=self._proxy,
                ssl=self._ssl,
            ) as resp:
                await self._check_http_status(resp, "upload.php", "upload", None)
                body = await self._read_body(resp, "upload.php", "upload", None)
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable("upload.php", exc, "upload", None) from None
        data = _decode_json(body, "upload.php", "upload", None)

        return _parse_upload_answer(data, part_name)

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
                data = await self._request(
                    wsfunction,
                    params,
                    stage,
                    item,
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

    async def _request(
        self,
        wsfunction: str,
        params: Mapping[str, Any],
        stage: str,
        item: int | None,
        *,
        quirk: bool,
        long_running: bool,
    ) -> dict[str, Any]:
        query = [
            ("wstoken", self._spec.moodle.token),
            ("moodlewsrestformat", "json"),
            ("wsfunction", wsfunction),
            *encode_params(params),
        ]
        try:
            async with self._http().get(
                self._spec.moodle.ws_url,
                params=query,
                timeout=self._upload_timeout if long_running else self._call_timeout,
                proxy=self._proxy,
                ssl=self._ssl,
            ) as resp:
                await self._check_http_status(resp, wsfunction, stage, item)
                if resp.content_type != "application/json":
                    raise MoodleBadResponse(
                        f"{wsfunction} answered Content-Type {resp.content_type!r}, "
                        "not JSON",
                        stage=stage,
                        attempt=item,
                    )
                body = await self._read_body(resp, wsfunction, stage, item)
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(wsfunction, exc, stage, item) from None
        if quirk:
            body = body.strip().lstrip(REPORT_QUIRK_LEAD.encode())
            body = body.rstrip(REPORT_QUIRK_TAIL.encode())
        data = _decode_json(body, wsfunction, stage, item)
        if not isinstance(data, dict):
            raise MoodleBadResponse(
                f"{wsfunction} answered {type(data).__name__}, not an object",
                stage=stage,
                attempt=item,
            )
        _raise_for_error_object(data, wsfunction, stage, item)

        return data

    async def _read_body(
        self, resp: aiohttp.ClientResponse, what: str, stage: str, item: int | None
    ) -> bytes:
        """Read a whole answer, at most ``report_max_bytes`` of it."""
        limit = self._settings.report_max_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise _too_large(
                f"answer of {what}", resp.content_length, limit, stage, item
            )
        body = bytearray()
        async for chunk in resp.content.iter_chunked(IO_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                resp.close()
                raise _too_large(f"answer of {what}", len(body), limit, stage, item)

        return bytes(body)

    async def _check_http_status(
        self, resp: aiohttp.ClientResponse, what: str, stage: str, item: int | None
    ) -> None:
        if resp.status < 400:
            return
        if resp.status >= 500:
            raise MoodleUnavailable(
                f"{what}: Moodle answered HTTP {resp.status}", stage=stage, attempt=item
            )
        detail = ""
        if (resp.content_length or 0) <= ERROR_SNIFF_BYTES:
            try:
                body = await resp.content.read(ERROR_SNIFF_BYTES)
                detail = _error_object_text(json.loads(body))
            except (ValueError, aiohttp.ClientError, OSError):
                pass  # the status code alone is the message
        raise MoodleRejected(
            f"{what}: Moodle answered HTTP {resp.status}{detail}",
            stage=stage,
            attempt=item,
        )


# --- helpers -------------------------------------------------------------------


@contextlib.contextmanager
def _failures_logged(what: str, url: str) -> Iterator[None]:
    """Log a JobError leaving the block at WARNING, then let it go on."""
    try:
        yield
    except JobError as exc:
        log.warning(
            "moodle.transfer.failed what=%s stage=%s item=%s url=%s error=%s",
            what,
            exc.stage,
            exc.attempt,
            redact_url(url),
            exc.message,
        )
        raise


class _Sink:
    """A file written from the event loop without blocking it."""

    def __init__(self, fh: IO[bytes], stage: str, item: int | None) -> None:
        self._fh = fh
        self._stage = stage
        self._item = item

    @classmethod
    async def open(cls, target: Path, stage: str, item: int | None) -> _Sink:
        try:
            fh = await asyncio.to_thread(target.open, "wb")
        except OSError as exc:
            raise ArchiveError(
                f"cannot write {target.name}: {exc.strerror}", stage=stage, attempt=item
            ) from exc
        return cls(fh, stage, item)

    async def write(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._fh.write, data)
        except OSError as exc:
            raise ArchiveError(
                f"cannot write {Path(self._fh.name).name}: {exc.strerror}",
                stage=self._stage,
                attempt=self._item,
            ) from exc

    async def close(self) -> None:
        await asyncio.to_thread(self._fh.close)


class _FileSlicePayload(Payload):
    """``length`` bytes of a file from ``offset``, read in chunks off the loop."""

    _autoclose = True

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__(path, content_type="application/octet-stream")
        self._path = path
        self._offset = offset
        self._length = length
        self._size = length

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file slice has no text form")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        remaining = self._length
        if content_length is not None:
            remaining = min(remaining, content_length)
        fh = await asyncio.to_thread(self._path.open, "rb")
        try:
            await asyncio.to_thread(fh.seek, self._offset)
            while remaining > 0:
                chunk = await asyncio.to_thread(fh.read, min(IO_CHUNK_BYTES, remaining))
                if not chunk:
                    raise OSError(f"{self._path.name} shrank during the upload")
                await writer.write(chunk)
                remaining -= len(chunk)
        finally:
            await asyncio.to_thread(fh.close)


def _plan_parts(
    name: str, size: int, max_upload_bytes: int | None
) -> list[tuple[str, int, int]]:
    """Split an upload into ``(part name, offset, length)`` parts (2.6)."""
    if not max_upload_bytes or max_upload_bytes <= 0 or size <= max_upload_bytes:
        return [(name, 0, size)]
    count = math.ceil(size / max_upload_bytes)

    return [
        (
            f"{name}.chunk{index:09d}.bin",
            index * max_upload_bytes,
            min(max_upload_bytes, size - index * max_upload_bytes),
        )
        for index in range(count)
    ]


def _parse_upload_answer(data: object, part_name: str) -> dict[str, Any]:
    def bad(problem: str) -> MoodleBadResponse:
        return MoodleBadResponse(
            f"upload.php {problem} for {part_name}", stage="upload"
        )

    if isinstance(data, dict):
        _raise_for_error_object(data, "upload.php", "upload", None)
        raise bad("answered an object instead of a file list")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise bad("answered no file record")
    record: dict[str, Any] = data[0]
    if "error" in record or "errortype" in record:
        raise MoodleRejected(
            f"upload.php refused {part_name}: {record.get('errortype')}: "
            f"{record.get('error')}",
            stage="upload",
        )
    missing = [key for key in UPLOAD_FILE_FIELDS if key not in record]
    if missing:
        raise bad(f"answered a record without {', '.join(missing)}")
    for key in ("contextid", "userid", "itemid"):
        if not (_is_int(record[key]) or str(record[key]).isdigit()):
            raise bad(f"answered a non-numeric {key}")
    for key in ("component", "filearea", "filename", "filepath"):
        if not isinstance(record[key], str):
            raise bad(f"answered a {key} that is not a string")

    return record


def _decode_json(body: bytes, what: str, stage: str, item: int | None) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MoodleBadResponse(
            f"{what} answered something that is not JSON: {_shorten(body[:80])}",
            stage=stage,
            attempt=item,
        ) from None


def _sniff_error_object(head: bytes, what: str, stage: str, item: int | None) -> None:
    """Raise MoodleRejected if a small download is a Moodle error object."""
    try:
        data = json.loads(head)
    except ValueError:
        return
    if isinstance(data, dict):
        _raise_for_error_object(data, what, stage, item)


def _unavailable(
    what: str, exc: BaseException, stage: str, item: int | None
) -> MoodleUnavailable:
    return MoodleUnavailable(f"{what}: {_describe(exc)}", stage=stage, attempt=item)


def _raise_for_error_object(
    data: Mapping[str, Any], what: str, stage: str, item: int | None
) -> None:
    """Raise MoodleRejected if ``data`` is one of Moodle's error objects (2.1.2)."""
    if "errorcode" in data or "exception" in data:
        raise MoodleRejected(
            f"{what} failed{_error_object_text(data)}", stage=stage, attempt=item
        )


def _error_object_text(data: object) -> str:
    if not isinstance(data, Mapping) or not (
        "errorcode" in data or "exception" in data
    ):
        return ""
    code = data.get("errorcode") or data.get("exception")
    message = data.get("message") or data.get("error") or ""

    return f": Moodle error {code}: {message}".rstrip(": ")


def _too_large(
    what: str, size: int, limit: int, stage: str, item: int | None
) -> DownloadTooLarge:
    return DownloadTooLarge(
        f"{what} exceeds the limit of {limit} bytes (at least {size})",
        stage=stage,
        attempt=item,
    )


def _describe(exc: BaseException) -> str:
    """Name an aiohttp or OS error without any URL it may quote."""
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "no data within the read timeout (stalled)"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connection timed out"
    if isinstance(exc, TimeoutError):
        return "time limit exceeded"
    text = redact(str(exc)).split(" for url", 1)[0]
    for secret_url in re.findall(r"https?://\S+", text):
        text = text.replace(secret_url, redact_url(secret_url))

    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _folder_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if _CONTROL_CHARS.search(name):
        return "it contains control characters"
    forbidden = sorted(set(name) & FOLDERNAME_FORBIDDEN)
    if forbidden:
        return f"it contains {''.join(forbidden)!r}"
    if name.startswith("/") or name.endswith("/"):
        return "it starts or ends with '/'"
    if any(segment in ("", ".", "..") for segment in name.split("/")):
        return "it has an empty or relative path segment"
    return None


def _file_problem(name: str) -> str | None:
    if "/" in name:
        return "it contains '/'"
    return _folder_problem(name)


def _attachment_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "it is empty or not a string"
    if name in (".", ".."):
        return "it is a relative path"
    if _CONTROL_CHARS.search(name):
        return "it contains control characters"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shorten(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _proxy_for(settings: Settings, base_url: str) -> str | None:
    """The proxy for this Moodle, unless its host is in the bypass list."""
    if not settings.proxy_server_url:
        return None
    host = (urlsplit(base_url).hostname or "").lower()
    for entry in settings.proxy_bypass_domains:
        domain = entry.strip().lower().lstrip(".")
        if domain == "*" or host == domain or host.endswith("." + domain):
            return None
    return settings.proxy_server_url
