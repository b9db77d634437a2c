"""The exception tree of the service.

Every error we raise derives from :class:`ArchiveWorkerError`::

    ArchiveWorkerError
    ├── ConfigError                 bad configuration value (names key and value)
    ├── BrokerError                 NATS / JetStream trouble
    │   ├── BrokerUnavailable       not connected, timed out
    │   └── QueueFull               the jobs stream refused a message (429)
    └── JobError                    a job cannot go on; carries stage and attempt
        ├── MoodleError             Moodle answered wrongly or not at all
        │   ├── MoodleUnavailable   network error, 5xx, timeout (transient)
        │   ├── MoodleRejected      errorcode/exception object, non-OK status
        │   ├── MoodleBadResponse   wrong shape, type, content type, name
        │   ├── DownloadTooLarge    a file or report over its limit
        │   ├── ChecksumMismatch    SHA-1 of an attachment differs
        │   └── BackupFailed        Moodle says the backup failed
        ├── RenderError             Chromium could not produce the PDF
        │   └── BrowserCrashed      the browser died (the page is retried)
        ├── PostprocessError        Ghostscript / image optimisation failed
        ├── ArchiveError            the archive could not be written
        ├── JobTimeout              the job's own time limit passed
        └── JobCanceled             an operator canceled the job

``JobError.transient`` tells the consumer whether another delivery may help
(``nak`` with a delay) or not (``term`` and report FAILED).  Messages never
contain a Moodle token: callers pass URLs through :func:`redact_url`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Query parameters that carry Moodle credentials.
SECRET_QUERY_KEYS = frozenset({"token", "wstoken"})


class ArchiveWorkerError(Exception):
    """Root of every error this service raises."""


class ConfigError(ArchiveWorkerError):
    """A configuration value is missing or invalid.

    Raised at start-up; the message names the key and the offending value
    (masked when the key is a secret).
    """

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f"invalid configuration {key}={value!r}: {reason}")


class BrokerError(ArchiveWorkerError):
    """NATS or JetStream did not do what we asked."""


class BrokerUnavailable(BrokerError):
    """Not connected to NATS, or a request to JetStream timed out."""


class QueueFull(BrokerError):
    """The jobs stream is at its limit and refused a new job."""


class JobError(ArchiveWorkerError):
    """A job cannot continue.

    Attributes:
        stage: the pipeline stage that failed (``report``, ``render``, ...).
        attempt: the attempt or submission id concerned, if any.
        transient: True when a later delivery may succeed.
        code: a short machine-readable error code for status events.
    """

    transient = False
    code = "job_error"

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        attempt: int | None = None,
    ) -> None:
        super().__init__(redact(message))
        self.stage = stage
        self.attempt = attempt

    @property
    def message(self) -> str:
        """The error text without stage and attempt."""
        return str(self.args[0]) if self.args else ""

    def describe(self) -> str:
        """One line naming stage, attempt and cause."""
        where = []
        if self.stage:
            where.append(f"stage {self.stage}")
        if self.attempt is not None:
            where.append(f"item {self.attempt}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return f"{prefix}{self.message}"


class MoodleError(JobError):
    """Moodle answered wrongly or not at all."""

    code = "moodle_error"


class MoodleUnavailable(MoodleError):
    """Moodle could not be reached, answered 5xx, or timed out."""

    transient = True
    code = "moodle_unavailable"


class MoodleRejected(MoodleError):
    """Moodle answered with an error object or a non-OK business status."""

    code = "moodle_rejected"


class MoodleBadResponse(MoodleError):
    """Moodle's answer has the wrong shape, type, content type or a bad name."""

    code = "moodle_bad_response"


class DownloadTooLarge(MoodleError):
    """A download or report exceeded its configured size limit."""

    code = "download_too_large"


class ChecksumMismatch(MoodleError):
    """A downloaded attachment does not match Moodle's content hash."""

    code = "checksum_mismatch"


class BackupFailed(MoodleError):
    """Moodle reports that a backup failed or does not exist."""

    code = "backup_failed"


class RenderError(JobError):
    """Chromium could not render a report to PDF."""

    code = "render_failed"


class BrowserCrashed(RenderError):
    """The browser process died while rendering."""

    transient = True
    code = "browser_crashed"


class PostprocessError(JobError):
    """PDF/A conversion or image optimisation failed."""

    code = "postprocess_failed"


class ArchiveError(JobError):
    """The archive could not be assembled."""

    code = "archive_failed"


class JobTimeout(JobError):
    """The job ran past its own time limit."""

    code = "timeout"


class JobCanceled(JobError):
    """An operator canceled the job."""

    code = "canceled"


_SECRET_IN_TEXT = re.compile(r"((?:ws)?token=)[^&\s'\"]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Mask ``token=`` / ``wstoken=`` values anywhere in ``text``."""
    return _SECRET_IN_TEXT.sub(r"\1***", text)


def redact_url(url: str) -> str:
    """Return ``url`` with credential query parameters masked."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(k.lower() in SECRET_QUERY_KEYS for k, _ in pairs):
        return url
    query = [(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))
