"""Reports and metadata rows as Moodle answers them, checked before use.

:class:`Report` and :class:`Attachment` are what
:meth:`~archive_worker.moodle.MoodleClient.generate_report` returns;
:func:`parse_report` and :func:`parse_metadata` turn a function's answer
object into them, or raise :class:`~archive_worker.errors.MoodleRejected`
or :class:`~archive_worker.errors.MoodleBadResponse` (2.2.2, 2.2.3, 2.3, 2.4).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import MoodleBadResponse, MoodleRejected
from ..jobs import Flavour, JobSpec
from .names import (
    attachment_name_problem,
    file_problem,
    folder_problem,
    is_pluginfile_url,
)
from .wire import Api, is_int, shorten

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


def parse_report(
    data: dict[str, Any], item_id: int, *, spec: JobSpec, api: Api, base_url: str
) -> Report:
    """Check a report answer of ``spec``'s Moodle at ``base_url``."""

    def bad(problem: str) -> MoodleBadResponse:
        return MoodleBadResponse(
            f"{api.report} returned {problem} for {spec.item_kind} {item_id}",
            stage="report",
            attempt=item_id,
        )

    status = data.get("status")
    if status != "OK" and (status is not None or not _is_quiz(spec)):
        raise MoodleRejected(
            f"{api.report} answered status {status!r} for {spec.item_kind} {item_id}",
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
        if not is_int(data[key]) or data[key] != value:
            raise bad(f"{key}={data[key]!r} where {value!r} was expected")
    for key in ("foldername", "filename", "report"):
        if not isinstance(data[key], str):
            raise bad(f"a {key} that is not a string")
    if not isinstance(data["attachments"], list):
        raise bad("an attachment list that is not a list")
    for key, check in (
        ("foldername", folder_problem),
        ("filename", file_problem),
    ):
        problem = check(data[key])
        if problem:
            raise bad(f"an unsafe {key} {shorten(data[key])}: {problem}")
    attachments = [
        _parse_attachment(entry, item_id, bad, quiz=_is_quiz(spec), base_url=base_url)
        for entry in data["attachments"]
    ]

    return Report(
        item_id=item_id,
        foldername=data["foldername"],
        filename=data["filename"],
        html=data["report"],
        attachments=attachments,
    )


def _parse_attachment(
    entry: object,
    item_id: int,
    bad: Callable[[str], MoodleBadResponse],
    *,
    quiz: bool,
    base_url: str,
) -> Attachment:
    group_key = "slot" if quiz else "type"
    keys = (group_key, "filename", "filesize", "mimetype", "contenthash")
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise bad("an attachment entry of the wrong shape")
    group = entry[group_key]
    if quiz and not is_int(group):
        raise bad("an attachment slot that is not an integer")
    if not quiz and not (isinstance(group, str) and _ATTACHMENT_TYPE.fullmatch(group)):
        raise bad(f"an invalid attachment type {shorten(group)}")
    name, url = entry["filename"], entry.get("downloadurl")
    problem = attachment_name_problem(name)
    if problem:
        raise bad(f"an unsafe attachment filename {shorten(name)}: {problem}")
    if not is_int(entry["filesize"]) or entry["filesize"] < 0:
        raise bad(f"an invalid size for attachment {shorten(name)}")
    if not isinstance(entry["mimetype"], str):
        raise bad(f"an invalid mimetype for attachment {shorten(name)}")
    digest = entry["contenthash"]
    if not isinstance(digest, str) or not _SHA1_HEX.fullmatch(digest):
        raise bad(f"an invalid contenthash for attachment {shorten(name)}")
    if not isinstance(url, str) or not is_pluginfile_url(base_url, url):
        raise bad(f"a download URL outside this Moodle for {shorten(name)}")

    return Attachment(
        group=str(group),
        filename=name,
        filesize=entry["filesize"],
        mimetype=entry["mimetype"],
        contenthash=digest.lower(),
        download_url=url,
        item_id=item_id,
    )


def _is_quiz(spec: JobSpec) -> bool:
    return spec.flavour is not Flavour.ARCHIVINGMOD_ASSIGN


def parse_metadata(
    data: dict[str, Any], *, spec: JobSpec, api: Api
) -> list[dict[str, Any]]:
    """Check a metadata answer and return its rows."""

    def bad(problem: str) -> MoodleBadResponse:
        return MoodleBadResponse(f"{api.metadata} returned {problem}", stage="metadata")

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
