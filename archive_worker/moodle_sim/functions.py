"""The wsfunctions of quiz_archiver, archivingmod_quiz and archivingmod_assign.

Each handler runs after the REST server's checks and answers as the plugin
does: HTTP 200 with a business ``status`` (``OK`` or ``E_*``), keys in the
declared order (contract 2.2-2.4).  quiz_archiver identifies the job by
``jobid`` (plus course, module and quiz), local_archiving by ``taskid``; both
compare the caller's token with the job's.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from . import files
from .model import (
    DROP,
    QUIZ_ARCHIVER_COMPLETE,
    TASK_COMPLETE,
    TASK_STATUS_CODES,
    SimAttachment,
    SimItem,
    SimJob,
)
from .names import QUIZ_VARIABLES, SUBMISSION_VARIABLES, expand, is_valid_pattern
from .responses import json_response, php_json, rest_error
from .signatures import (
    Signature,
    backup_signature,
    metadata_signature,
    process_signature,
    report_signature,
    status_signature,
)

if TYPE_CHECKING:
    from .server import MoodleSimulator

#: Bytes of report filler written per chunk when streaming a padded report.
PADDING_CHUNK: Final = 1 << 20


@dataclass
class Call:
    """One wsfunction call being answered."""

    sim: MoodleSimulator
    job: SimJob
    request: web.Request
    wsfunction: str
    params: dict[str, Any]


Answer = dict[str, Any] | web.StreamResponse
Handler = Callable[[Call], Awaitable[Answer]]


def _check_jobid(call: Call, not_found: str) -> str | None:
    """quiz_archiver: the job named by ``jobid`` must be the token's job."""
    jobid = call.params["jobid"]
    owner = call.sim.job_by_jobid(jobid)
    if call.job.jobid is None and owner is None:
        call.job.jobid = jobid  # the first call teaches us the worker's id
        return None
    if owner is call.job:
        return None
    return "E_ACCESS_DENIED" if owner is not None else not_found


def _check_task(call: Call) -> str | None:
    """local_archiving: the task must exist and carry the caller's token."""
    taskid = call.params["taskid"]
    owner = call.sim.job_by_taskid(int(taskid)) if str(taskid).isdigit() else None
    if owner is None:
        return "E_TASK_NOT_FOUND"
    if owner is not call.job:
        return "E_ACCESS_DENIED"
    if call.job.jobid is None:
        call.job.jobid = call.params["uuid"]
    return None


def _check_quiz_ids(call: Call) -> str | None:
    job, p = call.job, call.params
    if (p["courseid"], p["cmid"], p["quizid"]) != (job.courseid, job.cmid, job.quizid):
        return "E_ACCESS_DENIED"
    return None


# --- status ----------------------------------------------------------------------


async def _update_job_status(call: Call) -> Answer:
    job, p = call.job, call.params
    problem = _check_jobid(call, "E_UPDATE_FAILED")
    if problem:
        return {"status": problem}
    if job.is_complete:
        return {"status": "E_JOB_ALREADY_COMPLETED"}
    progress = None
    if p["statusextras"] is not None:
        try:
            extras = json.loads(p["statusextras"])
        except ValueError:
            return {"status": "E_INVALID_STATUSEXTRAS_JSON"}
        if isinstance(extras, dict) and isinstance(extras.get("progress"), int):
            progress = extras["progress"]
    _record_status(job, p["status"], progress)
    if p["status"] in QUIZ_ARCHIVER_COMPLETE:
        job.complete(p["status"])

    return {"status": "OK"}


async def _update_task_status(call: Call) -> Answer:
    job, p = call.job, call.params
    problem = _check_task(call)
    if problem:
        return {"status": problem}
    if p["status"] not in TASK_STATUS_CODES:
        return {"status": "E_INVALID_STATUS"}
    if p["progress"] is not None and not 0 <= p["progress"] <= 100:
        return {"status": "E_INVALID_PROGRESS"}
    if job.is_complete:
        return {"status": "E_ALREADY_COMPLETED"}
    _record_status(job, p["status"], p["progress"])
    if p["status"] in TASK_COMPLETE:
        job.complete(p["status"])

    return {"status": "OK"}


def _record_status(job: SimJob, status: Any, progress: int | None) -> None:
    job.statuses.append(status)
    job.state = status
    if progress is not None:
        job.progress.append(progress)


# --- reports -----------------------------------------------------------------------


async def _generate_report(call: Call) -> Answer:
    refusal = _report_refusal(call)
    if refusal is not None:
        return refusal
    item = call.job.items[call.params[_item_key(call.job)]]
    answer = _report_answer(call, item)
    for key, value in item.overrides.items():
        if value is DROP:
            answer.pop(key, None)
        else:
            answer[key] = value
    suffix = "</body></html>" if call.sim.report_quirk else ""
    if item.report_padding:
        return await _stream_padded(call, answer, item.report_padding, suffix)

    return json_response(answer, suffix=suffix)


def _item_key(job: SimJob) -> str:
    return "submissionid" if job.is_assign else "attemptid"


def _report_refusal(call: Call) -> Answer | None:
    """The plugin's checks before it renders a report, in its order."""
    job, p = call.job, call.params
    if job.is_quiz_archiver:
        problem = _check_jobid(call, "E_JOB_NOT_FOUND") or _check_quiz_ids(call)
    else:
        problem = _check_task(call)
    if problem:
        return {"status": problem}
    variables = SUBMISSION_VARIABLES if job.is_assign else QUIZ_VARIABLES
    for key, folder in (("foldernamepattern", True), ("filenamepattern", False)):
        if not is_valid_pattern(p[key], variables, folder=folder):
            if job.is_quiz_archiver:
                return _invalid(call, f"Report {key} is invalid")
            return {"status": f"E_INVALID_{'FOLDER' if folder else 'FILE'}NAME_PATTERN"}
    if p[_item_key(job)] not in job.items:
        if job.is_quiz_archiver:
            return _invalid(call, "No attempt with given attemptid found")
        return {"status": f"E_{_item_key(job)[:-2].upper()}_NOT_FOUND"}
    return None


def _report_answer(call: Call, item: SimItem) -> dict[str, Any]:
    """The answer in the key order the functions declare (contract 2.2.2)."""
    job, p = call.job, call.params
    values = _pattern_values(job, item.item_id)
    answer: dict[str, Any] = {}
    if job.is_quiz_archiver:
        answer |= {"courseid": job.courseid, "cmid": job.cmid, "quizid": job.quizid}
    answer[_item_key(job)] = item.item_id
    answer["foldername"] = item.foldername
    if item.foldername is None:
        answer["foldername"] = expand(p["foldernamepattern"], values, folder=True)
    answer["filename"] = item.filename
    if item.filename is None:
        answer["filename"] = expand(p["filenamepattern"], values, folder=False)
    answer["report"] = item.html
    with_files = job.is_assign or p["attachments"]
    answer["attachments"] = [
        _attachment_entry(call, a) for a in (item.attachments if with_files else [])
    ]
    answer["status"] = "OK"

    return answer


def _attachment_entry(call: Call, attachment: SimAttachment) -> dict[str, Any]:
    group_key = "type" if call.job.is_assign else "slot"
    group = attachment.group if call.job.is_assign else _int_or_text(attachment.group)
    url = attachment.download_url or call.sim.base_url + attachment.url_path

    return {
        group_key: group,
        "filename": attachment.filename,
        "filesize": len(attachment.content),
        "mimetype": attachment.mimetype,
        "contenthash": attachment.announced_hash(),
        "downloadurl": url,
    }


def _int_or_text(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _pattern_values(job: SimJob, item_id: int) -> dict[str, Any]:
    key = "submissionid" if job.is_assign else "attemptid"
    row = next((r for r in job.metadata if r.get(key) == item_id), {})

    return {
        **row,
        "courseid": job.courseid,
        "coursename": job.coursename,
        "courseshortname": job.courseshortname,
        "cmid": job.cmid,
        "quizid": job.quizid,
        "quizname": job.activityname,
        "assignmentid": job.assignmentid,
        "assignmentname": job.activityname,
        key: item_id,
    }


async def _stream_padded(
    call: Call, answer: dict[str, Any], padding: int, suffix: str
) -> web.StreamResponse:
    """Send ``answer`` with ``padding`` filler bytes inside the report, lazily."""
    marker = "\x00PADDING\x00"
    answer = {**answer, "report": str(answer.get("report", "")) + marker}
    head, tail = php_json(answer).split(php_json(marker)[1:-1], 1)
    head_bytes, tail_bytes = head.encode(), (tail + suffix).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(head_bytes) + padding + len(tail_bytes)
    await response.prepare(call.request)
    await response.write(head_bytes)
    chunk = b"x" * PADDING_CHUNK
    remaining = padding
    try:
        while remaining > 0 and not call.sim.stopping.is_set():
            await response.write(chunk[: min(remaining, PADDING_CHUNK)])
            remaining -= PADDING_CHUNK
        await response.write(tail_bytes)
    except ConnectionError:
        pass  # the client gave up, as it should

    return response


def _invalid(call: Call, debuginfo: str) -> web.Response:
    return rest_error(
        "invalidparameter",
        "Invalid parameter value detected",
        exception="invalid_parameter_exception",
        debuginfo=debuginfo if call.sim.debug else None,
    )


# --- metadata and backups -------------------------------------------------------------


async def _get_metadata(call: Call) -> Answer:
    job, p = call.job, call.params
    if job.is_quiz_archiver:
        problem = _check_jobid(call, "E_JOB_NOT_FOUND") or _check_quiz_ids(call)
    else:
        problem = _check_task(call)
    if problem:
        return {"status": problem}
    key, rows_key = (
        ("submissionid", "submissions") if job.is_assign else ("attemptid", "attempts")
    )
    wanted = set(p[f"{key}s"])
    rows = [row for row in job.metadata if row.get(key) in wanted]
    if not rows and not job.is_quiz_archiver:
        return {"status": f"E_{key[:-2].upper()}_NOT_FOUND"}
    activity = (
        ("assignmentid", job.assignmentid) if job.is_assign else ("quizid", job.quizid)
    )

    return {
        "status": "OK",
        "courseid": job.courseid,
        "cmid": job.cmid,
        activity[0]: activity[1],
        rows_key: rows,
    }


async def _get_backup_status(call: Call) -> Answer:
    problem = _check_jobid(call, "E_JOB_NOT_FOUND")
    if problem:
        return {"status": problem}
    backup = call.job.backups.get(call.params["backupid"])
    if backup is None:
        return {"status": "E_BACKUP_NOT_FOUND"}

    return {"status": backup.next_status()}


async def _process_uploaded_artifact(call: Call) -> Answer:
    if call.job.is_quiz_archiver:
        problem = _check_jobid(call, "E_JOB_NOT_FOUND")
    else:
        problem = _check_task(call)
    if problem:
        return {"status": problem}

    return {"status": await files.process_artifact(call.sim, call.job, call.params)}


# --- signatures ----------------------------------------------------------------------


#: wsfunction -> (flavour, handler, declared parameters).
FUNCTIONS: Final[dict[str, tuple[str, Handler, Signature]]] = {
    "quiz_archiver_update_job_status": (
        "quiz_archiver",
        _update_job_status,
        status_signature,
    ),
    "quiz_archiver_generate_attempt_report": (
        "quiz_archiver",
        _generate_report,
        report_signature,
    ),
    "quiz_archiver_get_attempts_metadata": (
        "quiz_archiver",
        _get_metadata,
        metadata_signature,
    ),
    "quiz_archiver_get_backup_status": (
        "quiz_archiver",
        _get_backup_status,
        backup_signature,
    ),
    "quiz_archiver_process_uploaded_artifact": (
        "quiz_archiver",
        _process_uploaded_artifact,
        process_signature,
    ),
}
for _flavour, _report_function, _metadata_function in (
    (
        "archivingmod_quiz",
        "archivingmod_quiz_generate_attempt_report",
        "archivingmod_quiz_get_attempts_metadata",
    ),
    (
        "archivingmod_assign",
        "archivingmod_assign_generate_submission_report",
        "archivingmod_assign_get_submissions_metadata",
    ),
):
    FUNCTIONS[f"{_flavour}_update_task_status"] = (
        _flavour,
        _update_task_status,
        status_signature,
    )
    FUNCTIONS[_report_function] = (_flavour, _generate_report, report_signature)
    FUNCTIONS[_metadata_function] = (_flavour, _get_metadata, metadata_signature)
    FUNCTIONS[f"{_flavour}_process_uploaded_artifact"] = (
        _flavour,
        _process_uploaded_artifact,
        process_signature,
    )
