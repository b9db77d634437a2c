"""Every wire name the service uses on NATS, in one place.

Subjects, stream, consumer, bucket and header names are part of the contract
with operators (ACLs in ``deploy/nats``) and with subscribers of the status
events, so nothing else in the code spells them out.
"""

from __future__ import annotations

APP_NAME = "moodle-archive-worker"

# --- streams -----------------------------------------------------------------

#: Work-queue stream holding one message per accepted job (contains the token).
JOBS_STREAM = "ARCHIVE_JOBS"
#: ``archive.jobs.<flavour>``.
JOBS_SUBJECT_PREFIX = "archive.jobs"
JOBS_SUBJECTS = f"{JOBS_SUBJECT_PREFIX}.>"

#: Limits-retention stream of status events, one subject per job.
STATUS_STREAM = "ARCHIVE_STATUS"
#: ``archive.status.<jobid>``.
STATUS_SUBJECT_PREFIX = "archive.status"
STATUS_SUBJECTS = f"{STATUS_SUBJECT_PREFIX}.>"

#: Dead letters: jobs that exhausted their deliveries, stored without token.
DLQ_STREAM = "ARCHIVE_DLQ"
DLQ_SUBJECT_PREFIX = "archive.dlq"
DLQ_SUBJECTS = f"{DLQ_SUBJECT_PREFIX}.>"

#: Control messages (plain core NATS, no stream): ``archive.control.cancel.<id>``.
CONTROL_SUBJECT_PREFIX = "archive.control"
CANCEL_SUBJECT_PREFIX = f"{CONTROL_SUBJECT_PREFIX}.cancel"

#: Durable pull consumer shared by every worker process.
WORKERS_CONSUMER = "archive-workers"

#: Object store bucket for per-job checkpoints of rendered attempts.
CHECKPOINT_BUCKET = "ARCHIVE_CHECKPOINTS"

#: Name of the NATS micro service every worker registers as.
MICRO_SERVICE_NAME = "archive-worker"

# --- headers -----------------------------------------------------------------

#: JetStream de-duplication header; value derived from the job (see ``jobs``).
MSG_ID_HEADER = "Nats-Msg-Id"
JOB_ID_HEADER = "Archive-Job-Id"
FLAVOUR_HEADER = "Archive-Flavour"
#: W3C trace context travels in these (OpenTelemetry propagator names).
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"


def job_subject(flavour: str) -> str:
    """Subject a job of ``flavour`` is published on."""
    return f"{JOBS_SUBJECT_PREFIX}.{flavour}"


def status_subject(job_id: str) -> str:
    """Subject carrying the status events of one job."""
    return f"{STATUS_SUBJECT_PREFIX}.{job_id}"


def dlq_subject(job_id: str) -> str:
    """Subject of one job's dead letter."""
    return f"{DLQ_SUBJECT_PREFIX}.{job_id}"


def cancel_subject(job_id: str) -> str:
    """Subject a cancel request for one job is sent on."""
    return f"{CANCEL_SUBJECT_PREFIX}.{job_id}"
