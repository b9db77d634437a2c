"""Ready-made jobs for tests and the demo, from the bundled reference data.

:func:`reference_quiz` registers the reference quiz of the existing workers'
test suite (course 9, module 23, quiz 12, attempts 24, 25 and 23 in that
order, two backups) with a simulator, and returns the job together with the
exact body the plugin would POST to the worker.  :func:`reference_assign`
does the same for a small assignment, whose reports are minimal pages saying
``Submission <id>``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .assign_scenario import REFERENCE_TOKEN, reference_assign, tiny_png
from .model import (
    ARCHIVINGMOD_ASSIGN,
    ARCHIVINGMOD_QUIZ,
    LEGACY_QUIZ_SECTIONS,
    QUIZ_ARCHIVER,
    SimJob,
)

if TYPE_CHECKING:
    from .server import MoodleSimulator

__all__ = ["REFERENCE_TOKEN", "reference_assign", "reference_quiz", "tiny_png"]

DATA_DIR: Final = Path(__file__).parent / "data" / "reference_quiz"
REFERENCE_ATTEMPTS: Final = (24, 25, 23)
REFERENCE_ARCHIVE_NAME: Final = (
    "quiz-archive-QA-REF-9-Reference Quiz (standard question types)-12"
)
DEFAULT_FOLDERNAME_PATTERN: Final = "${username}/${attemptid}-${date}_${time}"
DEFAULT_FILENAME_PATTERN: Final = "attempt-${attemptid}-${username}_${date}-${time}"
#: Backups of the reference quiz: id, file, file area (contract 6.3).
REFERENCE_BACKUPS: Final = (
    (
        "d68a3dedfdc9a93dab4b8c93dfd6dda9",
        "quiz_archiver-activity-backup-23.mbz",
        "activity",
    ),
    ("6d2a9c5b0e7f41c3a8b1f2e4d5c6b7a8", "quiz_archiver-course-backup-9.mbz", "course"),
)
#: The current metadata columns (contract 2.2.3); the bundled CSV predates
#: ``idnumber`` and carries an old ``path`` column.
METADATA_COLUMNS: Final = (
    "attemptid",
    "userid",
    "username",
    "firstname",
    "lastname",
    "idnumber",
    "timestart",
    "timefinish",
    "attempt",
    "state",
)
_INT_COLUMNS: Final = frozenset(
    {"attemptid", "userid", "timestart", "timefinish", "attempt"}
)
_WWWROOT: Final = re.compile(r"http:(\\?/)(\\?/)moodle(?![\w.-])")


def reference_quiz(
    sim: MoodleSimulator,
    flavour: str = QUIZ_ARCHIVER,
    *,
    token: str = REFERENCE_TOKEN,
    attempt_ids: Sequence[int] = REFERENCE_ATTEMPTS,
    attachments: bool | None = None,
    backups: bool = True,
    backup_statuses: Sequence[str] = ("SUCCESS",),
    fixed_names: bool = True,
    keep_html_files: bool = True,
    paper_format: str = "A4",
    max_upload_bytes: int | None = None,
    flatten: bool | None = None,
    filehashes: bool | None = None,
    legacy_sections: bool = False,
    taskid: int = 7,
    rewrite_wwwroot: bool = True,
) -> tuple[SimJob, dict[str, Any]]:
    """Register the reference quiz and build the plugin's request body.

    Args:
        sim: the simulator to register the job with.
        flavour: ``quiz_archiver`` (body as contract 1.8.2) or
            ``archivingmod_quiz`` (1.9); ``archivingmod_assign`` is passed
            on to :func:`reference_assign`.
        token: the job's token.
        attempt_ids: which of the attempts 23, 24, 25 to archive, in order.
        attachments: attach files with real bytes (and correct SHA-1) to the
            items, and ask for them; None = off for quizzes, on for assign.
        backups: quiz_archiver only: include the two backups.
        backup_statuses: the answers of get_backup_status for each backup.
        fixed_names: answer ``attempt-<id>`` as folder and file name like
            the reference fixture; otherwise expand the requested patterns.
        keep_html_files, paper_format: as in the request.
        max_upload_bytes: Moodle's upload limit; sent in the body (as the
            chunking ``next`` branch does) and enforced by upload.php.
        flatten, filehashes: add ``archive_flatten``/``archive_filehashes``
            to the body (NEW worker fixtures); None leaves them out.
        legacy_sections: use the older 8 report sections (and make the job
            declare only those) instead of quiz_archiver 4.1.0's 11.
        taskid: archivingmod_quiz's task id.
        rewrite_wwwroot: point the pages' ``http://moodle`` links at the
            simulator, as Moodle's own pages point at its wwwroot.

    Returns:
        The registered job and the request body for the worker.
    """
    if flavour == ARCHIVINGMOD_ASSIGN:
        return reference_assign(
            sim,
            token=token,
            attachments=attachments is not False,
            keep_html_files=keep_html_files,
            paper_format=paper_format,
            max_upload_bytes=max_upload_bytes,
            flatten=bool(flatten),
            filehashes=filehashes is not False,
        )
    unknown = set(attempt_ids) - set(REFERENCE_ATTEMPTS)
    if unknown:
        raise ValueError(f"the reference quiz has no attempts {sorted(unknown)}")
    job = sim.add_job(
        token,
        flavour,
        courseid=9,
        cmid=23,
        quizid=12,
        taskid=taskid if flavour == ARCHIVINGMOD_QUIZ else None,
        contextid=66,
        course_contextid=64,
        activityname="Reference Quiz (standard question types)",
        section_keys=LEGACY_QUIZ_SECTIONS if legacy_sections else None,
        max_upload_bytes=max_upload_bytes,
        metadata=_reference_metadata(),
    )
    for attempt_id in REFERENCE_ATTEMPTS:
        html = _reference_html(attempt_id)
        if rewrite_wwwroot:
            html = _WWWROOT.sub(lambda m: _escaped(sim.base_url, m.group(1)), html)
        name = f"attempt-{attempt_id}" if fixed_names else None
        job.add_item(attempt_id, html, foldername=name, filename=name)
        if attachments:
            _attach_quiz_files(job, attempt_id)
    if backups and flavour == QUIZ_ARCHIVER:
        for backupid, filename, area in REFERENCE_BACKUPS:
            content = (DATA_DIR / "backups" / filename).read_bytes()
            job.add_backup(
                backupid,
                filename,
                content,
                filearea=area,
                statuses=list(backup_statuses),
            )
    task = _quiz_task(
        job, attempt_ids, bool(attachments), keep_html_files, paper_format
    )
    extras: dict[str, Any] = {}
    if flatten is not None:
        extras["archive_flatten"] = flatten
    if filehashes is not None:
        extras["archive_filehashes"] = filehashes
    if flavour == QUIZ_ARCHIVER:
        body = _quiz_archiver_body(sim, job, task, backups, max_upload_bytes)
        return job, body | extras

    return job, _archivingmod_quiz_body(sim, job, task, max_upload_bytes, extras)


# --- quiz helpers -------------------------------------------------------------------


def _quiz_task(
    job: SimJob,
    attempt_ids: Sequence[int],
    attachments: bool,
    keep_html_files: bool,
    paper_format: str,
) -> dict[str, Any]:
    """The attempt task, in quiz_archiver's field names."""
    sections = dict.fromkeys(job.sections, "1")
    sections["attachments"] = "1" if attachments else "0"

    return {
        "attemptids": list(attempt_ids),
        "fetch_metadata": True,
        "sections": sections,
        "paper_format": paper_format,
        "keep_html_files": keep_html_files,
        "foldername_pattern": DEFAULT_FOLDERNAME_PATTERN,
        "filename_pattern": DEFAULT_FILENAME_PATTERN,
        "image_optimize": False,
    }


def _quiz_archiver_body(
    sim: MoodleSimulator,
    job: SimJob,
    task: dict[str, Any],
    backups: bool,
    max_upload_bytes: int | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "api_version": 7,
        "moodle_base_url": sim.base_url,
        "moodle_ws_url": sim.ws_url,
        "moodle_upload_url": sim.upload_url,
        "wstoken": job.token,
        "courseid": job.courseid,
        "cmid": job.cmid,
        "quizid": job.quizid,
        "task_archive_quiz_attempts": task,
        "task_moodle_backups": [_backup_entry(sim, job, b) for b in job.backups]
        if backups
        else None,
        "archive_filename": REFERENCE_ARCHIVE_NAME,
    }
    if max_upload_bytes is not None:
        body["moodle_max_upload_bytes"] = max_upload_bytes
    return body


def _backup_entry(sim: MoodleSimulator, job: SimJob, backupid: str) -> dict[str, Any]:
    """A ``task_moodle_backups`` element as quiz_archiver's BackupManager makes it."""
    backup = job.backups[backupid]
    context = job.course_contextid if backup.filearea == "course" else job.contextid
    pathname = f"/{context}/backup/{backup.filearea}/0/{backup.filename}"

    return {
        "backupid": backup.backupid,
        "userid": job.userid,
        "context": context,
        "component": "backup",
        "filearea": backup.filearea,
        "filepath": "/",
        "filename": backup.filename,
        "itemid": None,
        "pathnamehash": hashlib.sha1(
            pathname.encode(), usedforsecurity=False
        ).hexdigest(),
        "file_download_url": sim.base_url + backup.url_path,
    }


def _archivingmod_quiz_body(
    sim: MoodleSimulator,
    job: SimJob,
    task: dict[str, Any],
    max_upload_bytes: int | None,
    extras: dict[str, Any],
) -> dict[str, Any]:
    api: dict[str, Any] = {
        "wstoken": job.token,
        "base_url": sim.base_url,
        "webservice_url": sim.ws_url,
        "upload_url": sim.upload_url,
    }
    if max_upload_bytes is not None:
        api["max_upload_bytes"] = max_upload_bytes

    return {
        "api_version": 1,
        "taskid": job.taskid,
        "moodle_api": api,
        "job": {
            "attemptids": task["attemptids"],
            "report_sections": task["sections"],
            "paper_format": task["paper_format"],
            "archive_filename": "archive-QA-REF-9-quiz-Reference Quiz-23",
            "foldername_pattern": task["foldername_pattern"],
            "filename_pattern": task["filename_pattern"],
            "image_optimize": False,
            "fetch_metadata": True,
            "fetch_attachments": task["sections"]["attachments"] == "1",
            "keep_html_files": task["keep_html_files"],
            **extras,
        },
    }


@functools.cache
def _reference_html(attempt_id: int) -> str:
    return (DATA_DIR / "attempts" / f"{attempt_id}.html").read_text(encoding="utf-8")


def _reference_metadata() -> list[dict[str, Any]]:
    """Rows in Moodle's order and current columns, from the bundled CSV."""
    with (DATA_DIR / "attempts_metadata.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))

    return [
        {
            column: int(row[column])
            if column in _INT_COLUMNS
            else row.get(column, "") or ""
            for column in METADATA_COLUMNS
        }
        for row in rows
    ]


def _escaped(base_url: str, slash: str) -> str:
    # Inside M.cfg the page has JSON-escaped slashes ("http:\/\/moodle").
    return base_url.replace("/", slash)


def _attach_quiz_files(job: SimJob, attempt_id: int) -> None:
    text = f"Essay answer of attempt {attempt_id}.\n".encode()
    job.add_attachment(attempt_id, "essay.txt", text, group="13", mimetype="text/plain")
    job.add_attachment(
        attempt_id, "sketch.png", tiny_png(attempt_id), group="13", mimetype="image/png"
    )
