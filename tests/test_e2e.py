"""End to end: Moodle (simulated over HTTP) -> bridge -> NATS -> worker -> Moodle.

Every test runs the real bridge, a real nats-server, the real worker with
Chromium, and the Moodle simulator on loopback, and checks what Moodle
received: the archive (unpacked and compared), the status calls, and the
status events on NATS.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable
from typing import Any

import pypdf
import pytest

from archive_worker.config import Settings
from archive_worker.devstack import DevStack, dev_stack
from archive_worker.events import StatusEvent
from archive_worker.jobs import JobStatus
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.model import SimJob
from archive_worker.moodle_sim.scenario import reference_quiz

from .test_pdf import PDFAID_NS, xmp_values

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Text that only the report of each reference attempt contains.
ATTEMPT_TEXT = {
    23: "anonfirstname3 anonlastname3",
    24: "anonfirstname4 anonlastname4",
    25: "anonfirstname2 anonlastname2",
}


async def run_job(
    stack: DevStack, flavour: str, body: dict[str, Any]
) -> list[StatusEvent]:
    """Submit a job and collect its events until it ends."""
    events: list[StatusEvent] = []
    job_id = await stack.submit(flavour, body)
    await stack.wait_for_end(job_id, on_event=events.append)
    return events


def unpack(job: SimJob) -> dict[str, bytes]:
    """The archive Moodle stored, as member name -> bytes."""
    with zipfile.ZipFile(io.BytesIO(job.archive_bytes())) as archive:
        assert not [i for i in archive.infolist() if i.is_dir()]
        return {name: archive.read(name) for name in archive.namelist()}


def pdf_text(data: bytes) -> str:
    """All text of a PDF, whitespace folded."""
    reader = pypdf.PdfReader(io.BytesIO(data))
    assert len(reader.pages) > 0
    return " ".join(" ".join(page.extract_text().split()) for page in reader.pages)


def empty_job_body(moodle: MoodleSimulator, token: str) -> dict[str, Any]:
    """The contract's ``empty_job``: no attempts, no backups."""
    return {
        "api_version": 7,
        "moodle_base_url": moodle.base_url,
        "moodle_ws_url": moodle.ws_url,
        "moodle_upload_url": moodle.upload_url,
        "wstoken": token,
        "courseid": 1,
        "cmid": 1,
        "quizid": 1,
        "task_archive_quiz_attempts": None,
        "task_moodle_backups": None,
        "archive_filename": "archive",
    }


def assert_sidecars(members: dict[str, bytes]) -> None:
    """Every member has a sidecar with its SHA-256, and sidecars have none."""
    payload = {n: d for n, d in members.items() if not n.endswith(".sha256")}
    assert {n + ".sha256" for n in payload} == set(members) - set(payload)
    for name, data in payload.items():
        assert members[name + ".sha256"] == hashlib.sha256(data).hexdigest().encode()


class TestQuizArchiver:
    async def test_reference_quiz(self, stack: DevStack) -> None:
        """The reference quiz ends in Moodle as the contract's archive layout."""
        job, body = reference_quiz(stack.moodle, attachments=True)
        events = await run_job(stack, "quiz_archiver", body)

        members = unpack(job)
        expected: set[str] = {"attempts_metadata.csv"}
        for attempt in (24, 25, 23):
            base = f"attempts/attempt-{attempt}/attempt-{attempt}"
            expected |= {base + ".pdf", base + ".html"}
            expected |= {
                f"attempts/attempt-{attempt}/attachments/13/essay.txt",
                f"attempts/attempt-{attempt}/attachments/13/sketch.png",
            }
        expected |= {
            "backups/quiz_archiver-activity-backup-23.mbz",
            "backups/quiz_archiver-course-backup-9.mbz",
        }
        assert set(members) == expected | {n + ".sha256" for n in expected}
        assert_sidecars(members)
        for attempt, text in ATTEMPT_TEXT.items():
            base = f"attempts/attempt-{attempt}/attempt-{attempt}"
            assert text in pdf_text(members[base + ".pdf"])
            assert members[base + ".html"].decode() == job.items[attempt].html
            essay = members[f"attempts/attempt-{attempt}/attachments/13/essay.txt"]
            assert essay == f"Essay answer of attempt {attempt}.\n".encode()
        for backup in job.backups.values():
            assert members[f"backups/{backup.filename}"] == backup.content
        assert members["attempts_metadata.csv"] == (
            b'"attemptid","userid","username","firstname","lastname","idnumber",'
            b'"timestart","timefinish","attempt","state","path"\r\n'
            b'25,8,"anon2","anonfirstname2","anonlastname2","",1701169729,1701169823,'
            b'1,"finished","attempts/attempt-25/attempt-25"\r\n'
            b'23,9,"anon3","anonfirstname3","anonlastname3","",1701169952,1701170066,'
            b'1,"finished","attempts/attempt-23/attempt-23"\r\n'
            b'24,10,"anon4","anonfirstname4","anonlastname4","",1701170083,1701170281,'
            b'1,"finished","attempts/attempt-24/attempt-24"\r\n'
        )

        assert job.state == "FINISHED"
        assert job.artifact_sha256 == hashlib.sha256(job.archive_bytes()).hexdigest()
        assert job.statuses == ["RUNNING"] * 4 + ["FINALIZING"]
        assert job.progress == [0, 33, 67, 100]
        assert len(job.uploads) == 1
        statuses = [e.status for e in events]
        assert statuses[0] is JobStatus.AWAITING_PROCESSING
        assert statuses[-2:] == [JobStatus.FINALIZING, JobStatus.FINISHED]
        assert {e.item for e in events if e.stage == "render"} == {23, 24, 25}

    async def test_backup_wait(self, stack: DevStack) -> None:
        """Pending backups are waited for, WAITING_FOR_BACKUP reported once."""
        job, body = reference_quiz(
            stack.moodle,
            attempt_ids=[24],
            keep_html_files=False,
            backup_statuses=("E_BACKUP_PENDING", "E_BACKUP_PENDING", "SUCCESS"),
        )
        await run_job(stack, "quiz_archiver", body)

        assert job.statuses == [
            "RUNNING",
            "RUNNING",
            "WAITING_FOR_BACKUP",
            "FINALIZING",
        ]
        members = unpack(job)
        assert "attempts/attempt-24/attempt-24.html" not in members
        assert "backups/quiz_archiver-course-backup-9.mbz" in members

    async def test_empty_job(self, stack: DevStack) -> None:
        """A job without attempts and backups uploads a valid, empty archive."""
        job = stack.moodle.add_job(
            "opensesame", "quiz_archiver", courseid=1, cmid=1, quizid=1
        )
        body = empty_job_body(stack.moodle, "opensesame")
        await run_job(stack, "quiz_archiver", body)
        assert unpack(job) == {}
        assert job.state == "FINISHED"


class TestArchivingmodQuiz:
    async def test_reference_quiz_chunked(self, stack: DevStack) -> None:
        """archivingmod_quiz gets task codes, progress, and a chunked upload."""
        job, body = reference_quiz(
            stack.moodle,
            "archivingmod_quiz",
            attempt_ids=[25, 23],
            keep_html_files=False,
            max_upload_bytes=400_000,
        )
        await run_job(stack, "archivingmod_quiz", body)

        members = unpack(job)
        assert set(members) == {
            "attempts/attempt-25/attempt-25.pdf",
            "attempts/attempt-25/attempt-25.pdf.sha256",
            "attempts/attempt-23/attempt-23.pdf",
            "attempts/attempt-23/attempt-23.pdf.sha256",
            "attempts_metadata.csv",
            "attempts_metadata.csv.sha256",
        }
        for attempt in (25, 23):
            pdf = members[f"attempts/attempt-{attempt}/attempt-{attempt}.pdf"]
            assert ATTEMPT_TEXT[attempt] in pdf_text(pdf)
        csv_lines = members["attempts_metadata.csv"].split(b"\r\n")
        assert csv_lines[1].endswith(b'"attempts/attempt-25/attempt-25.pdf"')
        assert job.statuses == [100, 100, 100, 200]
        assert job.progress == [0, 50, 100]
        assert job.state == 220
        assert job.artifact_count is not None
        assert job.artifact_count > 1
        name = "archive-QA-REF-9-quiz-Reference Quiz-23.zip"
        assert [u.stored for u in job.uploads] == [
            [f"{name}.chunk{i:09d}.bin"] for i in range(job.artifact_count)
        ]
        assert len({u.itemid for u in job.uploads}) == 1


class TestArchivingmodAssign:
    async def test_submissions_flat(self, stack: DevStack) -> None:
        """archivingmod_assign: flat layout, attachment type filter, CSV."""
        job, body = reference_quiz(stack.moodle, "archivingmod_assign", flatten=True)
        body["job"]["attachment_types"]["feedback"] = False
        await run_job(stack, "archivingmod_assign", body)

        members = unpack(job)
        names = {n for n in members if not n.endswith(".sha256")}
        assert names == {
            "submission_101.submission-101.pdf",
            "submission_101.submission-101.html",
            "submission_101.submission-101.assignment.instructions.txt",
            "submission_101.submission-101.submission.essay.txt",
            "submission_101.submission-101.annotation.annotated.png",
            "submission_102.submission-102.pdf",
            "submission_102.submission-102.html",
            "submission_102.submission-102.submission.essay.txt",
            "submissions_metadata.csv",
        }
        assert_sidecars(members)
        for sid in (101, 102):
            assert f"Submission {sid}" in pdf_text(
                members[f"submission_{sid}.submission-{sid}.pdf"]
            )
        header, first = members["submissions_metadata.csv"].split(b"\r\n")[:2]
        assert header.startswith(b'"submissionid","userid","username"')
        assert header.endswith(b'"timestarted","path"')
        assert first.endswith(b'"submission_101.submission-101.pdf"')
        assert job.statuses == [100, 100, 100, 200]
        assert job.state == 220


class TestFailures:
    async def test_moodle_down_mid_job(
        self, stack_settings: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """Moodle going away mid-job: retried with backoff, then FINISHED once."""
        job, body = reference_quiz(moodle, attempt_ids=[24, 25], backups=False)
        events: list[StatusEvent] = []
        taken_down = False
        async with dev_stack(stack_settings(), moodle=moodle) as stack:
            job_id = await stack.submit("quiz_archiver", body)
            async with stack.broker.follow_events(job_id) as stream:
                async for event in stream:
                    events.append(event)
                    if event.stage == "render" and not taken_down:
                        taken_down = True
                        await moodle.take_down()
                    elif event.status is JobStatus.AWAITING_PROCESSING and event.error:
                        await moodle.bring_up()
                    if event.status.is_terminal:
                        break

        retry = [
            e for e in events if e.status is JobStatus.AWAITING_PROCESSING and e.error
        ]
        assert retry
        assert retry[0].error_code == "moodle_unavailable"
        assert events[-1].status is JobStatus.FINISHED
        assert job.state == "FINISHED"
        assert len(job.uploads) == 1
        assert {n for n in unpack(job) if n.endswith(".pdf")} == {
            "attempts/attempt-24/attempt-24.pdf",
            "attempts/attempt-25/attempt-25.pdf",
        }

    async def test_report_never_ready(
        self, stack_settings: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """A page whose MathJax never finishes fails the job, naming the attempt."""
        job, body = reference_quiz(moodle, attempt_ids=[24], backups=False)
        job.items[24].html = NEVER_READY_PAGE
        async with dev_stack(
            stack_settings(ready_signal_timeout_s=1), moodle=moodle
        ) as s:
            events = await run_job(s, "quiz_archiver", body)
        end = events[-1]
        assert end.status is JobStatus.FAILED
        assert end.item == 24
        assert end.error is not None
        assert "Ready signal not received" in end.error
        assert job.statuses[-1] == "FAILED"
        assert job.archive_path is None

    async def test_download_over_limit(
        self, stack_settings: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """An attachment over the size limit fails the job without an upload."""
        job, body = reference_quiz(
            moodle, attempt_ids=[24], backups=False, attachments=True
        )
        async with dev_stack(
            stack_settings(attachment_max_bytes=50), moodle=moodle
        ) as s:
            events = await run_job(s, "quiz_archiver", body)
        assert events[-1].status is JobStatus.FAILED
        assert events[-1].error_code == "download_too_large"
        assert events[-1].stage == "attachments"
        assert job.statuses[-1] == "FAILED"
        assert job.uploads == []

    async def test_hash_mismatch(self, stack: DevStack) -> None:
        """An attachment whose SHA-1 differs from Moodle's fails the job."""
        job, body = reference_quiz(
            stack.moodle, attempt_ids=[24], backups=False, attachments=True
        )
        job.items[24].attachments[0].contenthash = "0" * 40
        events = await run_job(stack, "quiz_archiver", body)
        assert events[-1].status is JobStatus.FAILED
        assert events[-1].error_code == "checksum_mismatch"
        assert events[-1].item == 24
        assert job.statuses[-1] == "FAILED"
        assert job.uploads == []

    async def test_failed_backup(self, stack: DevStack) -> None:
        """A backup Moodle reports failed fails the job at once (not TIMEOUT)."""
        job, body = reference_quiz(
            stack.moodle,
            attempt_ids=[24],
            keep_html_files=False,
            backup_statuses=("E_BACKUP_PENDING", "E_BACKUP_FAILED"),
        )
        events = await run_job(stack, "quiz_archiver", body)
        assert events[-1].status is JobStatus.FAILED
        assert events[-1].error_code == "backup_failed"
        assert job.statuses[-2:] == ["WAITING_FOR_BACKUP", "FAILED"]
        assert job.uploads == []

    async def test_job_time_limit(
        self, stack_settings: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """A job past its time limit ends as TIMEOUT, frees its slot, uploads nothing."""
        job, body = reference_quiz(moodle, attempt_ids=[24], backups=False)
        release = moodle.hang("quiz_archiver_generate_attempt_report", times=None)
        async with dev_stack(stack_settings(job_timeout_s=1.5), moodle=moodle) as s:
            events = await run_job(s, "quiz_archiver", body)
            release.set()
            # The slot is free again: a second (empty) job runs to the end.
            job2 = moodle.add_job(
                "second-token", "quiz_archiver", courseid=1, cmid=1, quizid=1
            )
            body2 = empty_job_body(moodle, "second-token")
            events2 = await run_job(s, "quiz_archiver", body2)
        assert events[-1].status is JobStatus.TIMEOUT
        assert job.statuses[-1] == "TIMEOUT"
        assert job.uploads == []
        assert events2[-1].status is JobStatus.FINISHED
        assert job2.state == "FINISHED"


#: MathJax is "present" with a formula on the page, but its startup promise
#: never settles: the readiness wait can only time out.
NEVER_READY_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<script>window.MathJax = {version: "3.2.2", startup: {promise: new Promise(() => {})}};
</script></head><body class="quiz-archiver-report">
<span class="filter_mathjaxloader_equation">\\(x^2\\)</span></body></html>"""


class TestPostprocessing:
    async def test_pdfa_and_image_optimisation(
        self, stack_settings: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """With PDF/A on and image_optimize set, archived PDFs claim PDF/A-3b."""
        job, body = reference_quiz(
            moodle, attempt_ids=[23], backups=False, keep_html_files=False
        )
        body["task_archive_quiz_attempts"]["image_optimize"] = {
            "width": 64,
            "height": 64,
            "quality": 60,
        }
        async with dev_stack(stack_settings(pdfa_conversion=True), moodle=moodle) as s:
            await run_job(s, "quiz_archiver", body)

        pdf = unpack(job)["attempts/attempt-23/attempt-23.pdf"]
        reader = pypdf.PdfReader(io.BytesIO(pdf))
        assert xmp_values(reader, PDFAID_NS) == {"part": "3", "conformance": "B"}
        assert "/OutputIntents" in reader.root_object
        assert ATTEMPT_TEXT[23] in pdf_text(pdf)
        sizes = {
            (int(image.image.width), int(image.image.height))
            for page in reader.pages
            for image in page.images
            if image.image is not None
        }
        # The opaque 100x60 PNGs of the page now fit 64x64 (aspect kept); the
        # three transparent PNGs are left alone (contract 3.7).
        assert sizes == {(64, 38), (600, 600), (752, 768), (1920, 1200)}


class TestDeliveries:
    async def test_gives_up_after_max_deliveries(
        self, stack_settings: Callable[..., Settings], moodle: MoodleSimulator
    ) -> None:
        """Moodle failing every time: retried, then FAILED and a token-free dead letter."""
        job, body = reference_quiz(moodle, attempt_ids=[24], backups=False)
        moodle.fail_next(
            "quiz_archiver_generate_attempt_report", times=None, status=503
        )
        async with dev_stack(stack_settings(max_deliver=2), moodle=moodle) as s:
            events = await run_job(s, "quiz_archiver", body)
            job_id = events[0].job_id
            dead = await s.broker.js.get_last_msg(
                "ARCHIVE_DLQ", f"archive.dlq.{job_id}", direct=True
            )
            queued = await s.broker.queue_depth()

        deliveries = [e.delivery for e in events if e.status is JobStatus.RUNNING]
        assert deliveries == [1, 2]
        assert events[-1].status is JobStatus.FAILED
        assert events[-1].error_code == "moodle_unavailable"
        assert job.statuses[-1] == "FAILED"
        assert job.uploads == []
        assert queued == 0
        assert dead.data is not None
        assert b"moodle_unavailable" in dead.data
        assert job.token.encode() not in dead.data
