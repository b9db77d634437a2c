"""Status events: the published contract for services that follow jobs.

Every transition and progress step of a job is one :class:`StatusEvent` on
``archive.status.<jobid>`` (stream ``ARCHIVE_STATUS``).  The bridge answers
``GET /status/<jobid>`` from the newest event of that subject; the CLI lists
jobs from the stream.  The ``schema`` field names the layout version: fields
may be added within a version, a change that breaks subscribers needs a new
one.
"""

from __future__ import annotations

import enum
import time

import msgspec

from .jobs import JobStatus, MoodleRef

#: Current layout of status events.
STATUS_EVENT_SCHEMA = "archive.status.v1"


class Stage(enum.StrEnum):
    """Names of the pipeline stages, as they appear in events, logs and spans."""

    QUEUED = "queued"
    START = "start"
    REPORT = "report"
    RENDER = "render"
    ATTACHMENTS = "attachments"
    METADATA = "metadata"
    BACKUP = "backup"
    PACK = "pack"
    UPLOAD = "upload"
    DONE = "done"


class StatusEvent(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    tag_field="schema",
    tag=STATUS_EVENT_SCHEMA,
):
    """One step in a job's life.

    The layout version travels as the tag field ``schema`` (always
    :data:`STATUS_EVENT_SCHEMA`): msgspec writes it into every event, even
    with ``omit_defaults``, and refuses an event of another version.

    Attributes:
        job_id: the id the bridge returned to Moodle.
        flavour: which plugin API submitted the job.
        status: the job state after this step.
        progress: percent of reports done (0-100), when known.
        stage: pipeline stage (see :class:`Stage`).
        item: attempt or submission id the step concerns.
        error_code: short code on failure (see ``errors``).
        error: readable cause on failure, naming stage and item.
        worker_id: the worker process that published the event.
        delivery: JetStream delivery count of the job message.
        trace_id: OpenTelemetry trace id (hex) of the job.
        moodle: the Moodle object archived, without any credential.
        time: Unix time of the event.
    """

    job_id: str
    flavour: str
    status: JobStatus
    progress: int | None = None
    stage: str | None = None
    item: int | None = None
    error_code: str | None = None
    error: str | None = None
    worker_id: str | None = None
    delivery: int | None = None
    trace_id: str | None = None
    moodle: MoodleRef | None = None
    time: float = msgspec.field(default_factory=time.time)


#: ``error_code`` of the event an operator's ``cancel`` writes for a job that
#: is still queued.  The job stays AWAITING_PROCESSING; the worker that takes
#: it next reports it CANCELED (FAILED to quiz_archiver) to Moodle instead of
#: running it, so that only workers ever talk to Moodle.
CANCEL_REQUESTED = "cancel_requested"


def cancel_request(job_id: str, flavour: str, moodle: MoodleRef | None) -> StatusEvent:
    """The event that asks the next worker to cancel a queued job."""
    return StatusEvent(
        job_id=job_id,
        flavour=flavour,
        status=JobStatus.AWAITING_PROCESSING,
        stage=Stage.QUEUED,
        error_code=CANCEL_REQUESTED,
        error="cancel requested by an operator",
        moodle=moodle,
    )


def is_cancel_request(event: StatusEvent) -> bool:
    """True for the event :func:`cancel_request` makes."""
    return event.error_code == CANCEL_REQUESTED and not event.status.is_terminal


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StatusEvent)


def encode_event(event: StatusEvent) -> bytes:
    """Serialise an event for ``ARCHIVE_STATUS``."""
    return _encoder.encode(event)


def decode_event(data: bytes) -> StatusEvent:
    """Parse an event; raises ``msgspec.ValidationError`` when malformed."""
    return _decoder.decode(data)
