"""The assignment scenario: a few archivingmod_assign submissions.

Each submission's report is a small self-contained page saying
``Submission <id>``; the first submission has one attachment of each type.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from .model import (
    ARCHIVINGMOD_ASSIGN,
    ASSIGN_ATTACHMENT_TYPES,
    ASSIGN_SECTIONS,
    SimJob,
)

if TYPE_CHECKING:
    from .server import MoodleSimulator

#: The token of the reference fixture (contract 1.8.2).
REFERENCE_TOKEN: Final = "5ebe2294ecd0e0f08eab7690d2a6ee69"
#: Moodle's default upload limit when the plugin must send one (100 MiB).
DEFAULT_MAX_UPLOAD_BYTES: Final = 104_857_600


def reference_assign(
    sim: MoodleSimulator,
    *,
    token: str = REFERENCE_TOKEN,
    submission_ids: Sequence[int] = (101, 102),
    attachments: bool = True,
    fixed_names: bool = True,
    keep_html_files: bool = True,
    paper_format: str = "A4",
    max_upload_bytes: int | None = None,
    flatten: bool = False,
    filehashes: bool = True,
    taskid: int = 8,
) -> tuple[SimJob, dict[str, Any]]:
    """Register a small assignment and build archivingmod_assign's body (1.10).

    Each submission's report is a small self-contained page containing
    ``Submission <id>``; with ``attachments`` the first submission has one
    file of each type (assignment, submission, feedback, annotation) and the
    others one submission file, all with real bytes and correct SHA-1.

    Returns:
        The registered job and the request body for the worker.
    """
    limit = max_upload_bytes or DEFAULT_MAX_UPLOAD_BYTES
    job = sim.add_job(
        token,
        ARCHIVINGMOD_ASSIGN,
        courseid=9,
        cmid=31,
        taskid=taskid,
        assignmentid=4,
        contextid=80,
        activityname="Reference Assignment",
        max_upload_bytes=limit,
    )
    for index, submission_id in enumerate(submission_ids):
        name = f"submission-{submission_id}" if fixed_names else None
        job.add_item(
            submission_id,
            _assign_html(submission_id),
            foldername=name,
            filename=name,
        )
        job.metadata.append(_assign_row(submission_id, index))
        if attachments:
            _attach_assign_files(job, submission_id, every_type=index == 0)
    body = {
        "api_version": 1,
        "taskid": taskid,
        "moodle_api": {
            "wstoken": token,
            "base_url": sim.base_url,
            "webservice_url": sim.ws_url,
            "upload_url": sim.upload_url,
            "max_upload_bytes": limit,
        },
        "job": {
            "submissionids": list(submission_ids),
            "report_sections": dict.fromkeys(ASSIGN_SECTIONS, True),
            "attachment_types": dict.fromkeys(ASSIGN_ATTACHMENT_TYPES, True),
            "paper_format": paper_format,
            "archive_filename": "archive-QA-REF-9-assign-Reference Assignment-31",
            "archive_flatten": flatten,
            "archive_filehashes": filehashes,
            "keep_html_files": keep_html_files,
            "fetch_metadata": True,
            "foldername_pattern": "${username}/${submissionid}-${date}_${time}",
            "filename_pattern": "submission-${submissionid}-${username}",
            "image_optimize": False,
        },
    }

    return job, body


def _assign_html(submission_id: int) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Submission {submission_id}</title>"
        "<style>body{font-family:sans-serif;margin:2em}</style></head>"
        f'<body class="archivingmod-assign-report"><h1>Submission {submission_id}</h1>'
        f"<p>Reference Assignment, submission {submission_id}.</p></body></html>\n"
    )


def _assign_row(submission_id: int, index: int) -> dict[str, Any]:
    userid = 20 + index
    start = 1_701_170_000 + 1000 * index

    return {
        "submissionid": submission_id,
        "userid": userid,
        "username": f"student{index + 1}",
        "firstname": f"Student{index + 1}",
        "lastname": "Reference",
        "idnumber": f"S-{userid}",
        "attemptnumber": 0,
        "status": "submitted",
        "timecreated": start,
        "timemodified": start + 600,
        "timestarted": start,
    }


def _attach_assign_files(job: SimJob, submission_id: int, *, every_type: bool) -> None:
    files = {
        "assignment": ("instructions.txt", b"Write an essay about archives.\n"),
        "submission": ("essay.txt", f"Essay of {submission_id}.\n".encode()),
        "feedback": ("feedback.txt", f"Feedback for {submission_id}.\n".encode()),
        "annotation": ("annotated.png", tiny_png(submission_id)),
    }
    for kind, (name, content) in files.items():
        if every_type or kind == "submission":
            mimetype = "image/png" if name.endswith(".png") else "text/plain"
            job.add_attachment(
                submission_id, name, content, group=kind, mimetype=mimetype
            )


def tiny_png(seed: int) -> bytes:
    """A valid 2x2 RGB PNG whose colour depends on ``seed``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    pixel = bytes([seed % 256, (seed * 7) % 256, (seed * 13) % 256])
    rows = b"".join(b"\x00" + pixel * 2 for _ in range(2))
    header = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
