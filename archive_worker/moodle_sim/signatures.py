"""The parameters each wsfunction declares (``execute_parameters``).

Some depend on the job, as they depend on the plugin version in Moodle: the
report sections, and whether ``artifact_count`` exists (contract 2.2.5,
2.3, 2.4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .model import SimJob
from .params import Multiple, Single, Spec, Value

INT = Value("int")
TEXT = Value("text")
BOOL = Value("bool")
OPTIONAL_INT = Value("int", required=False)
OPTIONAL_TEXT = Value("text", required=False)

Signature = Callable[[SimJob], Mapping[str, Spec]]


def _quiz_ids() -> dict[str, Spec]:
    return {"jobid": TEXT, "courseid": INT, "cmid": INT, "quizid": INT}


def _task_ids() -> dict[str, Spec]:
    return {"uuid": TEXT, "taskid": INT}


def _job_ids(job: SimJob) -> dict[str, Spec]:
    return _quiz_ids() if job.is_quiz_archiver else _task_ids()


def report_signature(job: SimJob) -> dict[str, Spec]:
    """``generate_attempt_report`` / ``generate_submission_report``."""
    item_key = "submissionid" if job.is_assign else "attemptid"
    signature: dict[str, Spec] = {
        **_job_ids(job),
        item_key: INT,
        "foldernamepattern": TEXT,
        "filenamepattern": TEXT,
        "sections": Single(dict.fromkeys(job.sections, BOOL)),
    }
    if not job.is_assign:
        signature["attachments"] = BOOL
    return signature


def metadata_signature(job: SimJob) -> dict[str, Spec]:
    """``get_attempts_metadata`` / ``get_submissions_metadata``."""
    ids = "submissionids" if job.is_assign else "attemptids"
    return {**_job_ids(job), ids: Multiple(INT)}


def process_signature(job: SimJob) -> dict[str, Spec]:
    """``process_uploaded_artifact``; ``artifact_count`` by plugin version."""
    ids: dict[str, Spec] = (
        {"jobid": TEXT} if job.is_quiz_archiver else {"uuid": TEXT, "taskid": TEXT}
    )
    signature: dict[str, Spec] = {
        **ids,
        "artifact_component": TEXT,
        "artifact_contextid": INT,
        "artifact_userid": INT,
        "artifact_filearea": TEXT,
        "artifact_filename": TEXT,
        "artifact_filepath": TEXT,
        "artifact_itemid": INT,
        "artifact_sha256sum": TEXT,
    }
    if job.is_assign:
        signature["artifact_count"] = INT
    elif job.takes_artifact_count:
        signature["artifact_count"] = Value("int", required=False, default=1)
    return signature


def status_signature(job: SimJob) -> dict[str, Spec]:
    """``update_job_status`` / ``update_task_status``."""
    if job.is_quiz_archiver:
        return {"jobid": TEXT, "status": TEXT, "statusextras": OPTIONAL_TEXT}
    return {**_task_ids(), "status": INT, "progress": OPTIONAL_INT}


def backup_signature(job: SimJob) -> dict[str, Spec]:
    """``quiz_archiver_get_backup_status``."""
    return {"jobid": TEXT, "backupid": TEXT}
