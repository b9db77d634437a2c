"""Moodle's side of archive jobs: what the simulator knows and records.

A :class:`SimJob` is one quiz_archiver job or local_archiving task, found by
its web service token.  It holds the content Moodle would serve (items with
their report HTML and attachments, metadata rows, backups) and records what
the worker did (statuses, uploads, the final archive).  Tests build jobs with
the ``add_*`` methods or the builders in :mod:`.scenario`, and change any
field directly to inject faults.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

QUIZ_ARCHIVER: Final = "quiz_archiver"
ARCHIVINGMOD_QUIZ: Final = "archivingmod_quiz"
ARCHIVINGMOD_ASSIGN: Final = "archivingmod_assign"
FLAVOURS: Final = (QUIZ_ARCHIVER, ARCHIVINGMOD_QUIZ, ARCHIVINGMOD_ASSIGN)

#: quiz_archiver v4.1.0 ``Report::SECTIONS`` (contract 1.8.1).
QUIZ_ARCHIVER_SECTIONS: Final = (
    "header",
    "quiz_feedback",
    "quiz_grade",
    "question",
    "question_correctness",
    "question_marks",
    "question_feedback",
    "general_feedback",
    "rightanswer",
    "history",
    "attachments",
)
#: The older 8-key set: archivingmod_quiz 1.0.0 and the reference fixtures.
LEGACY_QUIZ_SECTIONS: Final = (
    "header",
    "quiz_feedback",
    "question",
    "question_feedback",
    "general_feedback",
    "rightanswer",
    "history",
    "attachments",
)
#: archivingmod_assign ``submission_report_section`` (contract 1.10).
ASSIGN_SECTIONS: Final = (
    "header",
    "instructions",
    "submission",
    "submissionstatus",
    "submissioncomments",
    "feedback",
    "feedbackcomments",
    "grade",
    "gradedetails",
)
ASSIGN_ATTACHMENT_TYPES: Final = ("assignment", "submission", "feedback", "annotation")

#: Statuses after which quiz_archiver deletes the token (contract 1.6).
QUIZ_ARCHIVER_COMPLETE: Final = frozenset({"FINISHED", "FAILED", "TIMEOUT", "DELETED"})
#: local_archiving ``activity_archiving_task_status`` values, and the final ones.
TASK_STATUS_CODES: Final = frozenset({0, 20, 40, 100, 200, 220, 240, 250, 251, 255})
TASK_COMPLETE: Final = frozenset({220, 240, 250, 251})
TASK_FINISHED: Final = 220
TASK_FAILED: Final = 250

BACKUP_MIMETYPE: Final = "application/vnd.moodle.backup"

#: Fault targets of the file endpoints (wsfunctions are targets by name).
PLUGINFILE: Final = "pluginfile"
UPLOAD: Final = "upload"


@dataclass
class RecordedCall:
    """One HTTP request the simulator received, without its token.

    Attributes:
        method: HTTP method.
        path: URL path.
        wsfunction: the REST function, None for file requests.
        params: parameters as PHP decoded them (``attemptids`` is a list,
            ``sections`` a dict); for uploads the form fields and ``files``.
        raw: the parameter pairs exactly as sent (``attemptids[]`` ...).
        time: Unix time of arrival.
    """

    method: str
    path: str
    wsfunction: str | None
    params: dict[str, Any]
    raw: list[tuple[str, str]] = field(default_factory=list)
    time: float = field(default_factory=time.time)


class FileFault(enum.Enum):
    """How ``pluginfile.php`` misbehaves for one file."""

    #: Headers and a first chunk, then silence until the simulator stops.
    STALL = "stall"
    #: One byte at a time, forever: only a total time limit ends it.
    TRICKLE = "trickle"
    #: A fast endless stream without Content-Length.
    ENDLESS = "endless"
    #: Served as ``text/html`` instead of its MIME type.
    WRONG_CONTENT_TYPE = "wrong_content_type"
    #: Moodle's JSON error object (HTTP 200) instead of the file.
    JSON_ERROR = "json_error"
    #: HTTP 404 with Moodle's ``filenotfound`` error.
    NOT_FOUND = "not_found"


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


#: Value for :attr:`SimItem.overrides` that removes a key from the answer.
DROP: Final = _Drop()


@dataclass(kw_only=True)
class SimFile:
    """A file ``pluginfile.php`` serves.

    Attributes:
        content: the bytes served.
        mimetype: Content-Type of the answer.
        fault: how serving it goes wrong, if at all.
        declared_size: Content-Length to announce instead of the real one.
        path: where it lives below ``/webservice/pluginfile.php``, unquoted.
        bytes_sent: how much of it the simulator has written so far.
    """

    content: bytes = b""
    mimetype: str = "application/octet-stream"
    fault: FileFault | None = None
    declared_size: int | None = None
    path: str = ""
    bytes_sent: int = 0

    @property
    def url_path(self) -> str:
        """The URL path of the file, percent-encoded as Moodle does."""
        return "/webservice/pluginfile.php" + quote(self.path, safe="/")


@dataclass(kw_only=True)
class SimAttachment(SimFile):
    """A file attached to an attempt (``group`` = slot) or submission (type)."""

    group: str
    filename: str
    #: Announced SHA-1; None = the real one.  Set it to fake a mismatch.
    contenthash: str | None = None
    #: Announced download URL; None = this simulator's pluginfile URL.
    download_url: str | None = None

    def announced_hash(self) -> str:
        """The SHA-1 Moodle reports for this file."""
        if self.contenthash is not None:
            return self.contenthash
        return hashlib.sha1(self.content, usedforsecurity=False).hexdigest()


@dataclass(kw_only=True)
class SimBackup(SimFile):
    """A Moodle backup of the quiz or the course (quiz_archiver only).

    ``statuses`` are the answers of ``quiz_archiver_get_backup_status`` in
    turn; the last one repeats.  The file can be downloaded once the current
    status is ``SUCCESS``.
    """

    backupid: str
    filename: str
    filearea: str = "activity"
    mimetype: str = BACKUP_MIMETYPE
    statuses: list[str] = field(default_factory=lambda: ["SUCCESS"])

    @property
    def status(self) -> str:
        """What Moodle would answer now."""
        return self.statuses[0] if self.statuses else "E_BACKUP_NOT_FOUND"

    def next_status(self) -> str:
        """Answer a status query and advance the script."""
        status = self.status
        if len(self.statuses) > 1:
            self.statuses.pop(0)
        return status


@dataclass(kw_only=True)
class SimItem:
    """An attempt or submission with its report.

    Attributes:
        item_id: attempt or submission id.
        html: the report page.
        foldername, filename: names to answer; None = expand the requested
            pattern as Moodle does.
        attachments: files attached to it.
        report_padding: bytes of filler streamed inside the report, without
            holding them in memory (oversized report fault).
        overrides: answer keys to replace (:data:`DROP` removes one).
    """

    item_id: int
    html: str
    foldername: str | None = None
    filename: str | None = None
    attachments: list[SimAttachment] = field(default_factory=list)
    report_padding: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DraftFile:
    """A file in a user's draft area, as upload.php stored it."""

    itemid: int
    filepath: str
    filename: str
    path: Path
    size: int


@dataclass(kw_only=True)
class UploadRecord:
    """One request to upload.php: which files went where, which failed."""

    itemid: int
    filepath: str
    stored: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class SimJob:
    """Moodle's state of one archive job, found by its token.

    Identity fields mirror the flavour: quiz_archiver knows the job by
    ``jobid`` (learned from the first call that names it, unless given) and
    ``courseid``/``cmid``/``quizid``; local_archiving by ``taskid``.  Fields
    the worker changes: ``statuses`` (strings for quiz_archiver, task codes
    otherwise), ``progress``, ``state`` (Moodle's own view, e.g. FINISHED
    after the upload was processed), ``uploads``, ``drafts`` and the archive
    fields.  After a final status Moodle deletes the token
    (``token_valid=False``), so every later call gets ``invalidtoken``; the
    event ``done`` is set then.
    """

    token: str
    flavour: str
    jobid: str | None = None
    courseid: int = 1
    cmid: int = 1
    quizid: int = 1
    taskid: int | None = None
    assignmentid: int = 1
    #: Module context (attachments, activity backups) and course context.
    contextid: int = 66
    course_contextid: int = 64
    #: The service user and its context, where drafts are stored.
    userid: int = 2
    user_contextid: int = 5
    coursename: str = "Reference Course"
    courseshortname: str = "QA-REF"
    activityname: str = "Reference Quiz"
    #: Report sections the plugin declares; None = the flavour's set.
    section_keys: tuple[str, ...] | None = None
    #: Whether process_uploaded_artifact declares ``artifact_count``; None =
    #: archivingmod_assign always, quiz flavours only with max_upload_bytes
    #: (quiz_archiver's ``next`` branch).
    accepts_artifact_count: bool | None = None
    #: Moodle's upload limit: larger files get ``fileoversized``.
    max_upload_bytes: int | None = None
    items: dict[int, SimItem] = field(default_factory=dict)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    backups: dict[str, SimBackup] = field(default_factory=dict)
    statuses: list[Any] = field(default_factory=list)
    progress: list[int] = field(default_factory=list)
    state: Any = None
    token_valid: bool = True
    drafts: dict[int, dict[tuple[str, str], DraftFile]] = field(default_factory=dict)
    uploads: list[UploadRecord] = field(default_factory=list)
    archive_path: Path | None = None
    artifact_sha256: str | None = None
    artifact_count: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _next_itemid: int = field(default=700, init=False, repr=False)

    def __post_init__(self) -> None:
        self.flavour = str(self.flavour)
        if self.flavour not in FLAVOURS:
            raise ValueError(f"unknown flavour {self.flavour!r}")
        if self.state is None:
            self.state = "AWAITING_PROCESSING" if self.is_quiz_archiver else 40

    @property
    def is_quiz_archiver(self) -> bool:
        """True for quiz_archiver jobs, False for local_archiving tasks."""
        return self.flavour == QUIZ_ARCHIVER

    @property
    def is_assign(self) -> bool:
        """True for archivingmod_assign tasks."""
        return self.flavour == ARCHIVINGMOD_ASSIGN

    @property
    def is_complete(self) -> bool:
        """True once the job reached a final state in Moodle."""
        return not self.token_valid

    @property
    def sections(self) -> tuple[str, ...]:
        """Report section keys the plugin requires."""
        if self.section_keys is not None:
            return self.section_keys
        if self.is_assign:
            return ASSIGN_SECTIONS
        if self.is_quiz_archiver:
            return QUIZ_ARCHIVER_SECTIONS
        return LEGACY_QUIZ_SECTIONS

    @property
    def takes_artifact_count(self) -> bool:
        """Whether process_uploaded_artifact accepts ``artifact_count``."""
        if self.accepts_artifact_count is not None:
            return self.accepts_artifact_count
        return self.is_assign or self.max_upload_bytes is not None

    def complete(self, state: Any) -> None:
        """Enter a final state: Moodle deletes the token."""
        self.state = state
        self.token_valid = False
        self.done.set()

    def add_item(self, item_id: int, html: str, **fields: Any) -> SimItem:
        """Add an attempt or submission (fields as in :class:`SimItem`)."""
        item = SimItem(item_id=item_id, html=html, **fields)
        self.items[item_id] = item
        for attachment in item.attachments:
            self._place(item, attachment)

        return item

    def add_attachment(
        self, item_id: int, filename: str, content: bytes, **fields: Any
    ) -> SimAttachment:
        """Attach a file to an item (``group`` defaults to slot 1 / submission)."""
        fields.setdefault("group", "submission" if self.is_assign else "1")
        attachment = SimAttachment(filename=filename, content=content, **fields)
        item = self.items[item_id]
        item.attachments.append(attachment)
        self._place(item, attachment)

        return attachment

    def add_backup(
        self, backupid: str, filename: str, content: bytes, **fields: Any
    ) -> SimBackup:
        """Add a backup; ``filearea`` ``activity`` or ``course`` picks the context."""
        backup = SimBackup(
            backupid=backupid, filename=filename, content=content, **fields
        )
        context = (
            self.course_contextid if backup.filearea == "course" else self.contextid
        )
        backup.path = f"/{context}/backup/{backup.filearea}/{filename}"
        self.backups[backupid] = backup

        return backup

    def find_file(self, path: str) -> SimFile | None:
        """The file at ``path`` below pluginfile.php, if this job has one."""
        for item in self.items.values():
            for attachment in item.attachments:
                if attachment.path == path:
                    return attachment
        for backup in self.backups.values():
            if backup.path == path:
                return backup
        return None

    def archive_bytes(self) -> bytes:
        """The stored archive (after a successful process_uploaded_artifact)."""
        if self.archive_path is None:
            raise LookupError("no archive has been stored for this job")
        return self.archive_path.read_bytes()

    def _place(self, item: SimItem, attachment: SimAttachment) -> None:
        # Item ids below mimic Moodle's layouts (contract 2.5): question
        # attachments live under <usageid>/<slot>/<itemid>, assignment files
        # in their plugin's file area.
        self._next_itemid += 1
        if not self.is_assign:
            area = f"question/response_attachments/{item.item_id + 1000}"
            area += f"/{attachment.group}/{self._next_itemid}"
        else:
            area = _ASSIGN_AREAS.get(attachment.group, "mod_assign/unknown")
            area += f"/{item.item_id if attachment.group != 'assignment' else 0}"
        attachment.path = f"/{self.contextid}/{area}/{attachment.filename}"


_ASSIGN_AREAS: Final = {
    "assignment": "mod_assign/introattachment",
    "submission": "assignsubmission_file/submission_files",
    "feedback": "assignfeedback_file/feedback_files",
    "annotation": "assignfeedback_editpdf/download",
}
