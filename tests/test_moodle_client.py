"""The Moodle web service client against the simulator, over loopback HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from archive_worker.config import Settings
from archive_worker.errors import (
    BackupFailed,
    ChecksumMismatch,
    DownloadTooLarge,
    JobError,
    MoodleBadResponse,
    MoodleRejected,
    MoodleUnavailable,
)
from archive_worker.jobs import (
    BackupTask,
    Flavour,
    JobSpec,
    JobStatus,
    MoodleEndpoint,
    ReportTask,
)
from archive_worker.moodle import Attachment, MoodleClient, encode_params
from archive_worker.moodle_sim import (
    DROP,
    PLUGINFILE,
    UPLOAD,
    FileFault,
    MoodleSimulator,
    SimJob,
)
from archive_worker.moodle_sim.scenario import reference_quiz
from tests.conftest import SECRET_TOKEN

JOB_ID = "0b1e9a3c-5d2f-4c1e-8f00-2a6b1c9d7e01"
FLAVOURS = [f.value for f in Flavour]
QUIZ_FLAVOURS = ["quiz_archiver", "archivingmod_quiz"]
STATUS_FUNCTION = {
    "quiz_archiver": "quiz_archiver_update_job_status",
    "archivingmod_quiz": "archivingmod_quiz_update_task_status",
    "archivingmod_assign": "archivingmod_assign_update_task_status",
}
REPORT_FUNCTION = {
    "quiz_archiver": "quiz_archiver_generate_attempt_report",
    "archivingmod_quiz": "archivingmod_quiz_generate_attempt_report",
    "archivingmod_assign": "archivingmod_assign_generate_submission_report",
}
METADATA_FUNCTION = {
    "quiz_archiver": "quiz_archiver_get_attempts_metadata",
    "archivingmod_quiz": "archivingmod_quiz_get_attempts_metadata",
    "archivingmod_assign": "archivingmod_assign_get_submissions_metadata",
}
PROCESS_FUNCTION = {
    "quiz_archiver": "quiz_archiver_process_uploaded_artifact",
    "archivingmod_quiz": "archivingmod_quiz_process_uploaded_artifact",
    "archivingmod_assign": "archivingmod_assign_process_uploaded_artifact",
}


def spec_from_body(body: dict[str, Any], flavour: str) -> JobSpec:
    """The JobSpec the bridge makes of a plugin's request body (for these tests)."""
    if flavour == "quiz_archiver":
        task = body["task_archive_quiz_attempts"]
        return JobSpec(
            job_id=JOB_ID,
            flavour=Flavour.QUIZ_ARCHIVER,
            moodle=MoodleEndpoint(
                base_url=body["moodle_base_url"],
                ws_url=body["moodle_ws_url"],
                upload_url=body["moodle_upload_url"],
                token=body["wstoken"],
                max_upload_bytes=body.get("moodle_max_upload_bytes"),
            ),
            archive_filename=body["archive_filename"],
            courseid=body["courseid"],
            cmid=body["cmid"],
            quizid=body["quizid"],
            reports=ReportTask(
                ids=task["attemptids"],
                sections=task["sections"],
                paper_format=task["paper_format"],
                keep_html_files=task["keep_html_files"],
                fetch_metadata=task["fetch_metadata"],
                fetch_attachments=task["sections"]["attachments"] == "1",
                foldername_pattern=task["foldername_pattern"],
                filename_pattern=task["filename_pattern"],
            ),
            backups=[
                BackupTask(
                    backupid=b["backupid"],
                    filename=b["filename"],
                    download_url=b["file_download_url"],
                )
                for b in body["task_moodle_backups"] or []
            ],
        )
    api, job = body["moodle_api"], body["job"]
    sections = {
        k: int(v) if isinstance(v, bool) else v
        for k, v in job["report_sections"].items()
    }

    return JobSpec(
        job_id=JOB_ID,
        flavour=Flavour(flavour),
        moodle=MoodleEndpoint(
            base_url=api["base_url"],
            ws_url=api["webservice_url"],
            upload_url=api["upload_url"],
            token=api["wstoken"],
            max_upload_bytes=api.get("max_upload_bytes"),
        ),
        archive_filename=job["archive_filename"],
        taskid=body["taskid"],
        reports=ReportTask(
            ids=job.get("attemptids") or job["submissionids"],
            sections=sections,
            paper_format=job["paper_format"],
            keep_html_files=job["keep_html_files"],
            fetch_metadata=job["fetch_metadata"],
            fetch_attachments=job.get("fetch_attachments", True),
            foldername_pattern=job["foldername_pattern"],
            filename_pattern=job["filename_pattern"],
            attachment_types=job.get("attachment_types"),
        ),
    )


MakeClient = Callable[..., MoodleClient]


@pytest.fixture
async def make_client(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[MakeClient]:
    """Build clients with test settings; closes them afterwards."""
    clients: list[MoodleClient] = []

    def factory(spec: JobSpec, **overrides: Any) -> MoodleClient:
        client = MoodleClient(spec, make_settings(**overrides))
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


def scenario(
    moodle: MoodleSimulator, flavour: str, **opts: Any
) -> tuple[SimJob, JobSpec]:
    """The reference job of a flavour, registered under SECRET_TOKEN."""
    job, body = reference_quiz(moodle, flavour, token=SECRET_TOKEN, **opts)
    return job, spec_from_body(body, flavour)


def first_item(spec: JobSpec) -> int:
    """The first attempt or submission id of a job."""
    assert spec.reports is not None
    return spec.reports.ids[0]


def raw(
    moodle: MoodleSimulator, wsfunction: str, index: int = -1
) -> list[tuple[str, str]]:
    """The query pairs a call arrived with (token removed by the simulator)."""
    return moodle.calls_to(wsfunction)[index].raw


class TestEncoding:
    def test_lists_maps_and_booleans(self) -> None:
        """Lists become name[], maps name[key], booleans 1/0 and None is left out."""
        pairs = encode_params(
            {"ids": [1, 2], "sections": {"a": "1", "b": 0}, "flag": True, "x": None}
        )
        assert pairs == [
            ("ids[]", "1"),
            ("ids[]", "2"),
            ("sections[a]", "1"),
            ("sections[b]", "0"),
            ("flag", "1"),
        ]

    def test_unknown_type_is_refused(self) -> None:
        """Floats have no Moodle encoding and raise TypeError."""
        with pytest.raises(TypeError):
            encode_params({"x": 1.5})


class TestUpdateStatus:
    async def test_quiz_archiver_vocabulary(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """quiz_archiver gets the status string and statusextras only with progress."""
        job, spec = scenario(moodle, "quiz_archiver")
        client = make_client(spec)
        assert await client.update_status(JobStatus.RUNNING, progress=0)
        assert await client.update_status(JobStatus.FINALIZING)
        function = STATUS_FUNCTION["quiz_archiver"]
        assert ("statusextras", '{"progress": 0}') in raw(moodle, function, 0)
        assert all(k != "statusextras" for k, _ in raw(moodle, function, 1))
        assert job.statuses == ["RUNNING", "FINALIZING"]
        assert job.progress == [0]
        assert job.jobid == JOB_ID

    @pytest.mark.parametrize("flavour", ["archivingmod_quiz", "archivingmod_assign"])
    async def test_task_status_codes(
        self, moodle: MoodleSimulator, make_client: MakeClient, flavour: str
    ) -> None:
        """local_archiving gets task codes, and progress only together with RUNNING."""
        job, spec = scenario(moodle, flavour)
        client = make_client(spec)
        assert await client.update_status(JobStatus.RUNNING, progress=40)
        assert await client.update_status(JobStatus.WAITING_FOR_BACKUP, progress=50)
        assert job.statuses == [100, 200]
        assert job.progress == [40]
        pairs = raw(moodle, STATUS_FUNCTION[flavour], 0)
        assert ("uuid", JOB_ID) in pairs
        assert ("taskid", str(spec.taskid)) in pairs

    async def test_canceled_is_failed_for_quiz_archiver(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """CANCELED is reported as FAILED, which ends the job and its token."""
        job, spec = scenario(moodle, "quiz_archiver")
        client = make_client(spec)
        assert await client.update_status(JobStatus.CANCELED)
        assert job.state == "FAILED"
        assert job.done.is_set()
        assert not await client.update_status(JobStatus.FAILED)

    async def test_failures_are_logged_not_raised(
        self,
        moodle: MoodleSimulator,
        make_client: MakeClient,
        caplog_debug: pytest.LogCaptureFixture,
    ) -> None:
        """Non-OK answers, 5xx and a dead Moodle give False and a WARNING."""
        job, spec = scenario(moodle, "archivingmod_quiz")
        client = make_client(spec)
        function = STATUS_FUNCTION["archivingmod_quiz"]
        assert not await client.update_status(JobStatus.RUNNING, progress=101)
        moodle.fail_next(function)
        assert not await client.update_status(JobStatus.RUNNING)
        await moodle.take_down()
        assert not await client.update_status(JobStatus.RUNNING)
        await moodle.bring_up()
        assert await client.update_status(JobStatus.RUNNING)
        warnings = [r for r in caplog_debug.records if r.levelno == logging.WARNING]
        assert len(warnings) >= 3
        assert job.statuses == [100]


class TestGenerateReport:
    @pytest.mark.parametrize("flavour", FLAVOURS)
    async def test_parameters_and_report(
        self, moodle: MoodleSimulator, make_client: MakeClient, flavour: str
    ) -> None:
        """Each flavour sends its exact parameters and gets a validated report."""
        job, spec = scenario(moodle, flavour, attachments=True)
        item = first_item(spec)
        report = await make_client(spec).generate_report(item)
        pairs = raw(moodle, REPORT_FUNCTION[flavour])
        names = [k for k, _ in pairs]
        assert ("sections[header]", "1") in pairs
        if flavour == "quiz_archiver":
            assert names[2:9] == [
                "jobid",
                "courseid",
                "cmid",
                "quizid",
                "attemptid",
                "foldernamepattern",
                "filenamepattern",
            ]
            assert ("attachments", "1") in pairs
        elif flavour == "archivingmod_quiz":
            assert names[2:5] == ["uuid", "taskid", "attemptid"]
            assert ("attachments", "1") in pairs
        else:
            assert names[2:5] == ["uuid", "taskid", "submissionid"]
            assert "attachments" not in names
        assert report.item_id == item
        assert report.html == job.items[item].html
        expected = [(a.group, a.filename) for a in job.items[item].attachments]
        assert [(a.group, a.filename) for a in report.attachments] == expected
        assert all(a.item_id == item for a in report.attachments)
        assert all(len(a.contenthash) == 40 for a in report.attachments)

    async def test_attachments_flag_off(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """Without fetch_attachments the flag is 0 and Moodle lists no files."""
        _, spec = scenario(moodle, "quiz_archiver", attachments=False)
        report = await make_client(spec).generate_report(24)
        assert ("attachments", "0") in raw(moodle, REPORT_FUNCTION["quiz_archiver"])
        assert report.attachments == []

    async def test_pattern_expansion(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """Names expanded by Moodle from the default patterns pass validation."""
        _, spec = scenario(moodle, "archivingmod_quiz", fixed_names=False)
        report = await make_client(spec).generate_report(24)
        assert report.foldername.startswith("anon4/24-")
        assert report.filename.startswith("attempt-24-anon4_")

    async def test_report_quirk_is_stripped(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """Moodle 4.3's stray </body></html> after the JSON is tolerated."""
        _, spec = scenario(moodle, "quiz_archiver")
        moodle.report_quirk = True
        report = await make_client(spec).generate_report(25)
        assert report.foldername == "attempt-25"

    @pytest.mark.parametrize(
        ("overrides", "fragment"),
        [
            ({"attemptid": 99}, "attemptid=99"),
            ({"courseid": 8}, "courseid=8"),
            ({"quizid": "12"}, "quizid='12'"),
            ({"report": DROP}, "missing report"),
            ({"attachments": DROP}, "missing attachments"),
            ({"report": 5}, "report that is not a string"),
            ({"attachments": {}}, "not a list"),
            ({"foldername": "../../etc"}, "unsafe foldername"),
            ({"foldername": "/abs/path"}, "unsafe foldername"),
            ({"foldername": "a//b"}, "unsafe foldername"),
            ({"foldername": "a\x00b"}, "unsafe foldername"),
            ({"foldername": "tab\there"}, "unsafe foldername"),
            ({"foldername": ""}, "unsafe foldername"),
            ({"filename": "sub/name"}, "unsafe filename"),
            ({"filename": "name.pdf"}, "unsafe filename"),
        ],
    )
    async def test_bad_answers_are_refused(
        self,
        moodle: MoodleSimulator,
        make_client: MakeClient,
        overrides: dict[str, Any],
        fragment: str,
    ) -> None:
        """Wrong ids, missing keys, wrong types and hostile names fail the item."""
        job, spec = scenario(moodle, "quiz_archiver")
        job.items[24].overrides = overrides
        with pytest.raises(MoodleBadResponse) as caught:
            await make_client(spec).generate_report(24)
        assert fragment in str(caught.value)
        assert (caught.value.stage, caught.value.attempt) == ("report", 24)

    @pytest.mark.parametrize(
        ("field", "value", "fragment"),
        [
            ("filename", "../evil.txt", "path separator"),
            ("filename", "..", "relative path"),
            ("filename", "a\\b.txt", "path separator"),
            ("filename", "nul\x00.txt", "control characters"),
            ("contenthash", "abc", "invalid contenthash"),
            (
                "download_url",
                "http://evil.example/webservice/pluginfile.php/1/x",
                "outside",
            ),
            (
                "download_url",
                "{base}/webservice/pluginfile.php/../../admin/x",
                "outside",
            ),
            ("download_url", "{base}/webservice/pluginfile.php/1/%2e%2e/x", "outside"),
            ("download_url", "{base}/admin/tool/x.php", "outside"),
            (
                "download_url",
                "{base}.evil.example/webservice/pluginfile.php/1",
                "outside",
            ),
        ],
    )
    async def test_hostile_attachments_are_refused(
        self,
        moodle: MoodleSimulator,
        make_client: MakeClient,
        field: str,
        value: str,
        fragment: str,
    ) -> None:
        """Attachment names with paths and URLs leaving this Moodle are refused."""
        job, spec = scenario(moodle, "archivingmod_quiz", attachments=True)
        setattr(job.items[24].attachments[0], field, value.format(base=moodle.base_url))
        with pytest.raises(MoodleBadResponse) as caught:
            await make_client(spec).generate_report(24)
        assert fragment in str(caught.value)
        assert caught.value.attempt == 24

    async def test_assign_requires_status_ok(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """archivingmod_assign answers without status OK are rejected."""
        job, spec = scenario(moodle, "archivingmod_assign")
        job.items[101].overrides = {"status": DROP}
        with pytest.raises(MoodleRejected, match="status None"):
            await make_client(spec).generate_report(101)

    @pytest.mark.parametrize("flavour", ["archivingmod_quiz", "archivingmod_assign"])
    async def test_business_errors_are_rejections(
        self, moodle: MoodleSimulator, make_client: MakeClient, flavour: str
    ) -> None:
        """E_ATTEMPT_NOT_FOUND / E_SUBMISSION_NOT_FOUND become MoodleRejected."""
        _, spec = scenario(moodle, flavour)
        with pytest.raises(MoodleRejected, match="_NOT_FOUND") as caught:
            await make_client(spec).generate_report(4711)
        assert caught.value.attempt == 4711

    async def test_error_object_is_a_rejection(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """An unknown attempt makes quiz_archiver throw: errorcode in the message."""
        _, spec = scenario(moodle, "quiz_archiver")
        with pytest.raises(MoodleRejected, match="invalidparameter") as caught:
            await make_client(spec).generate_report(4711)
        assert not caught.value.transient

    async def test_oversized_report_fails_early(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """A report of hundreds of MB is refused at report_max_bytes."""
        job, spec = scenario(moodle, "quiz_archiver")
        job.items[24].report_padding = 500_000_000
        started = time.monotonic()
        with pytest.raises(DownloadTooLarge):
            await make_client(spec, report_max_bytes=2_000_000).generate_report(24)
        assert time.monotonic() - started < 5

    @pytest.mark.parametrize(
        ("body", "content_type"),
        [
            ("<html><body>Login</body></html>", "text/html"),
            ("{not json", "application/json"),
            ("[1, 2]", "application/json"),
        ],
    )
    async def test_non_json_is_a_bad_response(
        self,
        moodle: MoodleSimulator,
        make_client: MakeClient,
        body: str,
        content_type: str,
    ) -> None:
        """HTML pages, broken JSON and non-objects raise MoodleBadResponse."""
        _, spec = scenario(moodle, "quiz_archiver")
        moodle.respond_with(
            REPORT_FUNCTION["quiz_archiver"], body, content_type=content_type
        )
        with pytest.raises(MoodleBadResponse):
            await make_client(spec).generate_report(24)


class TestTransportErrors:
    async def test_5xx_is_transient(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """HTTP 500 raises MoodleUnavailable, which a retry may cure."""
        _, spec = scenario(moodle, "quiz_archiver")
        client = make_client(spec)
        moodle.fail_next(REPORT_FUNCTION["quiz_archiver"], status=503)
        with pytest.raises(MoodleUnavailable) as caught:
            await client.generate_report(24)
        assert caught.value.transient
        assert (caught.value.stage, caught.value.attempt) == ("report", 24)
        assert (await client.generate_report(24)).item_id == 24

    async def test_4xx_is_a_rejection(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """HTTP 403 raises MoodleRejected."""
        _, spec = scenario(moodle, "quiz_archiver")
        moodle.fail_next(METADATA_FUNCTION["quiz_archiver"], status=403)
        with pytest.raises(MoodleRejected, match="HTTP 403"):
            await make_client(spec).get_metadata([24])

    async def test_moodle_down_is_transient(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """Connection refused raises MoodleUnavailable."""
        _, spec = scenario(moodle, "archivingmod_assign")
        await moodle.take_down()
        with pytest.raises(MoodleUnavailable):
            await make_client(spec).generate_report(101)

    async def test_hanging_call_times_out(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """A call Moodle never answers fails after the read timeout."""
        _, spec = scenario(moodle, "quiz_archiver")
        release = moodle.hang(METADATA_FUNCTION["quiz_archiver"])
        client = make_client(spec, http_read_timeout_s=0.3)
        with pytest.raises(MoodleUnavailable, match="read timeout"):
            await client.get_metadata([24])
        release.set()

    async def test_given_session_stays_open(
        self, moodle: MoodleSimulator, make_settings: Callable[..., Settings]
    ) -> None:
        """The client closes only a session it created itself."""
        _, spec = scenario(moodle, "quiz_archiver")
        async with aiohttp.ClientSession() as session:
            async with MoodleClient(spec, make_settings(), session=session) as client:
                assert await client.update_status(JobStatus.RUNNING)
            assert not session.closed


class TestMetadata:
    @pytest.mark.parametrize("flavour", FLAVOURS)
    async def test_batches_of_100(
        self, moodle: MoodleSimulator, make_client: MakeClient, flavour: str
    ) -> None:
        """250 ids go out as 100, 100 and 50; rows come back in Moodle's order."""
        ids = list(range(1000, 1250))
        key = "submissionid" if flavour == "archivingmod_assign" else "attemptid"
        rows = [{key: i, "userid": i % 7, "username": f"u{i}"} for i in reversed(ids)]
        moodle.add_job(
            SECRET_TOKEN,
            flavour,
            courseid=9,
            cmid=23,
            quizid=12,
            taskid=None if flavour == "quiz_archiver" else 5,
            metadata=rows,
        )
        spec = JobSpec(
            job_id=JOB_ID,
            flavour=Flavour(flavour),
            moodle=MoodleEndpoint(
                base_url=moodle.base_url,
                ws_url=moodle.ws_url,
                upload_url=moodle.upload_url,
                token=SECRET_TOKEN,
            ),
            archive_filename="archive",
            courseid=9 if flavour == "quiz_archiver" else None,
            cmid=23 if flavour == "quiz_archiver" else None,
            quizid=12 if flavour == "quiz_archiver" else None,
            taskid=None if flavour == "quiz_archiver" else 5,
        )
        result = await make_client(spec).get_metadata(ids)
        calls = moodle.calls_to(METADATA_FUNCTION[flavour])
        sizes = [sum(1 for k, _ in c.raw if k == f"{key}s[]") for c in calls]
        assert sizes == [100, 100, 50]
        batch_rows = [
            [r for r in rows if r[key] in set(b)]
            for b in (ids[:100], ids[100:200], ids[200:])
        ]
        assert result == [row for batch in batch_rows for row in batch]
        assert list(result[0]) == [key, "userid", "username"]

    async def test_reference_rows_keep_moodle_key_order(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """Rows keep the current column set in Moodle's declared order."""
        _, spec = scenario(moodle, "quiz_archiver")
        rows = await make_client(spec).get_metadata([24, 25, 23])
        assert [r["attemptid"] for r in rows] == [25, 23, 24]
        assert list(rows[0]) == [
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
        ]

    async def test_quiz_archiver_checks_ids(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """An answer about another quiz is refused."""
        _, spec = scenario(moodle, "quiz_archiver")
        moodle.respond_with(
            METADATA_FUNCTION["quiz_archiver"],
            '{"status":"OK","courseid":9,"cmid":23,"quizid":13,"attempts":[]}',
            content_type="application/json",
        )
        with pytest.raises(MoodleBadResponse, match="quizid=13"):
            await make_client(spec).get_metadata([24])

    async def test_non_ok_status_is_rejected(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """archivingmod_quiz's E_ATTEMPT_NOT_FOUND fails the metadata stage."""
        _, spec = scenario(moodle, "archivingmod_quiz")
        with pytest.raises(MoodleRejected, match="E_ATTEMPT_NOT_FOUND") as caught:
            await make_client(spec).get_metadata([4711])
        assert caught.value.stage == "metadata"


class TestBackups:
    async def test_status_sequence(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """PENDING answers False until SUCCESS answers True."""
        _, spec = scenario(
            moodle, "quiz_archiver", backup_statuses=["E_BACKUP_PENDING", "SUCCESS"]
        )
        client = make_client(spec)
        backup = spec.backups[0]
        assert await client.backup_ready(backup) is False
        assert await client.backup_ready(backup) is True
        assert raw(moodle, "quiz_archiver_get_backup_status")[2:] == [
            ("jobid", JOB_ID),
            ("backupid", backup.backupid),
        ]

    @pytest.mark.parametrize(
        "statuses", [["E_BACKUP_PENDING", "E_BACKUP_FAILED"], ["E_ACCESS_DENIED"]]
    )
    async def test_failed_backup_fails_the_job(
        self, moodle: MoodleSimulator, make_client: MakeClient, statuses: list[str]
    ) -> None:
        """E_BACKUP_FAILED and other statuses raise BackupFailed at once."""
        _, spec = scenario(moodle, "quiz_archiver", backup_statuses=statuses)
        client = make_client(spec)
        for _ in statuses[:-1]:
            assert await client.backup_ready(spec.backups[0]) is False
        with pytest.raises(BackupFailed, match=statuses[-1]):
            await client.backup_ready(spec.backups[0])
        assert len(moodle.calls_to("quiz_archiver_get_backup_status")) == len(statuses)

    async def test_unknown_backup(
        self, moodle: MoodleSimulator, make_client: MakeClient
    ) -> None:
        """E_BACKUP_NOT_FOUND raises BackupFailed naming the backup."""
        _, spec = scenario(moodle, "quiz_archiver")
        ghost = BackupTask(backupid="0" * 32, filename="x.mbz", download_url="")
        with pytest.raises(BackupFailed, match="E_BACKUP_NOT_FOUND"):
            await make_client(spec).backup_ready(ghost)

    async def test_download(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """HEAD then GET with token (and forcedownload on GET) stores the backup."""
        job, spec = scenario(moodle, "quiz_archiver")
        backup = spec.backups[1]
        target = tmp_path / backup.filename
        size = await make_client(spec).download_backup(backup, target)
        assert target.read_bytes() == job.backups[backup.backupid].content
        assert size == target.stat().st_size
        head, get = moodle.file_requests()
        assert (head.method, get.method) == ("HEAD", "GET")
        assert head.raw == []
        assert get.raw == [("forcedownload", "1")]

    async def test_wrong_content_type_fails_before_get(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """A HEAD without application/vnd.moodle.backup stops the download."""
        job, spec = scenario(moodle, "quiz_archiver")
        job.backups[spec.backups[0].backupid].fault = FileFault.WRONG_CONTENT_TYPE
        with pytest.raises(MoodleBadResponse, match="Content-Type"):
            await make_client(spec).download_backup(spec.backups[0], tmp_path / "b.mbz")
        assert moodle.file_requests("GET") == []

    async def test_announced_size_over_limit_fails_before_get(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """A Content-Length over backup_max_bytes fails at HEAD."""
        job, spec = scenario(moodle, "quiz_archiver")
        job.backups[spec.backups[0].backupid].declared_size = 10**12
        client = make_client(spec, backup_max_bytes=5_000_000)
        with pytest.raises(DownloadTooLarge):
            await client.download_backup(spec.backups[0], tmp_path / "b.mbz")
        assert moodle.file_requests("GET") == []

    async def test_foreign_url_is_refused(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """A backup URL outside the job's Moodle is never requested."""
        _, spec = scenario(moodle, "quiz_archiver")
        foreign = BackupTask(
            backupid="1" * 32,
            filename="x.mbz",
            download_url="http://127.0.0.2:9/webservice/pluginfile.php/1/backup/x.mbz",
        )
        with pytest.raises(MoodleBadResponse, match="refusing"):
            await make_client(spec).download_backup(foreign, tmp_path / "x.mbz")
        assert moodle.file_requests() == []


class TestAttachmentDownloads:
    async def _report(
        self, moodle: MoodleSimulator, make_client: MakeClient, **settings: Any
    ) -> tuple[SimJob, MoodleClient, Attachment]:
        job, spec = scenario(moodle, "archivingmod_assign", attachments=True)
        client = make_client(spec, **settings)
        report = await client.generate_report(101)
        return job, client, report.attachments[1]

    async def test_download_verifies_sha1(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """The file is stored and its SHA-1 equals Moodle's contenthash."""
        job, client, attachment = await self._report(moodle, make_client)
        target = tmp_path / attachment.filename
        size = await client.download_attachment(attachment, target)
        content = job.items[101].attachments[1].content
        assert target.read_bytes() == content
        assert size == len(content)
        assert attachment.group == "submission"

    async def test_hash_mismatch(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """Content differing from contenthash raises ChecksumMismatch, no file kept."""
        job, spec = scenario(moodle, "archivingmod_assign", attachments=True)
        job.items[101].attachments[0].contenthash = "0" * 40
        client = make_client(spec)
        attachment = (await client.generate_report(101)).attachments[0]
        target = tmp_path / "file"
        with pytest.raises(ChecksumMismatch) as caught:
            await client.download_attachment(attachment, target)
        assert (caught.value.stage, caught.value.attempt) == ("attachments", 101)
        assert not target.exists()

    async def test_endless_download_is_cut_at_the_limit(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """An endless stream stops at attachment_max_bytes; the partial file goes."""
        job, client, attachment = await self._report(
            moodle, make_client, attachment_max_bytes=3_000_000
        )
        job.items[101].attachments[1].fault = FileFault.ENDLESS
        target = tmp_path / "endless"
        with pytest.raises(DownloadTooLarge):
            await client.download_attachment(attachment, target)
        assert not target.exists()
        assert job.items[101].attachments[1].bytes_sent < 50_000_000

    async def test_stalled_download_fails_after_read_timeout(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """A download that stops sending fails after http_read_timeout_s."""
        job, client, attachment = await self._report(
            moodle, make_client, http_read_timeout_s=0.3
        )
        job.items[101].attachments[1].fault = FileFault.STALL
        started = time.monotonic()
        with pytest.raises(MoodleUnavailable, match="stalled"):
            await client.download_attachment(attachment, tmp_path / "stall")
        assert time.monotonic() - started < 3
        assert not (tmp_path / "stall").exists()

    async def test_trickling_download_fails_at_transfer_limit(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """A download that never ends fails after http_transfer_timeout_s."""
        job, client, attachment = await self._report(
            moodle, make_client, http_transfer_timeout_s=0.5
        )
        job.items[101].attachments[1].fault = FileFault.TRICKLE
        started = time.monotonic()
        with pytest.raises(MoodleUnavailable, match="time limit"):
            await client.download_attachment(attachment, tmp_path / "trickle")
        assert time.monotonic() - started < 3

    @pytest.mark.parametrize(
        ("fault", "error", "fragment"),
        [
            (FileFault.JSON_ERROR, MoodleRejected, "nopermissions"),
            (FileFault.NOT_FOUND, MoodleRejected, "filenotfound"),
        ],
    )
    async def test_moodle_error_instead_of_file(
        self,
        moodle: MoodleSimulator,
        make_client: MakeClient,
        tmp_path: Path,
        fault: FileFault,
        error: type[JobError],
        fragment: str,
    ) -> None:
        """A JSON error object or a 404 where the file was expected is a rejection."""
        job, client, attachment = await self._report(moodle, make_client)
        job.items[101].attachments[1].fault = fault
        with pytest.raises(error, match=fragment):
            await client.download_attachment(attachment, tmp_path / "f")
        assert not (tmp_path / "f").exists()

    async def test_pluginfile_5xx_is_transient(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """HTTP 500 from pluginfile.php raises MoodleUnavailable (fix of 5.3)."""
        _, client, attachment = await self._report(moodle, make_client)
        moodle.fail_next(PLUGINFILE)
        with pytest.raises(MoodleUnavailable, match="HTTP 500"):
            await client.download_attachment(attachment, tmp_path / "f")

    async def test_foreign_attachment_url_is_refused(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """An Attachment built with a foreign URL is not downloaded."""
        _, client, _ = await self._report(moodle, make_client)
        foreign = Attachment(
            group="submission",
            filename="x",
            filesize=1,
            mimetype="text/plain",
            contenthash="0" * 40,
            download_url="http://169.254.169.254/latest/meta-data",
        )
        with pytest.raises(MoodleBadResponse, match="refusing"):
            await client.download_attachment(foreign, tmp_path / "x")


class TestUpload:
    @staticmethod
    def _archive(tmp_path: Path, size: int) -> tuple[Path, str]:
        path = tmp_path / "archive.zip"
        path.write_bytes(os.urandom(size))
        return path, hashlib.sha256(path.read_bytes()).hexdigest()

    @pytest.mark.parametrize("flavour", FLAVOURS)
    async def test_single_upload(
        self,
        moodle: MoodleSimulator,
        make_client: MakeClient,
        tmp_path: Path,
        flavour: str,
    ) -> None:
        """One file_1 part, then process_uploaded_artifact; Moodle stores it."""
        job, spec = scenario(moodle, flavour)
        archive, digest = self._archive(tmp_path, 20_000)
        await make_client(spec).upload_archive(archive, sha256=digest)
        assert job.archive_bytes() == archive.read_bytes()
        assert job.artifact_sha256 == digest
        assert job.artifact_count == 1
        assert job.state in ("FINISHED", 220)
        (upload,) = [c for c in moodle.calls if c.path.endswith("upload.php")]
        assert upload.params == {
            "filepath": "/",
            "itemid": "0",
            "files": [f"{spec.archive_filename}.zip"],
        }
        params = moodle.calls_to(PROCESS_FUNCTION[flavour])[0].params
        assert params["artifact_filename"] == f"{spec.archive_filename}.zip"
        assert params["artifact_sha256sum"] == digest
        # Only archivingmod_assign declares artifact_count; released quiz
        # plugins reject it (contract 2.2.5, 2.3).
        assert ("artifact_count" in params) == (flavour == "archivingmod_assign")

    async def test_chunked_upload(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """Over max_upload_bytes the archive goes in numbered parts into one item."""
        job, spec = scenario(moodle, "quiz_archiver", max_upload_bytes=4000)
        archive, digest = self._archive(tmp_path, 10_500)
        await make_client(spec).upload_archive(archive, sha256=digest)
        name = f"{spec.archive_filename}.zip"
        assert [u.stored for u in job.uploads] == [
            [f"{name}.chunk{i:09d}.bin"] for i in range(3)
        ]
        assert len({u.itemid for u in job.uploads}) == 1
        item_params = [
            c.params["itemid"] for c in moodle.calls if c.path.endswith("upload.php")
        ]
        assert item_params == [
            "0",
            str(job.uploads[0].itemid),
            str(job.uploads[0].itemid),
        ]
        assert job.archive_bytes() == archive.read_bytes()
        assert job.artifact_count == 3
        params = moodle.calls_to(PROCESS_FUNCTION["quiz_archiver"])[0].params
        assert params["artifact_count"] == "3"
        assert params["artifact_filename"] == name

    async def test_chunk_parts_respect_the_limit(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """Moodle refuses files over its limit, so no part may be larger."""
        job, spec = scenario(moodle, "archivingmod_assign", max_upload_bytes=1024)
        archive, digest = self._archive(tmp_path, 1024 * 5)
        await make_client(spec).upload_archive(archive, sha256=digest)
        assert all(not u.refused for u in job.uploads)
        assert len(job.uploads) == 5
        assert job.archive_bytes() == archive.read_bytes()

    async def test_oversized_upload_is_rejected(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """upload.php's fileoversized answer raises MoodleRejected."""
        job, spec = scenario(moodle, "quiz_archiver")
        job.max_upload_bytes = 100
        archive, digest = self._archive(tmp_path, 1000)
        with pytest.raises(MoodleRejected, match="fileoversized") as caught:
            await make_client(spec).upload_archive(archive, sha256=digest)
        assert caught.value.stage == "upload"

    @pytest.mark.parametrize("flavour", FLAVOURS)
    async def test_checksum_mismatch_is_rejected(
        self,
        moodle: MoodleSimulator,
        make_client: MakeClient,
        tmp_path: Path,
        flavour: str,
    ) -> None:
        """A wrong SHA-256 makes Moodle answer a non-OK status and fail the job."""
        job, spec = scenario(moodle, flavour)
        archive, _ = self._archive(tmp_path, 500)
        with pytest.raises(MoodleRejected, match="CHECKSUM"):
            await make_client(spec).upload_archive(archive, sha256="0" * 64)
        assert job.state in ("FAILED", 250)

    async def test_upload_error_object(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """upload.php's error object raises MoodleRejected with its errorcode."""
        _, spec = scenario(moodle, "quiz_archiver")
        moodle.respond_error(UPLOAD, "invalidtoken", "Invalid token - token not found")
        archive, digest = self._archive(tmp_path, 100)
        with pytest.raises(MoodleRejected, match="invalidtoken"):
            await make_client(spec).upload_archive(archive, sha256=digest)

    async def test_slow_processing_is_not_a_stall(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """Moodle may think longer than the read timeout while it stores the file."""
        job, spec = scenario(moodle, "quiz_archiver")
        release = moodle.hang(PROCESS_FUNCTION["quiz_archiver"])
        # Moodle's slowness is the stimulus here, not a wait for state.
        asyncio.get_running_loop().call_later(0.5, release.set)
        archive, digest = self._archive(tmp_path, 100)
        client = make_client(spec, http_read_timeout_s=0.2)
        await client.upload_archive(archive, sha256=digest)
        assert job.state == "FINISHED"

    async def test_processing_has_a_total_limit(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """A process call that never returns fails at http_transfer_timeout_s."""
        _, spec = scenario(moodle, "archivingmod_quiz")
        moodle.hang(PROCESS_FUNCTION["archivingmod_quiz"])
        archive, digest = self._archive(tmp_path, 100)
        client = make_client(spec, http_transfer_timeout_s=0.3)
        with pytest.raises(MoodleUnavailable, match="time limit") as caught:
            await client.upload_archive(archive, sha256=digest)
        assert caught.value.stage == "upload"

    async def test_upload_5xx_is_transient(
        self, moodle: MoodleSimulator, make_client: MakeClient, tmp_path: Path
    ) -> None:
        """HTTP 502 from upload.php raises MoodleUnavailable."""
        _, spec = scenario(moodle, "quiz_archiver")
        moodle.fail_next(UPLOAD, status=502)
        archive, digest = self._archive(tmp_path, 100)
        with pytest.raises(MoodleUnavailable):
            await make_client(spec).upload_archive(archive, sha256=digest)


class TestSecrets:
    async def test_token_never_in_errors_or_logs(
        self,
        moodle: MoodleSimulator,
        make_client: MakeClient,
        tmp_path: Path,
        caplog_debug: pytest.LogCaptureFixture,
    ) -> None:
        """No exception text, chained cause or log record contains the token."""
        job, spec = scenario(moodle, "quiz_archiver", attachments=True)
        client = make_client(spec, http_read_timeout_s=0.3)
        errors: list[BaseException] = []

        async def expect_failure(coro: Any) -> None:
            try:
                await coro
            except JobError as exc:
                errors.append(exc)
            else:
                pytest.fail("expected a failure")

        report = await client.generate_report(24)
        moodle.fail_next(REPORT_FUNCTION["quiz_archiver"])
        await expect_failure(client.generate_report(24))
        moodle.respond_error(
            REPORT_FUNCTION["quiz_archiver"], "x", f"echo wstoken={SECRET_TOKEN}"
        )
        await expect_failure(client.generate_report(24))
        job.items[24].attachments[0].fault = FileFault.STALL
        await expect_failure(
            client.download_attachment(report.attachments[0], tmp_path / "a")
        )
        release = moodle.hang(METADATA_FUNCTION["quiz_archiver"])
        await expect_failure(client.get_metadata([24]))
        release.set()
        await moodle.take_down()
        await expect_failure(client.get_metadata([24]))
        await expect_failure(client.backup_ready(spec.backups[0]))
        await moodle.bring_up()
        await client.update_status(JobStatus.FAILED)
        await client.update_status(JobStatus.FAILED)
        texts = [r.getMessage() for r in caplog_debug.records]
        texts += [str(r.exc_info) for r in caplog_debug.records if r.exc_info]
        for error in errors:
            chain: BaseException | None = error
            while chain is not None:
                texts += [str(chain), repr(chain)]
                chain = chain.__cause__ or (
                    None if chain.__suppress_context__ else chain.__context__
                )
        assert len(errors) == 6
        assert not [t for t in texts if SECRET_TOKEN in t]
        assert any("moodle.call.failed" in t for t in texts)
