"""``dlq list|show|retry|purge``: jobs that exhausted their deliveries.

Dead letters are kept without the Moodle token (see ``worker.consumer``), and
Moodle revokes a job's token once it hears FAILED.  So ``retry`` can only
work with the job's token given back (``--token``), and only while Moodle
still accepts it: the command checks that the token belongs to the job (its
id is derived from it), probes Moodle with it, and otherwise says why not.
The usual remedy is to start the archive job again in Moodle.
"""

from __future__ import annotations

import time

import msgspec
from rich.console import Console

from archive_worker import constants as c
from archive_worker.broker import Broker
from archive_worker.config import Settings
from archive_worker.errors import ArchiveWorkerError
from archive_worker.events import Stage, StatusEvent
from archive_worker.jobs import JobSpec, JobStatus, job_identity

from . import natsio
from .jobs import JobNotFound, resolve_job_id
from .model import DeadLetter
from .output import age, clock, since, table


class RetryRefused(ArchiveWorkerError):
    """A dead letter cannot be republished; the message says why."""


def _letter(data: bytes) -> DeadLetter | None:
    try:
        raw = msgspec.json.decode(data)
        job = raw.get("job") or {}
        return DeadLetter(
            job_id=str(job.get("job_id", "")),
            flavour=str(job.get("flavour", "")),
            error=str(raw.get("error", "")),
            error_code=raw.get("error_code"),
            deliveries=raw.get("deliveries"),
            worker_id=raw.get("worker_id"),
            failed_at=float(raw.get("failed_at", 0.0)),
            base_url=(job.get("moodle") or {}).get("base_url"),
            job=job,
        )
    except (msgspec.DecodeError, AttributeError, TypeError, ValueError):
        return None


async def list_letters(broker: Broker) -> list[DeadLetter]:
    """Every dead letter, newest first."""
    msgs = await natsio.last_per_subject(broker, c.DLQ_STREAM, c.DLQ_SUBJECTS)
    letters = [x for x in (_letter(m.data) for m in msgs) if x is not None]

    return sorted(letters, key=lambda x: -x.failed_at)


async def show_letter(broker: Broker, text: str) -> DeadLetter:
    """One job's dead letter.

    Raises:
        JobNotFound: the job has no dead letter.
    """
    job_id = await resolve_job_id(broker, text)
    msgs = await natsio.subject_history(broker, c.DLQ_STREAM, c.dlq_subject(job_id))
    letter = _letter(msgs[-1].data) if msgs else None
    if letter is None:
        raise JobNotFound(f"job {job_id} has no dead letter")

    return letter


async def retry_letter(
    broker: Broker, settings: Settings, text: str, *, token: str | None
) -> str:
    """Republish a dead-lettered job; returns the job id.

    Raises:
        RetryRefused: no token, a token of another job, or Moodle refuses it.
        JobNotFound: no such dead letter.
    """
    letter = await show_letter(broker, text)
    if not token:
        raise RetryRefused(
            "dead letters are kept without the Moodle token, and Moodle revokes "
            "it once told FAILED; pass the job's token with --token if Moodle "
            "still has it, or start the archive job again in Moodle"
        )
    stored = letter.job.get("moodle")
    moodle = {**(stored if isinstance(stored, dict) else {}), "token": token}
    job = {**letter.job, "moodle": moodle}
    try:
        spec = msgspec.convert(job, JobSpec)
    except msgspec.ValidationError as exc:
        raise RetryRefused(f"the dead letter is not a job any more: {exc}") from None
    job_id, msg_id = job_identity(spec.flavour, spec.moodle.base_url, token)
    if job_id != spec.job_id:
        raise RetryRefused("this token does not belong to the job")
    if not await _moodle_accepts(spec, settings):
        raise RetryRefused(
            "Moodle no longer accepts the job's token (it revokes it when told "
            "FAILED); start the archive job again in Moodle"
        )
    # The newest event must not be terminal, or the worker drops the job.
    await broker.publish_event(
        StatusEvent(
            job_id=spec.job_id,
            flavour=spec.flavour.value,
            status=JobStatus.AWAITING_PROCESSING,
            stage=Stage.QUEUED,
            error="requeued from the dead letter queue by an operator",
            moodle=spec.moodle_ref(),
        )
    )
    # A new message id: the original may still be in the duplicate window.
    await broker.publish_job(spec, msg_id=f"{msg_id}-retry-{int(time.time())}")
    await natsio.purge_subject(broker, c.DLQ_STREAM, c.dlq_subject(spec.job_id))

    return spec.job_id


async def _moodle_accepts(spec: JobSpec, settings: Settings) -> bool:
    from bridge.probe import open_probe_session, probe_moodle

    session = open_probe_session(settings)
    try:
        return await probe_moodle(session, spec.moodle, spec.flavour, settings)
    finally:
        await session.close()


async def purge_letters(broker: Broker, text: str | None) -> int:
    """Remove one job's dead letter, or all of them; returns how many."""
    if text is None:
        count = len(await list_letters(broker))
        await natsio.purge_subject(broker, c.DLQ_STREAM, None)
        return count
    letter = await show_letter(broker, text)
    await natsio.purge_subject(broker, c.DLQ_STREAM, c.dlq_subject(letter.job_id))

    return 1


def render_letters(letters: list[DeadLetter], out: Console) -> None:
    """Print the dead letter list."""
    if not letters:
        out.print("no dead letters")
        return
    cells = [
        (
            x.job_id,
            x.flavour,
            x.base_url,
            x.deliveries,
            x.error_code,
            x.error,
            age(since(x.failed_at)),
        )
        for x in letters
    ]
    out.print(
        table(
            None,
            ("job", "flavour", "moodle", "deliveries", "code", "error", "age"),
            cells,
        )
    )


def render_letter(x: DeadLetter, out: Console) -> None:
    """Print one dead letter."""
    out.print(
        f"job       {x.job_id}\nflavour   {x.flavour}\nmoodle    {x.base_url}",
        markup=False,
    )
    out.print(
        f"failed    {clock(x.failed_at)} on {x.worker_id} after {x.deliveries} deliveries",
        markup=False,
    )
    out.print(f"error     [{x.error_code}] {x.error}", markup=False)
    out.print(
        msgspec.json.format(msgspec.json.encode(x.job), indent=2).decode(), markup=False
    )
