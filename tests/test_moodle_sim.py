"""The Moodle simulator's protocol, where the client tests do not reach it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from archive_worker.moodle_sim import UPLOAD, MoodleSimulator, SimJob
from archive_worker.moodle_sim.functions import FUNCTIONS
from archive_worker.moodle_sim.model import (
    ASSIGN_ATTACHMENT_TYPES,
    ASSIGN_SECTIONS,
    LEGACY_QUIZ_SECTIONS,
    QUIZ_ARCHIVER_SECTIONS,
)
from archive_worker.moodle_sim.scenario import reference_assign, reference_quiz
from tests.conftest import SECRET_TOKEN

STATUS_FUNCTIONS = {
    "quiz_archiver": "quiz_archiver_update_job_status",
    "archivingmod_quiz": "archivingmod_quiz_update_task_status",
    "archivingmod_assign": "archivingmod_assign_update_task_status",
}
INVALID_PARAMETER = {
    "exception": "invalid_parameter_exception",
    "errorcode": "invalidparameter",
    "message": "Invalid parameter value detected",
}
QUIZ_IDS = [("jobid", "job-1"), ("courseid", "9"), ("cmid", "23"), ("quizid", "12")]


def moodle_functions(flavour: str) -> list[str]:
    """The wsfunctions of a flavour."""
    return [name for name, entry in FUNCTIONS.items() if entry[0] == flavour]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client, to send exactly what a test wants."""
    async with aiohttp.ClientSession() as session:
        yield session


class Rest:
    """Calls to the simulator's REST endpoint with full control of the query."""

    def __init__(self, http: aiohttp.ClientSession, sim: MoodleSimulator) -> None:
        self.http = http
        self.sim = sim

    async def text(
        self,
        wsfunction: str,
        pairs: list[tuple[str, str]] | None = None,
        *,
        token: str = SECRET_TOKEN,
        fmt: str | None = "json",
    ) -> tuple[int, str, str]:
        """Status, Content-Type and body text of one GET call."""
        query = [("wstoken", token), ("wsfunction", wsfunction)]
        query += [("moodlewsrestformat", fmt)] if fmt else []
        async with self.http.get(self.sim.ws_url, params=query + (pairs or [])) as resp:
            return resp.status, resp.content_type, await resp.text()

    async def __call__(
        self,
        wsfunction: str,
        pairs: list[tuple[str, str]] | None = None,
        *,
        token: str = SECRET_TOKEN,
    ) -> Any:
        """The decoded JSON answer of one call."""
        _, _, body = await self.text(wsfunction, pairs, token=token)
        return json.loads(body)


@pytest.fixture
def rest(http: aiohttp.ClientSession, moodle: MoodleSimulator) -> Rest:
    """REST calls against the ``moodle`` simulator."""
    return Rest(http, moodle)


def report_pairs(job: SimJob, item: int, **overrides: str) -> list[tuple[str, str]]:
    """Valid report parameters for a job, in the client's order."""
    if job.is_quiz_archiver:
        pairs = [*QUIZ_IDS, ("attemptid", str(item))]
    else:
        pairs = [("uuid", "job-1"), ("taskid", str(job.taskid))]
        pairs.append(("submissionid" if job.is_assign else "attemptid", str(item)))
    pairs += [
        ("foldernamepattern", overrides.get("folder", "${username}")),
        ("filenamepattern", overrides.get("file", "r-${timestamp}")),
    ]
    pairs += [(f"sections[{key}]", "1") for key in job.sections]
    if not job.is_assign:
        pairs.append(("attachments", overrides.get("attachments", "1")))
    return pairs


async def upload(
    http: aiohttp.ClientSession,
    sim: MoodleSimulator,
    files: dict[str, bytes],
    *,
    itemid: int = 0,
    token: str = SECRET_TOKEN,
) -> Any:
    """POST files to upload.php the way the plugins' workers do."""
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("token", token)
    form.add_field("filepath", "/")
    form.add_field("itemid", str(itemid))
    for index, (name, content) in enumerate(files.items(), start=1):
        form.add_field(f"file_{index}", content, filename=name)
    async with http.post(sim.upload_url, data=form) as resp:
        return json.loads(await resp.text())


class TestRestServer:
    @pytest.mark.parametrize("flavour", list(STATUS_FUNCTIONS))
    async def test_probe_gets_invalidparameter(
        self, moodle: MoodleSimulator, rest: Rest, flavour: str
    ) -> None:
        """The status function without parameters answers invalidparameter."""
        reference_quiz(moodle, flavour, token=SECRET_TOKEN)
        assert await rest(STATUS_FUNCTIONS[flavour]) == INVALID_PARAMETER

    async def test_unknown_token(self, moodle: MoodleSimulator, rest: Rest) -> None:
        """An unknown token answers invalidtoken."""
        answer = await rest("quiz_archiver_update_job_status", token="nope")
        assert answer["errorcode"] == "invalidtoken"

    async def test_xml_without_json_format(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """Without moodlewsrestformat=json Moodle answers XML."""
        _, content_type, body = await rest.text("x", fmt=None)
        assert content_type == "application/xml"
        assert body.startswith("<?xml")

    async def test_functions_outside_the_service(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """Another flavour's function is an access exception, a made-up one unknown."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        other = await rest("archivingmod_quiz_update_task_status")
        unknown = await rest("core_webservice_get_site_info")
        assert other["errorcode"] == "accessexception"
        assert unknown["errorcode"] == "invalidrecord"

    async def test_debuginfo_only_with_debugging(self, rest: Rest) -> None:
        """debuginfo names the problem only when developer debugging is on."""
        rest.sim.debug = True
        reference_quiz(rest.sim, "quiz_archiver", token=SECRET_TOKEN)
        answer = await rest("quiz_archiver_update_job_status")
        assert "Missing required key in single structure: jobid" in answer["debuginfo"]

    @pytest.mark.parametrize(
        "pairs",
        [
            [("attemptids", "24")],
            [("attemptids[]", "024")],
            [("attemptids[]", "24"), ("extra", "1")],
            [("attemptids[]", "True")],
        ],
    )
    async def test_php_decoding_and_validation(
        self, moodle: MoodleSimulator, rest: Rest, pairs: list[tuple[str, str]]
    ) -> None:
        """A missing [], a non-canonical int or an unknown key is invalidparameter."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        answer = await rest("quiz_archiver_get_attempts_metadata", QUIZ_IDS + pairs)
        assert answer == INVALID_PARAMETER

    async def test_python_booleans_are_refused(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """sections[x]=True (Python's str(True)) is not a PARAM_BOOL."""
        job, _ = reference_quiz(moodle, "archivingmod_quiz", token=SECRET_TOKEN)
        pairs = report_pairs(job, 24, attachments="True")
        assert await rest("archivingmod_quiz_generate_attempt_report", pairs) == (
            INVALID_PARAMETER
        )

    async def test_sections_must_be_complete(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """quiz_archiver 4.1.0 requires all 11 sections; the old 8 are refused."""
        job, _ = reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        pairs = [p for p in report_pairs(job, 24) if p[0] != "sections[quiz_grade]"]
        assert job.sections == QUIZ_ARCHIVER_SECTIONS
        assert await rest("quiz_archiver_generate_attempt_report", pairs) == (
            INVALID_PARAMETER
        )

    @pytest.mark.parametrize(
        ("kwargs", "accepted"),
        [({}, False), ({"max_upload_bytes": 1000}, True)],
    )
    async def test_artifact_count_by_plugin_version(
        self,
        moodle: MoodleSimulator,
        rest: Rest,
        kwargs: dict[str, Any],
        accepted: bool,
    ) -> None:
        """Released quiz_archiver refuses artifact_count; the chunking branch takes it."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN, **kwargs)
        pairs = [
            ("jobid", "job-1"),
            ("artifact_component", "user"),
            ("artifact_contextid", "5"),
            ("artifact_userid", "2"),
            ("artifact_filearea", "draft"),
            ("artifact_filename", "a.zip"),
            ("artifact_filepath", "/"),
            ("artifact_itemid", "1"),
            ("artifact_sha256sum", "0" * 64),
            ("artifact_count", "1"),
        ]
        answer = await rest("quiz_archiver_process_uploaded_artifact", pairs)
        expected = {"status": "E_UPLOADED_ARTIFACT_NOT_FOUND"}
        assert answer == (expected if accepted else INVALID_PARAMETER)

    async def test_post_is_accepted(
        self, moodle: MoodleSimulator, http: aiohttp.ClientSession
    ) -> None:
        """Moodle's REST server takes parameters from a POST body too."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        form = {
            "wstoken": SECRET_TOKEN,
            "moodlewsrestformat": "json",
            "wsfunction": "quiz_archiver_update_job_status",
            "jobid": "job-1",
            "status": "RUNNING",
        }
        async with http.post(moodle.ws_url, data=form) as resp:
            assert await resp.json() == {"status": "OK"}


class TestAnswers:
    @pytest.mark.parametrize(
        ("flavour", "keys"),
        [
            (
                "quiz_archiver",
                ["courseid", "cmid", "quizid", "attemptid", "foldername", "filename"],
            ),
            ("archivingmod_quiz", ["attemptid", "foldername", "filename"]),
            ("archivingmod_assign", ["submissionid", "foldername", "filename"]),
        ],
    )
    async def test_report_key_order_and_encoding(
        self, moodle: MoodleSimulator, rest: Rest, flavour: str, keys: list[str]
    ) -> None:
        """Reports come in declared key order, encoded like PHP's json_encode."""
        job, _ = reference_quiz(moodle, flavour, token=SECRET_TOKEN, attachments=True)
        item = next(iter(job.items))
        function = next(f for f in moodle_functions(flavour) if "report" in f)
        _, _, body = await rest.text(function, report_pairs(job, item))
        answer = json.loads(body)
        assert list(answer) == [*keys, "report", "attachments", "status"]
        assert '"downloadurl":"http:\\/\\/127.0.0.1' in body
        first = answer["attachments"][0]
        group = "type" if flavour == "archivingmod_assign" else "slot"
        assert list(first) == [
            group,
            "filename",
            "filesize",
            "mimetype",
            "contenthash",
            "downloadurl",
        ]
        content = job.items[item].attachments[0].content
        assert first["contenthash"] == hashlib.sha1(content).hexdigest()

    async def test_patterns_are_expanded(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """Without fixed names Moodle expands and sanitises the patterns."""
        job, _ = reference_quiz(
            moodle, "archivingmod_quiz", token=SECRET_TOKEN, fixed_names=False
        )
        pairs = report_pairs(
            job, 25, folder="${username}/${attemptid}", file="a-${lastname}"
        )
        answer = await rest("archivingmod_quiz_generate_attempt_report", pairs)
        assert (answer["foldername"], answer["filename"]) == (
            "anon2/25",
            "a-anonlastname2",
        )

    @pytest.mark.parametrize(
        ("flavour", "expected"),
        [
            ("archivingmod_quiz", {"status": "E_INVALID_FOLDERNAME_PATTERN"}),
            ("quiz_archiver", INVALID_PARAMETER),
        ],
    )
    async def test_invalid_patterns(
        self, moodle: MoodleSimulator, rest: Rest, flavour: str, expected: Any
    ) -> None:
        """Unknown variables are refused: a status or an exception by plugin."""
        job, _ = reference_quiz(moodle, flavour, token=SECRET_TOKEN)
        function = next(f for f in moodle_functions(flavour) if "report" in f)
        answer = await rest(function, report_pairs(job, 24, folder="${password}"))
        assert answer == expected

    async def test_metadata_key_order(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """The metadata answer puts status first, rows in Moodle's order."""
        job, _ = reference_assign(moodle, token=SECRET_TOKEN)
        pairs = [("uuid", "u"), ("taskid", str(job.taskid)), ("submissionids[]", "102")]
        answer = await rest("archivingmod_assign_get_submissions_metadata", pairs)
        assert list(answer) == [
            "status",
            "courseid",
            "cmid",
            "assignmentid",
            "submissions",
        ]
        assert list(answer["submissions"][0]) == [
            "submissionid",
            "userid",
            "username",
            "firstname",
            "lastname",
            "idnumber",
            "attemptnumber",
            "status",
            "timecreated",
            "timemodified",
            "timestarted",
        ]

    async def test_padded_report_is_streamed_valid_json(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """A padded report is valid JSON whose report grew by the padding."""
        job, _ = reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        job.items[23].report_padding = 3_000_000
        moodle.report_quirk = True
        _, _, body = await rest.text(
            "quiz_archiver_generate_attempt_report", report_pairs(job, 23)
        )
        assert body.endswith("}</body></html>")
        answer = json.loads(body.removesuffix("</body></html>"))
        assert len(answer["report"]) == len(job.items[23].html) + 3_000_000


class TestJobLifecycle:
    async def test_statuses_and_token_deletion(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """Statuses are recorded in order; a final one deletes the token."""
        job, _ = reference_quiz(moodle, "archivingmod_quiz", token=SECRET_TOKEN)
        function = STATUS_FUNCTIONS["archivingmod_quiz"]
        task = [("uuid", "job-1"), ("taskid", "7")]
        assert await rest(function, [*task, ("status", "100"), ("progress", "0")])
        assert await rest(function, [*task, ("status", "250")]) == {"status": "OK"}
        assert (job.statuses, job.progress, job.jobid) == ([100, 250], [0], "job-1")
        assert job.done.is_set()
        answer = await rest(function, [*task, ("status", "100")])
        assert answer["errorcode"] == "invalidtoken"

    async def test_jobid_is_learned_then_enforced(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """The first jobid binds the job; unknown ids fail, other jobs' are denied."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        moodle.add_job("other-token", "quiz_archiver", jobid="job-2")
        function = STATUS_FUNCTIONS["quiz_archiver"]

        async def status(jobid: str) -> Any:
            return await rest(function, [("jobid", jobid), ("status", "RUNNING")])

        assert await status("job-1") == {"status": "OK"}
        assert await status("job-9") == {"status": "E_UPDATE_FAILED"}
        assert await status("job-2") == {"status": "E_ACCESS_DENIED"}

    @pytest.mark.parametrize(
        ("pairs", "status"),
        [
            ([("taskid", "7"), ("status", "7")], "E_INVALID_STATUS"),
            (
                [("taskid", "7"), ("status", "100"), ("progress", "101")],
                "E_INVALID_PROGRESS",
            ),
            ([("taskid", "99"), ("status", "100")], "E_TASK_NOT_FOUND"),
            ([("taskid", "8"), ("status", "100")], "E_ACCESS_DENIED"),
        ],
    )
    async def test_task_status_checks(
        self,
        moodle: MoodleSimulator,
        rest: Rest,
        pairs: list[tuple[str, str]],
        status: str,
    ) -> None:
        """local_archiving validates codes, progress and the task's ownership."""
        reference_quiz(moodle, "archivingmod_quiz", token=SECRET_TOKEN, taskid=7)
        moodle.add_job("other-token", "archivingmod_quiz", taskid=8)
        function = STATUS_FUNCTIONS["archivingmod_quiz"]
        assert await rest(function, [("uuid", "u"), *pairs]) == {"status": status}

    async def test_backup_script(self, moodle: MoodleSimulator, rest: Rest) -> None:
        """Backup statuses are answered in turn; the last one repeats."""
        job, _ = reference_quiz(
            moodle,
            "quiz_archiver",
            token=SECRET_TOKEN,
            backup_statuses=["E_BACKUP_PENDING", "SUCCESS"],
        )
        backupid = next(iter(job.backups))
        pairs = [("jobid", "j"), ("backupid", backupid)]
        answers = [
            await rest("quiz_archiver_get_backup_status", pairs) for _ in range(3)
        ]
        assert [a["status"] for a in answers] == [
            "E_BACKUP_PENDING",
            "SUCCESS",
            "SUCCESS",
        ]


class TestFiles:
    async def test_backup_head_and_get(
        self, moodle: MoodleSimulator, http: aiohttp.ClientSession
    ) -> None:
        """Backups are served with Moodle's backup type and their length."""
        job, body = reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        entry = body["task_moodle_backups"][0]
        params = {"token": SECRET_TOKEN}
        async with http.head(entry["file_download_url"], params=params) as resp:
            assert resp.headers["Content-Type"] == "application/vnd.moodle.backup"
            assert resp.content_length == len(job.backups[entry["backupid"]].content)
        async with http.get(
            entry["file_download_url"], params={**params, "forcedownload": "1"}
        ) as resp:
            assert await resp.read() == job.backups[entry["backupid"]].content
            assert resp.headers["Content-Disposition"].startswith("attachment;")

    @pytest.mark.parametrize("token", [None, "wrong"])
    async def test_token_required(
        self, moodle: MoodleSimulator, http: aiohttp.ClientSession, token: str | None
    ) -> None:
        """Without a valid token pluginfile.php answers Moodle's AJAX error."""
        _, body = reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        url = body["task_moodle_backups"][0]["file_download_url"]
        params = {"token": token} if token else {}
        async with http.get(url, params=params) as resp:
            answer = await resp.json()
        assert answer["errorcode"] == "invalidtoken"
        assert list(answer) == [
            "error",
            "errorcode",
            "stacktrace",
            "debuginfo",
            "reproductionlink",
        ]

    async def test_unfinished_backup_and_other_jobs_files_are_not_found(
        self, moodle: MoodleSimulator, http: aiohttp.ClientSession
    ) -> None:
        """A pending backup, or another job's file, is a 404 filenotfound."""
        _, body = reference_quiz(
            moodle,
            "quiz_archiver",
            token=SECRET_TOKEN,
            backup_statuses=["E_BACKUP_PENDING"],
        )
        moodle.add_job("other-token", "archivingmod_quiz", taskid=3)
        url = body["task_moodle_backups"][0]["file_download_url"]
        for token in (SECRET_TOKEN, "other-token"):
            async with http.get(url, params={"token": token}) as resp:
                assert resp.status == 404
                assert (await resp.json())["errorcode"] == "filenotfound"


class TestUpload:
    async def test_answer_is_moodles_file_record(
        self, moodle: MoodleSimulator, http: aiohttp.ClientSession
    ) -> None:
        """upload.php answers a list of file records in Moodle's key order."""
        job, _ = reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        (record,) = await upload(http, moodle, {"a b.zip": b"PK"})
        assert list(record)[:7] == [
            "component",
            "contextid",
            "userid",
            "filearea",
            "filename",
            "filepath",
            "itemid",
        ]
        assert (record["component"], record["filearea"]) == ("user", "draft")
        assert record["userid"] == str(job.userid)
        assert record["filename"] == "a b.zip"
        assert record["itemid"] > 0

    async def test_same_item_and_name_clash(
        self, moodle: MoodleSimulator, http: aiohttp.ClientSession
    ) -> None:
        """Later parts land in the given item; an existing name is refused."""
        job, _ = reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        (first,) = await upload(http, moodle, {"x.bin": b"1"})
        (second,) = await upload(http, moodle, {"y.bin": b"2"}, itemid=first["itemid"])
        (clash,) = await upload(http, moodle, {"y.bin": b"3"}, itemid=first["itemid"])
        assert second["itemid"] == first["itemid"]
        assert clash == {
            "filename": "y.bin",
            "errortype": "filenameexist",
            "error": "File name already exists: y.bin",
        }
        assert sorted(n for _, n in job.drafts[first["itemid"]]) == ["x.bin", "y.bin"]

    async def test_oversized_and_bad_token(
        self, moodle: MoodleSimulator, http: aiohttp.ClientSession
    ) -> None:
        """Files over Moodle's limit get fileoversized; a bad token an error object."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN, max_upload_bytes=10)
        (record,) = await upload(http, moodle, {"big.zip": b"x" * 11})
        assert record["errortype"] == "fileoversized"
        answer = await upload(http, moodle, {"a.zip": b"x"}, token="bad")
        assert answer["errorcode"] == "invalidtoken"

    async def test_reassembly_needs_every_part(
        self, moodle: MoodleSimulator, http: aiohttp.ClientSession, rest: Rest
    ) -> None:
        """A missing chunk fails reassembly, and with it the task."""
        job, _ = reference_assign(moodle, token=SECRET_TOKEN)
        (first,) = await upload(http, moodle, {"a.zip.chunk000000000.bin": b"1"})
        await upload(
            http, moodle, {"a.zip.chunk000000002.bin": b"3"}, itemid=first["itemid"]
        )
        pairs = [
            ("uuid", "u"),
            ("taskid", str(job.taskid)),
            ("artifact_component", "user"),
            ("artifact_contextid", str(first["contextid"])),
            ("artifact_userid", first["userid"]),
            ("artifact_filearea", "draft"),
            ("artifact_filename", "a.zip"),
            ("artifact_filepath", "/"),
            ("artifact_itemid", str(first["itemid"])),
            ("artifact_sha256sum", "0" * 64),
            ("artifact_count", "3"),
        ]
        answer = await rest("archivingmod_assign_process_uploaded_artifact", pairs)
        assert answer == {"status": "E_CHUNK_REASSEMBLY_FAILED"}
        assert job.state == 250


class TestFaults:
    async def test_fail_next_counts(self, moodle: MoodleSimulator, rest: Rest) -> None:
        """fail_next answers HTTP errors exactly the given number of times."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        function = STATUS_FUNCTIONS["quiz_archiver"]
        moodle.fail_next(function, times=2, status=502)
        codes = [(await rest.text(function))[0] for _ in range(3)]
        assert codes == [502, 502, 200]

    async def test_hang_does_not_block_others(
        self, moodle: MoodleSimulator, rest: Rest
    ) -> None:
        """A held request leaves the server free; releasing it answers normally."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        metadata = "quiz_archiver_get_attempts_metadata"
        release = moodle.hang(metadata)
        held = asyncio.create_task(rest(metadata, [*QUIZ_IDS, ("attemptids[]", "24")]))
        assert await rest(STATUS_FUNCTIONS["quiz_archiver"]) == INVALID_PARAMETER
        assert not held.done()
        release.set()
        answer = await held
        assert [row["attemptid"] for row in answer["attempts"]] == [24]

    async def test_down_and_up_again(self, moodle: MoodleSimulator, rest: Rest) -> None:
        """take_down refuses connections; bring_up serves on the same port."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        port = moodle.port
        await moodle.take_down()
        with pytest.raises(aiohttp.ClientConnectionError):
            await rest(STATUS_FUNCTIONS["quiz_archiver"])
        await moodle.bring_up()
        assert moodle.port == port
        assert await rest(STATUS_FUNCTIONS["quiz_archiver"]) == INVALID_PARAMETER

    async def test_respond_error_on_upload(
        self, moodle: MoodleSimulator, http: aiohttp.ClientSession
    ) -> None:
        """respond_error uses the AJAX error shape for upload.php."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        moodle.respond_error(UPLOAD, "uploadproblem", "Disk full")
        answer = await upload(http, moodle, {"a.zip": b"x"})
        assert (answer["errorcode"], answer["error"]) == ("uploadproblem", "Disk full")

    async def test_no_token_in_logs_or_calls(
        self,
        moodle: MoodleSimulator,
        rest: Rest,
        http: aiohttp.ClientSession,
        caplog_debug: pytest.LogCaptureFixture,
    ) -> None:
        """Neither the simulator's log nor its call records keep the token."""
        reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        await rest(STATUS_FUNCTIONS["quiz_archiver"])
        await upload(http, moodle, {"a.zip": b"x"})
        logged = [r.getMessage() for r in caplog_debug.records]
        assert not [m for m in logged if SECRET_TOKEN in m]
        assert SECRET_TOKEN not in repr(moodle.calls)
        assert any(r.levelno == logging.DEBUG for r in caplog_debug.records)


class TestScenarios:
    async def test_quiz_archiver_body(self, moodle: MoodleSimulator) -> None:
        """The quiz_archiver body has the fields and shapes of contract 1.8.2."""
        _, body = reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        assert list(body) == [
            "api_version",
            "moodle_base_url",
            "moodle_ws_url",
            "moodle_upload_url",
            "wstoken",
            "courseid",
            "cmid",
            "quizid",
            "task_archive_quiz_attempts",
            "task_moodle_backups",
            "archive_filename",
        ]
        task = body["task_archive_quiz_attempts"]
        assert task["attemptids"] == [24, 25, 23]
        assert list(task["sections"]) == list(QUIZ_ARCHIVER_SECTIONS)
        assert task["sections"]["attachments"] == "0"
        backups = body["task_moodle_backups"]
        assert [b["filearea"] for b in backups] == ["activity", "course"]
        prefix = moodle.base_url + "/webservice/pluginfile.php/"
        assert all(b["file_download_url"].startswith(prefix) for b in backups)

    async def test_optional_fields(self, moodle: MoodleSimulator) -> None:
        """Upload limit, flatten and filehashes appear only when asked for."""
        _, body = reference_quiz(
            moodle,
            "quiz_archiver",
            token=SECRET_TOKEN,
            max_upload_bytes=1000,
            flatten=True,
            filehashes=False,
            backups=False,
            legacy_sections=True,
        )
        assert body["moodle_max_upload_bytes"] == 1000
        assert (body["archive_flatten"], body["archive_filehashes"]) == (True, False)
        assert body["task_moodle_backups"] is None
        assert list(body["task_archive_quiz_attempts"]["sections"]) == list(
            LEGACY_QUIZ_SECTIONS
        )

    async def test_archivingmod_quiz_body(self, moodle: MoodleSimulator) -> None:
        """archivingmod_quiz nests the token and the job (contract 1.9)."""
        _, body = reference_quiz(
            moodle, "archivingmod_quiz", token=SECRET_TOKEN, attachments=True
        )
        assert body["api_version"] == 1
        assert body["moodle_api"]["wstoken"] == SECRET_TOKEN
        assert "max_upload_bytes" not in body["moodle_api"]
        assert body["job"]["fetch_attachments"] is True
        assert list(body["job"]["report_sections"]) == list(LEGACY_QUIZ_SECTIONS)

    async def test_assign_scenario(self, moodle: MoodleSimulator) -> None:
        """The assignment has recognisable pages and one file of each type."""
        job, body = reference_quiz(moodle, "archivingmod_assign", token=SECRET_TOKEN)
        assert body["job"]["submissionids"] == [101, 102]
        assert body["job"]["report_sections"] == dict.fromkeys(ASSIGN_SECTIONS, True)
        assert list(body["job"]["attachment_types"]) == list(ASSIGN_ATTACHMENT_TYPES)
        assert body["moodle_api"]["max_upload_bytes"] == job.max_upload_bytes
        assert "Submission 101" in job.items[101].html
        groups = [a.group for a in job.items[101].attachments]
        assert groups == list(ASSIGN_ATTACHMENT_TYPES)

    async def test_reference_pages_and_metadata(self, moodle: MoodleSimulator) -> None:
        """Pages point at the simulator; metadata has the current columns."""
        job, _ = reference_quiz(moodle, "quiz_archiver", token=SECRET_TOKEN)
        html = job.items[24].html
        assert "http://moodle/" not in html
        assert f'href="{moodle.base_url}/theme/' in html
        assert [row["attemptid"] for row in job.metadata] == [25, 23, 24]
        assert list(job.metadata[0])[5] == "idnumber"
        raw_job, _ = reference_quiz(
            moodle, "archivingmod_quiz", token="t2", rewrite_wwwroot=False
        )
        assert "http://moodle/" in raw_job.items[24].html

    async def test_unknown_attempts_are_refused(self, moodle: MoodleSimulator) -> None:
        """Only the three reference attempts exist."""
        with pytest.raises(ValueError, match="no attempts"):
            reference_quiz(moodle, "quiz_archiver", attempt_ids=[24, 99])
