"""The job as it travels from the bridge to a worker, and its status vocabulary.

The bridge turns each flavour's request body into one normalised
:class:`JobSpec`; the worker only ever sees that type.  The spec carries the
Moodle token (it must, the worker calls Moodle with it), so it is encoded only
into the job message on ``ARCHIVE_JOBS`` and its ``repr`` masks the token.
"""

from __future__ import annotations

import enum
import hashlib
import uuid
from typing import Any

import msgspec

#: Version of the job message layout; a worker refuses versions it does not know.
JOB_SCHEMA_VERSION = 1

#: Namespace for job ids derived from the job (uuid5); fixed forever, so that
#: a retried submission maps to the same id across releases.
_JOB_ID_NAMESPACE = uuid.UUID("5f0b6c52-8f69-4a1e-9a43-3d8a3cfd2a77")


class Flavour(enum.StrEnum):
    """The three Moodle plugin APIs the bridge speaks."""

    QUIZ_ARCHIVER = "quiz_archiver"
    ARCHIVINGMOD_QUIZ = "archivingmod_quiz"
    ARCHIVINGMOD_ASSIGN = "archivingmod_assign"

    @property
    def api_version(self) -> int:
        """The ``api_version`` the plugin sends (contract 1.8-1.10)."""
        return 7 if self is Flavour.QUIZ_ARCHIVER else 1

    @property
    def uses_task_status_codes(self) -> bool:
        """True for local_archiving drivers, which take numeric task states."""
        return self is not Flavour.QUIZ_ARCHIVER


class JobStatus(enum.StrEnum):
    """Worker-side job states in lifecycle order (contract 1.6).

    ``CANCELED`` is ours: an operator canceled the job.  quiz_archiver has no
    such state, so it is reported to that plugin as ``FAILED``.
    """

    UNINITIALIZED = "UNINITIALIZED"
    AWAITING_PROCESSING = "AWAITING_PROCESSING"
    RUNNING = "RUNNING"
    WAITING_FOR_BACKUP = "WAITING_FOR_BACKUP"
    FINALIZING = "FINALIZING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELED = "CANCELED"

    @property
    def is_terminal(self) -> bool:
        """True once the job can change no more."""
        return self in _TERMINAL

    @property
    def task_status_code(self) -> int:
        """local_archiving ``activity_archiving_task_status`` value (1.6)."""
        return _TASK_STATUS_CODES.get(self, 255)

    @property
    def quiz_archiver_value(self) -> str:
        """The string quiz_archiver stores for this state."""
        return JobStatus.FAILED.value if self is JobStatus.CANCELED else self.value


_TERMINAL = frozenset(
    {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELED}
)

_TASK_STATUS_CODES = {
    JobStatus.UNINITIALIZED: 20,
    JobStatus.AWAITING_PROCESSING: 40,
    JobStatus.RUNNING: 100,
    JobStatus.WAITING_FOR_BACKUP: 200,
    JobStatus.FINALIZING: 200,
    JobStatus.FINISHED: 220,
    JobStatus.CANCELED: 240,
    JobStatus.FAILED: 250,
    JobStatus.TIMEOUT: 251,
}


#: Paper formats as Chromium names them; requests may use either spelling
#: (contract 1.8.3 DISCREPANCY: the old worker wanted ``LETTER``, Moodle sends
#: ``Letter``), case-insensitively.
PAPER_FORMATS = (
    "A0",
    "A1",
    "A2",
    "A3",
    "A4",
    "A5",
    "A6",
    "Letter",
    "Legal",
    "Tabloid",
    "Ledger",
)
_PAPER_BY_KEY = {name.upper(): name for name in PAPER_FORMATS}


def normalise_paper_format(value: object) -> str | None:
    """Return Chromium's spelling of ``value``, or None if it is not a format."""
    if not isinstance(value, str):
        return None
    return _PAPER_BY_KEY.get(value.strip().upper())


class MoodleEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how to reach the Moodle that submitted the job."""

    base_url: str
    ws_url: str
    upload_url: str
    token: str
    #: Moodle's upload limit; larger archives are uploaded in chunks (2.6).
    max_upload_bytes: int | None = None

    def __repr__(self) -> str:
        return (
            f"MoodleEndpoint(base_url={self.base_url!r}, ws_url={self.ws_url!r}, "
            f"upload_url={self.upload_url!r}, token='***', "
            f"max_upload_bytes={self.max_upload_bytes!r})"
        )


class ImageOptimize(msgspec.Struct, frozen=True):
    """Shrink and re-encode images in rendered PDFs (contract 3.7)."""

    width: int
    height: int
    quality: int


class ReportTask(msgspec.Struct, frozen=True, kw_only=True):
    """Render one report per attempt (quiz) or submission (assign)."""

    #: Attempt ids (quiz flavours) or submission ids (assign), in order.
    ids: list[int]
    #: Report sections, forwarded to Moodle as ``sections[<key>]=<value>``.
    #: Values are already in the wire form of the flavour ("1"/"0" or 1/0).
    sections: dict[str, str | int]
    paper_format: str
    keep_html_files: bool
    fetch_metadata: bool
    fetch_attachments: bool
    foldername_pattern: str
    filename_pattern: str
    image_optimize: ImageOptimize | None = None
    #: Assign only: attachment type -> download it (missing type = download).
    attachment_types: dict[str, bool] | None = None


class BackupTask(msgspec.Struct, frozen=True, kw_only=True):
    """A Moodle backup to wait for and download (quiz_archiver only)."""

    backupid: str
    filename: str
    download_url: str


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker needs to archive one job, whatever the flavour."""

    schema_version: int = JOB_SCHEMA_VERSION
    job_id: str
    flavour: Flavour
    moodle: MoodleEndpoint
    archive_filename: str
    #: quiz_archiver identifies the quiz by these three ids ...
    courseid: int | None = None
    cmid: int | None = None
    quizid: int | None = None
    #: ... local_archiving by its task id.
    taskid: int | None = None
    reports: ReportTask | None = None
    backups: list[BackupTask] = []
    #: Flat archive layout instead of folders (3.13.2).
    archive_flatten: bool = False
    #: Write ``.sha256`` sidecars (3.12).
    archive_filehashes: bool = True
    #: Unix time the bridge accepted the job.
    submitted_at: float = 0.0

    @property
    def item_kind(self) -> str:
        """``attempt`` or ``submission``: what one report is about."""
        return (
            "submission" if self.flavour is Flavour.ARCHIVINGMOD_ASSIGN else "attempt"
        )

    def moodle_ref(self) -> MoodleRef:
        """The token-free identity of this job in Moodle."""
        return MoodleRef(
            base_url=self.moodle.base_url,
            courseid=self.courseid,
            cmid=self.cmid,
            quizid=self.quizid,
            taskid=self.taskid,
        )


class MoodleRef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Which Moodle object a job archives; safe to publish (no token)."""

    base_url: str
    courseid: int | None = None
    cmid: int | None = None
    quizid: int | None = None
    taskid: int | None = None


def job_identity(flavour: Flavour, base_url: str, token: str) -> tuple[str, str]:
    """Derive ``(job_id, msg_id)`` from what makes a submission unique.

    Moodle creates a fresh web service token for every job, so flavour, site
    and token identify a submission: a retried POST of the same job yields the
    same id, and JetStream's duplicate window then drops the second message.
    Only a one-way hash of the token leaves this function.
    """
    digest = hashlib.sha256(
        "\x00".join((flavour.value, base_url.rstrip("/"), token)).encode()
    ).hexdigest()
    job_id = str(uuid.uuid5(_JOB_ID_NAMESPACE, digest))

    return job_id, f"job-{digest[:40]}"


_job_encoder = msgspec.json.Encoder()
_job_decoder = msgspec.json.Decoder(JobSpec)


def encode_job(spec: JobSpec) -> bytes:
    """Serialise a job for the jobs stream."""
    return _job_encoder.encode(spec)


def decode_job(data: bytes) -> JobSpec:
    """Parse a job message; raises ``msgspec.ValidationError`` when malformed."""
    return _job_decoder.decode(data)


def without_token(spec: JobSpec) -> dict[str, Any]:
    """The job as a plain dict with the token removed (for dead letters)."""
    data: dict[str, Any] = msgspec.to_builtins(spec)
    data["moodle"].pop("token", None)

    return data
