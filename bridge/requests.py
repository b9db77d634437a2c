"""Turn the three flavours' request bodies into one :class:`JobSpec`.

Moodle's plugins show the ``error`` text of a rejected request to the user,
and existing tests match on it, so every message below is the reference
worker's, byte for byte (contract 1.7 and 1.8.3).  The reference does not
validate in one pass: it first *reads* a group of keys (a missing key is a
``KeyError``, indexing a non-object a ``TypeError``) and then *checks* the
values of that group (``ValueError``).  The parsers here keep those groups
and their order, so that a body with several faults gets the same answer as
from the reference:

1. ``api_version`` (present, an integer, the flavour's);
2. the Moodle URLs and the token, then their checks;
3. the ids and the archive filename, then their checks;
4. the report task's keys, then their checks in the reference's order;
5. (quiz_archiver) each backup's keys, then its checks.

Where the reference crashes or silently accepts nonsense, we answer with the
message the contract lists for that field; README "Compatibility decisions"
lists each such case.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec

from archive_worker.errors import ArchiveWorkerError
from archive_worker.jobs import (
    BackupTask,
    Flavour,
    ImageOptimize,
    JobSpec,
    MoodleEndpoint,
    ReportTask,
    job_identity,
    normalise_paper_format,
)

NOT_JSON = "Request payload must be JSON."
INVALID_REQUEST = "Invalid request."
MISSING_PARAMETER = "JSON is missing a required parameter."
INCOMPLETE = "JSON is technically incomplete or missing a required parameter."
#: Prefix of every semantic validation failure (the reference's ValueError).
INVALID_DATA_PREFIX = "JSON data is invalid: "

#: Characters the reference forbids in ``archive_filename`` (contract 1.8.1);
#: the dot is forbidden too, the worker appends ``.zip`` itself.
ARCHIVE_FILENAME_FORBIDDEN = frozenset('\0\\/:*?"<>|.')
#: A backup file name becomes a member of the ZIP, so it must not climb out
#: of ``backups/`` (the reference does not check this).
_BACKUP_FILENAME_FORBIDDEN = frozenset("\0\\/")
#: What Python's ``int()`` accepts from the reference's PHP-originated ids,
#: minus whitespace and underscores, and at most as long as a 64-bit number.
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,19}")
#: Moodle ids are 64-bit database keys; msgspec cannot encode larger ints.
_INT_MAX = 2**63 - 1
#: Truthy and falsy spellings local_archiving may use for its checkboxes.
_FLAG_VALUES: dict[object, int] = {"1": 1, "0": 0, 1: 1, 0: 0}

_REST_SUFFIX = "/webservice/rest/server.php"
_UPLOAD_SUFFIX = "/webservice/upload.php"


class RequestRejected(ArchiveWorkerError):
    """A request the bridge answers with an error status and ``{"error": ...}``.

    Attributes:
        message: the text for the ``error`` key, shown to the Moodle user.
        status: the HTTP status code.
        retry_after_s: value of a ``Retry-After`` header, if one is sent.
    """

    def __init__(
        self, message: str, *, status: int = 400, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


class InvalidJobData(RequestRejected):
    """A field has a wrong value: 400 ``JSON data is invalid: <reason>``."""

    def __init__(self, reason: str) -> None:
        super().__init__(INVALID_DATA_PREFIX + reason)
        self.reason = reason


def is_json_content_type(mimetype: str) -> bool:
    """True for ``application/json`` and ``application/*+json`` (as Flask)."""
    mimetype = mimetype.strip().lower()
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def decode_body(body: bytes) -> Any:
    """Parse a request body as JSON.

    Raises:
        RequestRejected: the body is not valid JSON (``Invalid request.``).
    """
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise RequestRejected(INVALID_REQUEST) from None


def parse_job(flavour: Flavour, payload: Any, *, now: float | None = None) -> JobSpec:
    """Validate a decoded request body of ``flavour`` and normalise it.

    Args:
        flavour: which plugin API the body was posted to.
        payload: the decoded JSON body.
        now: acceptance time (Unix seconds); defaults to the current time.

    Returns:
        The job, with its id derived from flavour, Moodle site and token.

    Raises:
        RequestRejected: with the contract's message for the first fault
            found, in the reference worker's order.
    """
    check_api_version(flavour, payload)
    parse = _PARSERS[flavour]
    fields = parse(payload)
    job_id, _ = job_identity(flavour, fields["moodle"].base_url, fields["moodle"].token)

    return JobSpec(
        job_id=job_id,
        flavour=flavour,
        submitted_at=time.time() if now is None else now,
        **fields,
    )


def check_api_version(flavour: Flavour, payload: Any) -> None:
    """Reject a body whose ``api_version`` is missing, not an int, or wrong.

    A JSON ``true`` is not an integer here.  The reference let it pass its
    ``isinstance(x, int)`` check (Python's ``bool`` is an ``int``) and then
    reported a mismatch with ``Got: True``; we say what is actually wrong.
    """
    if not isinstance(payload, dict):
        raise RequestRejected(INCOMPLETE)
    if "api_version" not in payload:
        raise InvalidJobData("API version missing in request payload")
    version = payload["api_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidJobData("API version must be an integer")
    if version != flavour.api_version:
        worker = (
            "archiving-worker"
            if flavour is Flavour.ARCHIVINGMOD_ASSIGN
            else "quiz-archive-worker"
        )
        raise InvalidJobData(
            f"API version mismatch. Expected: {flavour.api_version}, "
            f"Got: {version}. Please update your {worker}!"
        )


# --- reading keys ---------------------------------------------------------------


def _get(container: object, key: str) -> Any:
    """``container[key]`` with the reference's KeyError/TypeError answers."""
    if not isinstance(container, dict):
        raise RequestRejected(INCOMPLETE)
    if key not in container:
        raise RequestRejected(MISSING_PARAMETER)
    return container[key]


def _get_object(container: object, key: str) -> dict[str, Any]:
    """A nested object the parser indexes into (``moodle_api``, ``job``)."""
    value = _get(container, key)
    if not isinstance(value, dict):
        raise RequestRejected(INCOMPLETE)
    return value


def _as_int(value: object) -> int | None:
    """An integer from a JSON int or decimal string; None for anything else."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INT_TEXT.fullmatch(value):
        number = int(value)
    if number is None or abs(number) > _INT_MAX:
        return None
    return number


def _as_flag(value: object) -> int | None:
    """1 or 0 from a JSON bool, 0/1 or "0"/"1"; None for anything else."""
    if isinstance(value, bool):
        return int(value)
    return _FLAG_VALUES.get(value) if isinstance(value, int | str) else None


# --- Moodle endpoint ---------------------------------------------------------------


def _is_http_url(value: str) -> bool:
    # Stricter than the reference's startswith("http"): a query string would
    # end up next to the token in every web service call.
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not parts.query
        and not parts.fragment
    )


def _check_url(value: object, name: str, suffix: str | None) -> str:
    # "required" for any falsy value, as the reference's ``if not url``.
    if not value:
        raise InvalidJobData(f"{name} is required")
    if not isinstance(value, str) or not _is_http_url(value):
        raise InvalidJobData(f"{name} is invalid")
    if suffix is None and value.endswith(".php"):
        raise InvalidJobData(f"{name} is invalid")
    if suffix is not None and not value.endswith(suffix):
        raise InvalidJobData(f"{name} is invalid")
    return value


def _check_max_upload(value: object, *, required: bool) -> int | None:
    """Moodle's upload limit; 0 (or absent when optional) means unknown."""
    if value is None and not required:
        return None
    size = _as_int(value)
    if size is None or size < 0:
        raise InvalidJobData("Maximum upload size is invalid.")
    return size or None


def _endpoint(
    base_url: object,
    ws_url: object,
    upload_url: object,
    token: object,
    max_upload: object,
    *,
    max_upload_required: bool = False,
) -> MoodleEndpoint:
    base = _check_url(base_url, "Base URL", None)
    ws = _check_url(ws_url, "Webservice REST base URL", _REST_SUFFIX)
    upload = _check_url(upload_url, "Webservice upload URL", _UPLOAD_SUFFIX)
    if not token or not isinstance(token, str):
        raise InvalidJobData("wstoken is required")
    limit = _check_max_upload(max_upload, required=max_upload_required)

    return MoodleEndpoint(
        base_url=base.rstrip("/"),
        ws_url=ws,
        upload_url=upload,
        token=token,
        max_upload_bytes=limit,
    )


# --- ids, archive name and layout flags ----------------------------------------------

_IDS_REQUIRED = (
    "Either the 3-tuple courseid, cmid and quizid or taskid must be given "
    "to create an archive request."
)


def _check_positive_ids(*values: object) -> list[int]:
    ids = [_as_int(v) for v in values]
    checked = [i for i in ids if i is not None and i > 0]
    if len(checked) != len(values):
        raise InvalidJobData(_IDS_REQUIRED)
    return checked


def _check_archive_filename(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidJobData("Archive filename is invalid.")
    if posixpath.basename(value) != value:
        raise InvalidJobData("Archive filename must not contain a path.")
    if ARCHIVE_FILENAME_FORBIDDEN.intersection(value):
        raise InvalidJobData("Archive filename contains forbidden characters.")
    return value


def _check_layout_flag(value: object, default: bool, message: str) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidJobData(message)
    return value


def _layout(flatten: object, filehashes: object) -> dict[str, bool]:
    return {
        "archive_flatten": _check_layout_flag(
            flatten, False, "Archive flatten flag is invalid."
        ),
        "archive_filehashes": _check_layout_flag(
            filehashes, True, "Archive filehashes flag is invalid."
        ),
    }


# --- report task ----------------------------------------------------------------------


@dataclasses.dataclass
class _RawReport:
    """The report task's values, read in the reference's order, unchecked."""

    ids: object
    sections: object
    fetch_metadata: object
    fetch_attachments: object
    paper_format: object
    keep_html_files: object
    foldername_pattern: object
    filename_pattern: object
    image_optimize: object
    #: Assign only: the attachment type selection.
    attachment_types: object = None


def _read_image_optimize(task: dict[str, Any]) -> object:
    value = _get(task, "image_optimize")
    if isinstance(value, dict) and value:
        # The reference reads all three before checking any of them.
        return {key: _get(value, key) for key in ("width", "height", "quality")}
    return value


def _check_id_list(value: object, message: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise InvalidJobData(message)
    ids = [_as_int(item) for item in value]
    checked = [i for i in ids if i is not None and i > 0]
    if len(checked) != len(ids):
        raise InvalidJobData(message)
    return checked


def _check_quiz_sections(value: object) -> dict[str, str | int]:
    """Quiz section values go to Moodle unchanged ("1", "0" or 0).

    A JSON bool cannot travel unchanged (it would reach Moodle as ``True``),
    so it becomes 1/0, which Moodle's PARAM_BOOL reads the same way.
    """
    if not isinstance(value, dict) or not value:
        raise InvalidJobData("Attempt report sections are invalid.")
    sections: dict[str, str | int] = {}
    for key, item in value.items():
        if isinstance(item, bool):
            sections[key] = int(item)
        elif isinstance(item, str | int):
            sections[key] = item
        else:
            raise InvalidJobData("Attempt report sections are invalid.")
    return sections


def _check_flag_map(value: object, message: str) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise InvalidJobData(message)
    flags = {key: _as_flag(item) for key, item in value.items()}
    checked = {key: flag for key, flag in flags.items() if flag is not None}
    if len(checked) != len(flags):
        raise InvalidJobData(message)
    return checked


def _check_bool(value: object, message: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidJobData(message)
    return value


def _check_pattern(value: object, message: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidJobData(message)
    return value


def _check_image_optimize(value: object) -> ImageOptimize | None:
    if not value:
        return None
    if not isinstance(value, dict):
        raise InvalidJobData("Image optimization flag is invalid.")
    width = _as_int(value["width"])
    if width is None or width < 1:
        raise InvalidJobData("Image optimization width is invalid.")
    height = _as_int(value["height"])
    if height is None or height < 1:
        raise InvalidJobData("Image optimization height is invalid.")
    quality = _as_int(value["quality"])
    if quality is None or not 0 <= quality <= 100:
        raise InvalidJobData("Image optimization quality is invalid.")
    return ImageOptimize(width, height, quality)


def _check_report(raw: _RawReport, *, assign: bool) -> ReportTask:
    kind = "Submission" if assign else "Attempt"
    ids = _check_id_list(raw.ids, f"{kind} ID list is invalid.")
    sections: dict[str, str | int]
    attachment_types: dict[str, bool] | None = None
    if assign:
        sections = dict(
            _check_flag_map(raw.sections, "Submission report sections are invalid.")
        )
    else:
        sections = _check_quiz_sections(raw.sections)
    fetch_metadata = _check_bool(raw.fetch_metadata, "Fetch metadata flag is invalid.")
    if assign:
        selection = _check_flag_map(
            raw.attachment_types, "Attachment type selection is invalid."
        )
        attachment_types = {key: bool(flag) for key, flag in selection.items()}
        fetch_attachments = any(attachment_types.values())
    else:
        fetch_attachments = _check_bool(
            raw.fetch_attachments, "Fetch attachments flag is invalid."
        )
    return _finish_report(
        raw, ids, sections, fetch_metadata, fetch_attachments, attachment_types
    )


def _finish_report(
    raw: _RawReport,
    ids: list[int],
    sections: dict[str, str | int],
    fetch_metadata: bool,
    fetch_attachments: bool,
    attachment_types: dict[str, bool] | None,
) -> ReportTask:
    paper_format = normalise_paper_format(raw.paper_format)
    if paper_format is None:
        raise InvalidJobData("Paper format is invalid.")
    keep_html = _check_bool(raw.keep_html_files, "Keep HTML files flag is invalid.")
    foldername = _check_pattern(
        raw.foldername_pattern, "Folder name pattern is invalid."
    )
    # The reference's emptiness check here is ineffective (contract 5.3); an
    # empty pattern would name every report ".pdf", so we reject it.
    filename = _check_pattern(raw.filename_pattern, "Filename pattern is invalid.")
    image_optimize = _check_image_optimize(raw.image_optimize)

    return ReportTask(
        ids=ids,
        sections=sections,
        paper_format=paper_format,
        keep_html_files=keep_html,
        fetch_metadata=fetch_metadata,
        fetch_attachments=fetch_attachments,
        foldername_pattern=foldername,
        filename_pattern=filename,
        image_optimize=image_optimize,
        attachment_types=attachment_types,
    )


# --- quiz_archiver (contract 1.8) -----------------------------------------------------


def _parse_quiz_archiver(payload: dict[str, Any]) -> dict[str, Any]:
    moodle = _endpoint(
        _get(payload, "moodle_base_url"),
        _get(payload, "moodle_ws_url"),
        _get(payload, "moodle_upload_url"),
        _get(payload, "wstoken"),
        payload.get("moodle_max_upload_bytes"),
    )
    ids = (_get(payload, "courseid"), _get(payload, "cmid"), _get(payload, "quizid"))
    filename = _get(payload, "archive_filename")
    courseid, cmid, quizid = _check_positive_ids(*ids)
    fields: dict[str, Any] = {
        "moodle": moodle,
        "courseid": courseid,
        "cmid": cmid,
        "quizid": quizid,
        "archive_filename": _check_archive_filename(filename),
        **_layout(payload.get("archive_flatten"), payload.get("archive_filehashes")),
    }
    fields["reports"] = _quiz_archiver_report(
        _get(payload, "task_archive_quiz_attempts")
    )
    fields["backups"] = _backups(_get(payload, "task_moodle_backups"), moodle.base_url)

    return fields


def _quiz_archiver_report(task: object) -> ReportTask | None:
    # null, false (and, as in the reference, any other falsy value) = no task.
    if not task:
        return None
    if not isinstance(task, dict):
        raise RequestRejected(INCOMPLETE)
    image_optimize = _read_image_optimize(task)
    sections = _get(task, "sections")
    raw = _RawReport(
        ids=_get(task, "attemptids"),
        sections=sections,
        fetch_metadata=_get(task, "fetch_metadata"),
        # Contract 1.8.1: only the *string* "1" enables attachments.  A
        # missing key just disables them (the reference raised KeyError).
        fetch_attachments=isinstance(sections, dict)
        and sections.get("attachments") == "1",
        paper_format=_get(task, "paper_format"),
        keep_html_files=_get(task, "keep_html_files"),
        foldername_pattern=_get(task, "foldername_pattern"),
        filename_pattern=_get(task, "filename_pattern"),
        image_optimize=image_optimize,
    )
    return _check_report(raw, assign=False)


def _backups(value: object, base_url: str) -> list[BackupTask]:
    if not value:
        return []
    if not isinstance(value, list):
        raise RequestRejected(INCOMPLETE)
    return [_backup(item, base_url) for item in value]


def _backup(item: object, base_url: str) -> BackupTask:
    backupid = _get(item, "backupid")
    filename = _get(item, "filename")
    url = _get(item, "file_download_url")
    if not isinstance(backupid, str) or not backupid:
        raise InvalidJobData("Moodle backup ID is invalid.")
    if (
        not isinstance(filename, str)
        or filename in ("", ".", "..")
        or _BACKUP_FILENAME_FORBIDDEN.intersection(filename)
    ):
        raise InvalidJobData("Moodle backup filename is invalid.")
    # The token travels to this URL, so it must lie *below* the site root:
    # a bare prefix test would let "http://moodle.evil" pass for
    # "http://moodle".
    if not isinstance(url, str) or not url.startswith(base_url + "/"):
        raise InvalidJobData("Moodle backup file download URL is invalid.")

    return BackupTask(backupid=backupid, filename=filename, download_url=url)


# --- local_archiving drivers (contract 1.9, 1.10) -------------------------------------


def _local_archiving_base(
    payload: dict[str, Any], *, assign: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Endpoint, task id, archive name and layout, shared by both drivers."""
    api = _get_object(payload, "moodle_api")
    moodle = _endpoint(
        _get(api, "base_url"),
        _get(api, "webservice_url"),
        _get(api, "upload_url"),
        _get(api, "wstoken"),
        _get(api, "max_upload_bytes") if assign else api.get("max_upload_bytes"),
        max_upload_required=assign,
    )
    taskid = _get(payload, "taskid")
    job = _get_object(payload, "job")
    filename = _get(job, "archive_filename")
    if assign:
        layout_values = (_get(job, "archive_flatten"), _get(job, "archive_filehashes"))
    else:
        layout_values = (job.get("archive_flatten"), job.get("archive_filehashes"))
    (checked_taskid,) = _check_positive_ids(taskid)
    fields: dict[str, Any] = {
        "moodle": moodle,
        "taskid": checked_taskid,
        "archive_filename": _check_archive_filename(filename),
        **_layout(*layout_values),
    }

    return fields, job


def _parse_archivingmod_quiz(payload: dict[str, Any]) -> dict[str, Any]:
    fields, job = _local_archiving_base(payload, assign=False)
    image_optimize = _read_image_optimize(job)
    raw = _RawReport(
        ids=_get(job, "attemptids"),
        sections=_get(job, "report_sections"),
        fetch_metadata=_get(job, "fetch_metadata"),
        fetch_attachments=_get(job, "fetch_attachments"),
        paper_format=_get(job, "paper_format"),
        keep_html_files=_get(job, "keep_html_files"),
        foldername_pattern=_get(job, "foldername_pattern"),
        filename_pattern=_get(job, "filename_pattern"),
        image_optimize=image_optimize,
    )
    fields["reports"] = _check_report(raw, assign=False)

    return fields


def _parse_archivingmod_assign(payload: dict[str, Any]) -> dict[str, Any]:
    fields, job = _local_archiving_base(payload, assign=True)
    image_optimize = _read_image_optimize(job)
    ids = _get(job, "submissionids")
    sections = _get(job, "report_sections")
    fetch_metadata = _get(job, "fetch_metadata")
    # Contract 1.10 DISCREPANCY: the worker reads ``attachment_types``, a
    # newer plugin sends ``attachments``; either is accepted.
    key = "attachment_types" if "attachment_types" in job else "attachments"
    raw = _RawReport(
        ids=ids,
        sections=sections,
        fetch_metadata=fetch_metadata,
        fetch_attachments=None,
        attachment_types=_get(job, key),
        paper_format=_get(job, "paper_format"),
        keep_html_files=_get(job, "keep_html_files"),
        foldername_pattern=_get(job, "foldername_pattern"),
        filename_pattern=_get(job, "filename_pattern"),
        image_optimize=image_optimize,
    )
    fields["reports"] = _check_report(raw, assign=True)

    return fields


_PARSERS = {
    Flavour.QUIZ_ARCHIVER: _parse_quiz_archiver,
    Flavour.ARCHIVINGMOD_QUIZ: _parse_archivingmod_quiz,
    Flavour.ARCHIVINGMOD_ASSIGN: _parse_archivingmod_assign,
}
