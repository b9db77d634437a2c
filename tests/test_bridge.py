"""The bridge over real HTTP, against a real nats-server and the Moodle simulator.

Every bridge here is served on a loopback port by :func:`serve_bridge` (or
:func:`run_bridge`) and called with a real HTTP client; Moodle is the
:class:`MoodleSimulator`.  Expected messages are spelled out literally: they
are the contract's (section 1.7, 1.8.3), not imported from the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from archive_worker import __version__
from archive_worker import constants as c
from archive_worker.broker import Broker
from archive_worker.config import Settings, load_settings
from archive_worker.embedded import EmbeddedNats
from archive_worker.events import StatusEvent
from archive_worker.jobs import Flavour, JobSpec, JobStatus, decode_job
from archive_worker.moodle_sim import MoodleSimulator
from bridge.app import derive_worker_status
from bridge.server import BridgeAddress, run_bridge, serve_bridge
from tests.conftest import SECRET_TOKEN

MISSING = "JSON is missing a required parameter."
INCOMPLETE = "JSON is technically incomplete or missing a required parameter."
NOT_JSON = "Request payload must be JSON."
INVALID_REQUEST = "Invalid request."
QUEUE_FULL = "Maximum number of queued jobs exceeded."
IDS_REQUIRED = (
    "Either the 3-tuple courseid, cmid and quizid or taskid must be given to "
    "create an archive request."
)
PROBE_FAILED = (
    'Could not establish a connection to Moodle webservice API at "{}" '
    "using the provided wstoken."
)


def invalid(reason: str) -> str:
    """The contract's 400 message for a semantic validation failure."""
    return f"JSON data is invalid: {reason}"


# --- request bodies ------------------------------------------------------------------


def quiz_body(base: str, token: str = SECRET_TOKEN) -> dict[str, Any]:
    """Contract 1.8.2 ``reference_quiz_full``, pointed at the Moodle at ``base``."""
    return {
        "api_version": 7,
        "moodle_base_url": base,
        "moodle_ws_url": f"{base}/webservice/rest/server.php",
        "moodle_upload_url": f"{base}/webservice/upload.php",
        "wstoken": token,
        "courseid": 9,
        "cmid": 23,
        "quizid": 12,
        "task_archive_quiz_attempts": {
            "attemptids": [24, 25, 23],
            "fetch_metadata": True,
            "sections": {
                "header": "1",
                "quiz_feedback": "1",
                "question": "1",
                "question_feedback": "1",
                "general_feedback": "1",
                "rightanswer": "1",
                "history": "1",
                "attachments": "1",
            },
            "paper_format": "A4",
            "keep_html_files": True,
            "foldername_pattern": "${username}/${attemptid}-${date}_${time}",
            "filename_pattern": "attempt-${attemptid}-${username}_${date}-${time}",
            "image_optimize": False,
        },
        "task_moodle_backups": [
            {
                "backupid": "d68a3dedfdc9a93dab4b8c93dfd6dda9",
                "userid": 47,
                "context": 66,
                "component": "backup",
                "filearea": "activity",
                "filepath": "/",
                "filename": "quiz_archiver-activity-backup-23.mbz",
                "itemid": None,
                "pathnamehash": "118304132d9af1fcdd201bab191744a6043a8525",
                "file_download_url": f"{base}/webservice/pluginfile.php/66/backup/"
                "activity/quiz_archiver-activity-backup-23.mbz",
            }
        ],
        "archive_filename": "quiz-archive-QA-REF-9-Reference Quiz (standard question types)-12",
    }


def _moodle_api(base: str, token: str) -> dict[str, Any]:
    return {
        "wstoken": token,
        "base_url": base,
        "webservice_url": f"{base}/webservice/rest/server.php",
        "upload_url": f"{base}/webservice/upload.php",
    }


def aq_body(base: str, token: str = SECRET_TOKEN) -> dict[str, Any]:
    """An archivingmod_quiz 1.0.0 request (contract 1.9)."""
    return {
        "api_version": 1,
        "taskid": 42,
        "moodle_api": _moodle_api(base, token),
        "job": {
            "attemptids": [24, 25],
            "report_sections": {"header": "1", "question": "1", "attachments": "0"},
            "paper_format": "Letter",
            "archive_filename": "archive-quiz-42",
            "foldername_pattern": "${username}",
            "filename_pattern": "attempt-${attemptid}",
            "image_optimize": False,
            "fetch_metadata": True,
            "fetch_attachments": False,
            "keep_html_files": False,
        },
    }


def aa_body(base: str, token: str = SECRET_TOKEN) -> dict[str, Any]:
    """An archivingmod_assign request as in the new worker's fixtures (1.10)."""
    return {
        "api_version": 1,
        "taskid": 1,
        "moodle_api": {**_moodle_api(base, token), "max_upload_bytes": 536870912},
        "job": {
            "submissionids": [101, 102],
            "paper_format": "A4",
            "archive_filename": "assign-archive-CM-1-Example Assignment",
            "archive_flatten": False,
            "archive_filehashes": True,
            "keep_html_files": True,
            "image_optimize": False,
            "report_sections": {"header": True, "submission": True, "grade": False},
            "fetch_metadata": True,
            "foldername_pattern": "submission_${submissionid}",
            "filename_pattern": "submission_${submissionid}",
            "attachment_types": {
                "assignment": True,
                "submission": True,
                "feedback": False,
            },
        },
    }


BODIES: dict[Flavour, Callable[..., dict[str, Any]]] = {
    Flavour.QUIZ_ARCHIVER: quiz_body,
    Flavour.ARCHIVINGMOD_QUIZ: aq_body,
    Flavour.ARCHIVINGMOD_ASSIGN: aa_body,
}
PATHS = {
    Flavour.QUIZ_ARCHIVER: "/archive/quiz_archiver",
    Flavour.ARCHIVINGMOD_QUIZ: "/archive/archivingmod_quiz",
    Flavour.ARCHIVINGMOD_ASSIGN: "/archive/archivingmod_assign",
}
PROBE_FUNCTIONS = {
    Flavour.QUIZ_ARCHIVER: "quiz_archiver_update_job_status",
    Flavour.ARCHIVINGMOD_QUIZ: "archivingmod_quiz_update_task_status",
    Flavour.ARCHIVINGMOD_ASSIGN: "archivingmod_assign_update_task_status",
}


# --- the bridge under test ------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP answer of the bridge."""

    status: int
    body: Any
    headers: Any
    text: str


@dataclass
class Bridge:
    """A served bridge, its broker and an HTTP client pointed at it."""

    settings: Settings
    broker: Broker
    address: BridgeAddress
    http: aiohttp.ClientSession

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: Any = None,
        content_type: str | None = None,
    ) -> Reply:
        """Send a request; every answer must be JSON, whatever its status."""
        headers = {"Content-Type": content_type} if content_type else {}
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers.setdefault("Content-Type", "application/json")
        async with self.http.request(method, path, data=data, headers=headers) as r:
            text = await r.text()
            assert r.content_type == "application/json", text
            return Reply(r.status, await r.json(), r.headers, text)

    async def get(self, path: str) -> Reply:
        """GET ``path``."""
        return await self.call("GET", path)

    async def post(self, path: str, body: Any) -> Reply:
        """POST ``body`` as JSON to ``path``."""
        return await self.call("POST", path, json_body=body)

    async def submit(
        self, moodle: MoodleSimulator, flavour: Flavour, token: str
    ) -> Reply:
        """Register ``token`` with Moodle and post a valid job of ``flavour``."""
        moodle.add_job(token, flavour.value)
        return await self.post(PATHS[flavour], BODIES[flavour](moodle.base_url, token))


StartBridge = Callable[..., Awaitable[Bridge]]


@contextlib.asynccontextmanager
async def served_bridge(nats_url: str, settings: Settings) -> AsyncIterator[Bridge]:
    """A bridge with its own NATS connection, served on a loopback port."""
    broker = await Broker.connect(settings, url=nats_url, name="bridge")
    try:
        await broker.ensure_topology()
        async with (
            serve_bridge(settings, broker) as address,
            aiohttp.ClientSession(base_url=address.url) as http,
        ):
            yield Bridge(settings, broker, address, http)
    finally:
        await broker.close()


@pytest.fixture
async def start_bridge(
    nats_server: EmbeddedNats, make_settings: Callable[..., Settings]
) -> AsyncIterator[StartBridge]:
    """Start bridges with setting overrides; all stop at the end of the test."""
    assert nats_server.url
    url = nats_server.url
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Bridge:
            settings = make_settings(nats_url=url, **overrides)
            return await stack.enter_async_context(served_bridge(url, settings))

        yield start


@pytest.fixture
async def bridge(start_bridge: StartBridge) -> Bridge:
    """One bridge with the test settings."""
    return await start_bridge()


async def last_job(broker: Broker, flavour: Flavour) -> JobSpec:
    """The newest job message of ``flavour`` on ARCHIVE_JOBS."""
    msg = await broker.js.get_last_msg(c.JOBS_STREAM, c.job_subject(flavour.value))
    return decode_job(msg.data or b"")


async def stream_messages(broker: Broker, stream: str) -> int:
    """How many messages ``stream`` holds."""
    return int((await broker.js.stream_info(stream)).state.messages)


@contextlib.asynccontextmanager
async def worker_consumer(broker: Broker) -> AsyncIterator[Any]:
    """A pull subscription on the workers' durable consumer, as a worker has."""
    sub = await broker.js.pull_subscribe_bind(
        durable=c.WORKERS_CONSUMER, stream=c.JOBS_STREAM
    )
    try:
        yield sub
    finally:
        await sub.unsubscribe()


# --- validation: every message, for every flavour where it applies --------------------

DELETE = object()

#: Where each logical field lives in each flavour's body.
FIELDS: dict[Flavour, dict[str, tuple[str, ...]]] = {
    Flavour.QUIZ_ARCHIVER: {
        "api_version": ("api_version",),
        "base_url": ("moodle_base_url",),
        "ws_url": ("moodle_ws_url",),
        "upload_url": ("moodle_upload_url",),
        "token": ("wstoken",),
        "archive_filename": ("archive_filename",),
        "archive_flatten": ("archive_flatten",),
        "archive_filehashes": ("archive_filehashes",),
        "ids": ("task_archive_quiz_attempts", "attemptids"),
        "sections": ("task_archive_quiz_attempts", "sections"),
        "fetch_metadata": ("task_archive_quiz_attempts", "fetch_metadata"),
        "paper_format": ("task_archive_quiz_attempts", "paper_format"),
        "keep_html_files": ("task_archive_quiz_attempts", "keep_html_files"),
        "foldername_pattern": ("task_archive_quiz_attempts", "foldername_pattern"),
        "filename_pattern": ("task_archive_quiz_attempts", "filename_pattern"),
        "image_optimize": ("task_archive_quiz_attempts", "image_optimize"),
    },
    Flavour.ARCHIVINGMOD_QUIZ: {
        "api_version": ("api_version",),
        "base_url": ("moodle_api", "base_url"),
        "ws_url": ("moodle_api", "webservice_url"),
        "upload_url": ("moodle_api", "upload_url"),
        "token": ("moodle_api", "wstoken"),
        "archive_filename": ("job", "archive_filename"),
        "archive_flatten": ("job", "archive_flatten"),
        "archive_filehashes": ("job", "archive_filehashes"),
        "ids": ("job", "attemptids"),
        "sections": ("job", "report_sections"),
        "fetch_metadata": ("job", "fetch_metadata"),
        "paper_format": ("job", "paper_format"),
        "keep_html_files": ("job", "keep_html_files"),
        "foldername_pattern": ("job", "foldername_pattern"),
        "filename_pattern": ("job", "filename_pattern"),
        "image_optimize": ("job", "image_optimize"),
    },
}
FIELDS[Flavour.ARCHIVINGMOD_ASSIGN] = {
    **FIELDS[Flavour.ARCHIVINGMOD_QUIZ],
    "ids": ("job", "submissionids"),
}


@dataclass(frozen=True)
class Case:
    """One invalid body: changes to a valid one, and the expected 400 message."""

    name: str
    changes: tuple[tuple[str, object], ...]
    message: str | Callable[[Flavour], str]


def _ids_invalid(flavour: Flavour) -> str:
    kind = "Submission" if flavour is Flavour.ARCHIVINGMOD_ASSIGN else "Attempt"
    return invalid(f"{kind} ID list is invalid.")


def _sections_invalid(flavour: Flavour) -> str:
    if flavour is Flavour.ARCHIVINGMOD_ASSIGN:
        return invalid("Submission report sections are invalid.")
    return invalid("Attempt report sections are invalid.")


def _version_mismatch(flavour: Flavour) -> str:
    worker = (
        "archiving-worker"
        if flavour is Flavour.ARCHIVINGMOD_ASSIGN
        else "quiz-archive-worker"
    )
    return invalid(
        f"API version mismatch. Expected: {flavour.api_version}, Got: 99. "
        f"Please update your {worker}!"
    )


_IMAGE = {"width": 1024, "height": 768, "quality": 85}

#: Cases that apply to every flavour, with logical field names.
COMMON_CASES = [
    Case(
        "api_version-missing",
        (("api_version", DELETE),),
        invalid("API version missing in request payload"),
    ),
    Case(
        "api_version-string",
        (("api_version", "7"),),
        invalid("API version must be an integer"),
    ),
    Case(
        "api_version-true",
        (("api_version", True),),
        invalid("API version must be an integer"),
    ),
    Case(
        "api_version-float",
        (("api_version", 1.0),),
        invalid("API version must be an integer"),
    ),
    Case(
        "api_version-null",
        (("api_version", None),),
        invalid("API version must be an integer"),
    ),
    Case("api_version-mismatch", (("api_version", 99),), _version_mismatch),
    Case("base_url-missing", (("base_url", DELETE),), MISSING),
    Case("base_url-empty", (("base_url", ""),), invalid("Base URL is required")),
    Case("base_url-null", (("base_url", None),), invalid("Base URL is required")),
    Case(
        "base_url-not-http",
        (("base_url", "ftp://moodle.example"),),
        invalid("Base URL is invalid"),
    ),
    Case(
        "base_url-php",
        (("base_url", "http://moodle.example/index.php"),),
        invalid("Base URL is invalid"),
    ),
    Case("base_url-number", (("base_url", 42),), invalid("Base URL is invalid")),
    Case("ws_url-missing", (("ws_url", DELETE),), MISSING),
    Case(
        "ws_url-empty",
        (("ws_url", ""),),
        invalid("Webservice REST base URL is required"),
    ),
    Case(
        "ws_url-wrong-path",
        (("ws_url", "http://moodle.example/webservice/soap/server.php"),),
        invalid("Webservice REST base URL is invalid"),
    ),
    Case(
        "ws_url-not-http",
        (("ws_url", "moodle.example/webservice/rest/server.php"),),
        invalid("Webservice REST base URL is invalid"),
    ),
    Case(
        "ws_url-query",
        (("ws_url", "http://moodle.example/?x=/webservice/rest/server.php"),),
        invalid("Webservice REST base URL is invalid"),
    ),
    Case("upload_url-missing", (("upload_url", DELETE),), MISSING),
    Case(
        "upload_url-empty",
        (("upload_url", ""),),
        invalid("Webservice upload URL is required"),
    ),
    Case(
        "upload_url-wrong-path",
        (("upload_url", "http://moodle.example/upload.php"),),
        invalid("Webservice upload URL is invalid"),
    ),
    Case("token-missing", (("token", DELETE),), MISSING),
    Case("token-empty", (("token", ""),), invalid("wstoken is required")),
    Case("token-null", (("token", None),), invalid("wstoken is required")),
    Case("archive_filename-missing", (("archive_filename", DELETE),), MISSING),
    Case(
        "archive_filename-empty",
        (("archive_filename", ""),),
        invalid("Archive filename is invalid."),
    ),
    Case(
        "archive_filename-number",
        (("archive_filename", 5),),
        invalid("Archive filename is invalid."),
    ),
    Case(
        "archive_filename-path",
        (("archive_filename", "dir/archive"),),
        invalid("Archive filename must not contain a path."),
    ),
    Case(
        "archive_filename-trailing-slash",
        (("archive_filename", "archive/"),),
        invalid("Archive filename must not contain a path."),
    ),
    *(
        Case(
            f"archive_filename-forbidden-{ord(ch)}",
            (("archive_filename", f"arc{ch}hive"),),
            invalid("Archive filename contains forbidden characters."),
        )
        for ch in '\0\\:*?"<>|.'
    ),
    Case(
        "archive_flatten-not-bool",
        (("archive_flatten", "yes"),),
        invalid("Archive flatten flag is invalid."),
    ),
    Case(
        "archive_filehashes-not-bool",
        (("archive_filehashes", 1),),
        invalid("Archive filehashes flag is invalid."),
    ),
    Case("ids-missing", (("ids", DELETE),), MISSING),
    Case("ids-empty", (("ids", []),), _ids_invalid),
    Case("ids-null", (("ids", None),), _ids_invalid),
    Case("ids-zero", (("ids", [24, 0]),), _ids_invalid),
    Case("ids-text", (("ids", ["abc"]),), _ids_invalid),
    Case("sections-missing", (("sections", DELETE),), MISSING),
    Case("sections-empty", (("sections", {}),), _sections_invalid),
    Case("sections-null", (("sections", None),), _sections_invalid),
    Case("sections-nested", (("sections", {"header": {"x": 1}}),), _sections_invalid),
    Case("fetch_metadata-missing", (("fetch_metadata", DELETE),), MISSING),
    Case(
        "fetch_metadata-string",
        (("fetch_metadata", "1"),),
        invalid("Fetch metadata flag is invalid."),
    ),
    Case("paper_format-missing", (("paper_format", DELETE),), MISSING),
    Case(
        "paper_format-unknown",
        (("paper_format", "B5"),),
        invalid("Paper format is invalid."),
    ),
    Case(
        "paper_format-null",
        (("paper_format", None),),
        invalid("Paper format is invalid."),
    ),
    Case("keep_html_files-missing", (("keep_html_files", DELETE),), MISSING),
    Case(
        "keep_html_files-string",
        (("keep_html_files", "true"),),
        invalid("Keep HTML files flag is invalid."),
    ),
    Case("foldername_pattern-missing", (("foldername_pattern", DELETE),), MISSING),
    Case(
        "foldername_pattern-empty",
        (("foldername_pattern", ""),),
        invalid("Folder name pattern is invalid."),
    ),
    Case("filename_pattern-missing", (("filename_pattern", DELETE),), MISSING),
    Case(
        "filename_pattern-empty",
        (("filename_pattern", ""),),
        invalid("Filename pattern is invalid."),
    ),
    Case(
        "filename_pattern-null",
        (("filename_pattern", None),),
        invalid("Filename pattern is invalid."),
    ),
    Case("image_optimize-missing", (("image_optimize", DELETE),), MISSING),
    Case(
        "image_optimize-true",
        (("image_optimize", True),),
        invalid("Image optimization flag is invalid."),
    ),
    Case(
        "image_optimize-string",
        (("image_optimize", "yes"),),
        invalid("Image optimization flag is invalid."),
    ),
    Case(
        "image_optimize-width-missing",
        (("image_optimize", {"height": 1, "quality": 1}),),
        MISSING,
    ),
    Case(
        "image_optimize-quality-missing",
        (("image_optimize", {"width": 1, "height": 1}),),
        MISSING,
    ),
    Case(
        "image_optimize-width-zero",
        (("image_optimize", {**_IMAGE, "width": 0}),),
        invalid("Image optimization width is invalid."),
    ),
    Case(
        "image_optimize-width-text",
        (("image_optimize", {**_IMAGE, "width": "wide"}),),
        invalid("Image optimization width is invalid."),
    ),
    Case(
        "image_optimize-height-zero",
        (("image_optimize", {**_IMAGE, "height": 0}),),
        invalid("Image optimization height is invalid."),
    ),
    Case(
        "image_optimize-quality-over",
        (("image_optimize", {**_IMAGE, "quality": 101}),),
        invalid("Image optimization quality is invalid."),
    ),
    Case(
        "image_optimize-quality-negative",
        (("image_optimize", {**_IMAGE, "quality": -1}),),
        invalid("Image optimization quality is invalid."),
    ),
    # Order: checks of one group come after all its keys are read, and the
    # groups follow one another (contract 1.7 steps 3-4).
    Case(
        "order-urls-before-token",
        (("token", ""), ("ws_url", "")),
        invalid("Webservice REST base URL is required"),
    ),
    Case(
        "order-url-check-before-later-keys",
        (("base_url", "ftp://x"), ("archive_filename", DELETE)),
        invalid("Base URL is invalid"),
    ),
    Case(
        "order-missing-key-before-checks",
        (("ids", []), ("filename_pattern", DELETE)),
        MISSING,
    ),
    Case("order-ids-before-paper", (("ids", []), ("paper_format", "B5")), _ids_invalid),
    Case(
        "order-paper-before-folder",
        (("paper_format", "B5"), ("foldername_pattern", "")),
        invalid("Paper format is invalid."),
    ),
    Case(
        "order-width-before-height",
        (("image_optimize", {**_IMAGE, "width": 0, "height": 0}),),
        invalid("Image optimization width is invalid."),
    ),
    Case(
        "order-filename-before-report",
        (("archive_filename", ""), ("ids", [])),
        invalid("Archive filename is invalid."),
    ),
]

_BACKUP = ("task_moodle_backups",)
_BACKUP0 = ("task_moodle_backups", "0")

#: quiz_archiver only, with literal paths (``"0"`` indexes the backup list).
QUIZ_ARCHIVER_CASES = [
    Case("courseid-zero", ((("courseid",), 0),), invalid(IDS_REQUIRED)),
    Case("cmid-negative", ((("cmid",), -1),), invalid(IDS_REQUIRED)),
    Case("quizid-null", ((("quizid",), None),), invalid(IDS_REQUIRED)),
    Case("courseid-text", ((("courseid",), "nine"),), invalid(IDS_REQUIRED)),
    Case("courseid-bool", ((("courseid",), True),), invalid(IDS_REQUIRED)),
    Case("courseid-too-large", ((("courseid",), 2**64),), invalid(IDS_REQUIRED)),
    Case("cmid-long-text", ((("cmid",), "9" * 5000),), invalid(IDS_REQUIRED)),
    Case("courseid-missing", ((("courseid",), DELETE),), MISSING),
    Case("cmid-missing", ((("cmid",), DELETE),), MISSING),
    Case("quizid-missing", ((("quizid",), DELETE),), MISSING),
    Case(
        "order-ids-before-filename",
        ((("courseid",), 0), (("archive_filename",), "")),
        invalid(IDS_REQUIRED),
    ),
    Case(
        "max_upload-negative",
        ((("moodle_max_upload_bytes",), -1),),
        invalid("Maximum upload size is invalid."),
    ),
    Case(
        "attempts-task-missing", ((("task_archive_quiz_attempts",), DELETE),), MISSING
    ),
    Case("attempts-task-true", ((("task_archive_quiz_attempts",), True),), INCOMPLETE),
    Case("attempts-task-list", ((("task_archive_quiz_attempts",), [1]),), INCOMPLETE),
    Case(
        "attempts-task-string", ((("task_archive_quiz_attempts",), "all"),), INCOMPLETE
    ),
    Case("backups-missing", ((_BACKUP, DELETE),), MISSING),
    Case("backups-true", ((_BACKUP, True),), INCOMPLETE),
    Case("backups-object", ((_BACKUP, {"backupid": "x"}),), INCOMPLETE),
    Case("backups-null-element", ((_BACKUP, [None]),), INCOMPLETE),
    Case("backup-id-missing", (((*_BACKUP0, "backupid"), DELETE),), MISSING),
    Case("backup-filename-missing", (((*_BACKUP0, "filename"), DELETE),), MISSING),
    Case("backup-url-missing", (((*_BACKUP0, "file_download_url"), DELETE),), MISSING),
    Case(
        "backup-id-empty",
        (((*_BACKUP0, "backupid"), ""),),
        invalid("Moodle backup ID is invalid."),
    ),
    Case(
        "backup-id-number",
        (((*_BACKUP0, "backupid"), 7),),
        invalid("Moodle backup ID is invalid."),
    ),
    Case(
        "backup-filename-empty",
        (((*_BACKUP0, "filename"), ""),),
        invalid("Moodle backup filename is invalid."),
    ),
    Case(
        "backup-filename-path",
        (((*_BACKUP0, "filename"), "../escape.mbz"),),
        invalid("Moodle backup filename is invalid."),
    ),
    Case(
        "backup-url-elsewhere",
        (((*_BACKUP0, "file_download_url"), "http://elsewhere.example/x.mbz"),),
        invalid("Moodle backup file download URL is invalid."),
    ),
    Case(
        "backup-url-empty",
        (((*_BACKUP0, "file_download_url"), ""),),
        invalid("Moodle backup file download URL is invalid."),
    ),
    Case(
        "order-backup-checks-after-report",
        (
            (("task_archive_quiz_attempts", "attemptids"), []),
            ((*_BACKUP0, "backupid"), ""),
        ),
        invalid("Attempt ID list is invalid."),
    ),
]

#: Both local_archiving drivers, literal paths.
LOCAL_ARCHIVING_CASES = [
    Case("taskid-missing", ((("taskid",), DELETE),), MISSING),
    Case("taskid-zero", ((("taskid",), 0),), invalid(IDS_REQUIRED)),
    Case("taskid-text", ((("taskid",), "task"),), invalid(IDS_REQUIRED)),
    Case("moodle_api-missing", ((("moodle_api",), DELETE),), MISSING),
    Case("moodle_api-null", ((("moodle_api",), None),), INCOMPLETE),
    Case("moodle_api-list", ((("moodle_api",), []),), INCOMPLETE),
    Case("job-missing", ((("job",), DELETE),), MISSING),
    Case("job-null", ((("job",), None),), INCOMPLETE),
    Case("job-string", ((("job",), "job"),), INCOMPLETE),
    Case(
        "order-urls-before-taskid",
        ((("moodle_api", "base_url"), ""), (("taskid",), DELETE)),
        invalid("Base URL is required"),
    ),
    Case(
        "order-taskid-before-filename",
        ((("taskid",), 0), (("job", "archive_filename"), "")),
        invalid(IDS_REQUIRED),
    ),
]

ARCHIVINGMOD_QUIZ_CASES = [
    Case(
        "fetch_attachments-missing", ((("job", "fetch_attachments"), DELETE),), MISSING
    ),
    Case(
        "fetch_attachments-string",
        ((("job", "fetch_attachments"), "1"),),
        invalid("Fetch attachments flag is invalid."),
    ),
    Case(
        "max_upload-text",
        ((("moodle_api", "max_upload_bytes"), "big"),),
        invalid("Maximum upload size is invalid."),
    ),
]

ARCHIVINGMOD_ASSIGN_CASES = [
    Case(
        "max_upload-missing", ((("moodle_api", "max_upload_bytes"), DELETE),), MISSING
    ),
    Case(
        "max_upload-negative",
        ((("moodle_api", "max_upload_bytes"), -5),),
        invalid("Maximum upload size is invalid."),
    ),
    Case(
        "max_upload-null",
        ((("moodle_api", "max_upload_bytes"), None),),
        invalid("Maximum upload size is invalid."),
    ),
    Case("archive_flatten-missing", ((("job", "archive_flatten"), DELETE),), MISSING),
    Case(
        "archive_filehashes-missing",
        ((("job", "archive_filehashes"), DELETE),),
        MISSING,
    ),
    Case("attachment_types-missing", ((("job", "attachment_types"), DELETE),), MISSING),
    Case(
        "attachment_types-empty",
        ((("job", "attachment_types"), {}),),
        invalid("Attachment type selection is invalid."),
    ),
    Case(
        "attachment_types-not-flag",
        ((("job", "attachment_types"), {"submission": "yes"}),),
        invalid("Attachment type selection is invalid."),
    ),
    Case(
        "sections-not-flag",
        ((("job", "report_sections"), {"header": "maybe"}),),
        invalid("Submission report sections are invalid."),
    ),
    Case(
        "order-sections-before-attachments",
        ((("job", "report_sections"), {}), (("job", "attachment_types"), {})),
        invalid("Submission report sections are invalid."),
    ),
    Case(
        "order-fetch_metadata-before-attachments",
        ((("job", "fetch_metadata"), None), (("job", "attachment_types"), {})),
        invalid("Fetch metadata flag is invalid."),
    ),
]


def _params() -> list[Any]:
    params = []
    for flavour in Flavour:
        fields = FIELDS[flavour]
        for case in COMMON_CASES:
            changes = tuple((fields[name], value) for name, value in case.changes)
            params.append(
                pytest.param(
                    flavour, changes, case.message, id=f"{flavour}-{case.name}"
                )
            )
        extra = {
            Flavour.QUIZ_ARCHIVER: QUIZ_ARCHIVER_CASES,
            Flavour.ARCHIVINGMOD_QUIZ: LOCAL_ARCHIVING_CASES + ARCHIVINGMOD_QUIZ_CASES,
            Flavour.ARCHIVINGMOD_ASSIGN: LOCAL_ARCHIVING_CASES
            + ARCHIVINGMOD_ASSIGN_CASES,
        }[flavour]
        for case in extra:
            params.append(
                pytest.param(
                    flavour, case.changes, case.message, id=f"{flavour}-{case.name}"
                )
            )
    return params


def _apply(
    body: dict[str, Any], changes: tuple[tuple[tuple[str, ...], object], ...]
) -> None:
    for path, value in changes:
        target: Any = body
        for key in path[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Bridge, MoodleSimulator]]:
    """One bridge, NATS and Moodle for many requests that never get queued."""
    folder = tmp_path_factory.mktemp("bridge")
    settings = load_settings(
        environ={},
        overrides={"host": "127.0.0.1", "port": 0, "data_dir": str(folder)},
    )
    async with (
        EmbeddedNats(folder / "nats", port=0) as server,
        MoodleSimulator() as moodle,
    ):
        assert server.url
        async with served_bridge(server.url, settings) as bridge:
            moodle.add_job(SECRET_TOKEN, "quiz_archiver")
            yield bridge, moodle


@pytest.mark.asyncio(loop_scope="class")
class TestValidation:
    """Invalid bodies; one bridge serves them all, as none may reach the queue."""

    @pytest.mark.parametrize(("flavour", "changes", "message"), _params())
    async def test_invalid_body_is_rejected_with_contract_message(
        self,
        shared: tuple[Bridge, MoodleSimulator],
        flavour: Flavour,
        changes: Any,
        message: str | Callable[[Flavour], str],
    ) -> None:
        """Each invalid body gets 400 and the contract's exact message, unprobed."""
        bridge, moodle = shared
        body = BODIES[flavour](moodle.base_url)
        _apply(body, changes)
        reply = await bridge.post(PATHS[flavour], body)
        expected = message(flavour) if callable(message) else message
        assert (reply.status, reply.body) == (400, {"error": expected})
        assert moodle.calls == []
        assert await stream_messages(bridge.broker, c.JOBS_STREAM) == 0

    @pytest.mark.parametrize("flavour", list(Flavour))
    @pytest.mark.parametrize(
        ("content_type", "data", "message"),
        [
            pytest.param(
                "text/plain", b'{"api_version": 7}', NOT_JSON, id="text-plain"
            ),
            pytest.param(
                "application/x-www-form-urlencoded", b"a=b", NOT_JSON, id="form"
            ),
            pytest.param(None, b'{"api_version": 7}', NOT_JSON, id="octet-stream"),
            pytest.param("text/plain", b"{not json", NOT_JSON, id="type-checked-first"),
            pytest.param(
                "application/json", b"{not json", INVALID_REQUEST, id="malformed"
            ),
            pytest.param("application/json", b"", INVALID_REQUEST, id="empty"),
            pytest.param(
                "application/json", b'{"a": "\xff"}', INVALID_REQUEST, id="not-utf8"
            ),
            pytest.param("application/json", b"[]", INCOMPLETE, id="top-level-array"),
            pytest.param("application/json", b"null", INCOMPLETE, id="top-level-null"),
            pytest.param(
                "application/json", b'"job"', INCOMPLETE, id="top-level-string"
            ),
        ],
    )
    async def test_body_that_is_not_a_json_object(
        self,
        shared: tuple[Bridge, MoodleSimulator],
        flavour: Flavour,
        content_type: str | None,
        data: bytes,
        message: str,
    ) -> None:
        """Content type is checked before parsing, parsing before validation."""
        bridge, _ = shared
        reply = await bridge.call(
            "POST", PATHS[flavour], data=data, content_type=content_type
        )
        assert (reply.status, reply.body) == (400, {"error": message})


# --- accepted jobs --------------------------------------------------------------------


class TestAccepted:
    async def test_reference_quiz_full_is_queued(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """The contract's reference job is probed, queued and answered with its id."""
        reply = await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, SECRET_TOKEN)
        assert reply.status == 200
        assert reply.body == {
            "jobid": reply.body["jobid"],
            "status": "AWAITING_PROCESSING",
        }
        assert str(uuid.UUID(reply.body["jobid"])) == reply.body["jobid"]

        spec = await last_job(bridge.broker, Flavour.QUIZ_ARCHIVER)
        assert spec.job_id == reply.body["jobid"]
        assert (spec.courseid, spec.cmid, spec.quizid, spec.taskid) == (9, 23, 12, None)
        assert spec.moodle.token == SECRET_TOKEN
        assert spec.moodle.base_url == moodle.base_url
        assert spec.archive_filename == quiz_body(moodle.base_url)["archive_filename"]
        assert spec.reports is not None
        assert spec.reports.ids == [24, 25, 23]
        assert (
            spec.reports.sections
            == quiz_body(moodle.base_url)["task_archive_quiz_attempts"]["sections"]
        )
        assert spec.reports.fetch_attachments is True
        assert spec.reports.paper_format == "A4"
        assert spec.reports.image_optimize is None
        assert [b.backupid for b in spec.backups] == [
            "d68a3dedfdc9a93dab4b8c93dfd6dda9"
        ]
        assert spec.submitted_at > 0

        # The probe: one GET of the status function, without any parameters.
        probes = moodle.calls_to("quiz_archiver_update_job_status")
        assert [(call.method, call.path) for call in moodle.calls] == [
            ("GET", "/webservice/rest/server.php")
        ]
        assert len(probes) == 1
        assert not set(probes[0].params) - {"wsfunction", "moodlewsrestformat"}

    async def test_queued_event_is_published(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """A new job gets one AWAITING_PROCESSING event at stage queued."""
        reply = await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, SECRET_TOKEN)
        event = await bridge.broker.last_event(reply.body["jobid"])
        assert event is not None
        assert event.status is JobStatus.AWAITING_PROCESSING
        assert event.stage == "queued"
        assert event.flavour == "quiz_archiver"
        assert event.moodle is not None
        assert (event.moodle.base_url, event.moodle.courseid) == (moodle.base_url, 9)

    @pytest.mark.parametrize(
        ("path", "flavour"),
        [
            ("/archive", Flavour.QUIZ_ARCHIVER),
            ("/archive/quiz_archiver", Flavour.QUIZ_ARCHIVER),
            ("/archive/archivingmod_quiz", Flavour.ARCHIVINGMOD_QUIZ),
            ("/archive/archivingmod_assign", Flavour.ARCHIVINGMOD_ASSIGN),
        ],
    )
    async def test_every_archive_path_queues_its_flavour(
        self, bridge: Bridge, moodle: MoodleSimulator, path: str, flavour: Flavour
    ) -> None:
        """Each POST path accepts its flavour and probes that flavour's function."""
        moodle.add_job(SECRET_TOKEN, flavour.value)
        reply = await bridge.post(path, BODIES[flavour](moodle.base_url))
        assert reply.status == 200, reply.body
        spec = await last_job(bridge.broker, flavour)
        assert (spec.job_id, spec.flavour) == (reply.body["jobid"], flavour)
        assert [call.wsfunction for call in moodle.calls] == [PROBE_FUNCTIONS[flavour]]

    @pytest.mark.parametrize("flavour", list(Flavour))
    @pytest.mark.parametrize(
        ("sent", "expected"),
        [
            ("A4", "A4"),
            ("a4", "A4"),
            ("Letter", "Letter"),
            ("LETTER", "Letter"),
            ("legal", "Legal"),
            ("TABLOID", "Tabloid"),
            ("Ledger", "Ledger"),
        ],
    )
    async def test_paper_format_in_either_spelling(
        self,
        bridge: Bridge,
        moodle: MoodleSimulator,
        flavour: Flavour,
        sent: str,
        expected: str,
    ) -> None:
        """Moodle's (Letter) and the old worker's (LETTER) spelling both work."""
        body = BODIES[flavour](moodle.base_url)
        _apply(body, ((FIELDS[flavour]["paper_format"], sent),))
        moodle.add_job(SECRET_TOKEN, flavour.value)
        reply = await bridge.post(PATHS[flavour], body)
        assert reply.status == 200, reply.body
        spec = await last_job(bridge.broker, flavour)
        assert spec.reports is not None
        assert spec.reports.paper_format == expected

    @pytest.mark.parametrize(
        ("value", "fetch"),
        [("1", True), ("0", False), (1, False), (True, False)],
    )
    async def test_quiz_archiver_attachments_need_the_string_one(
        self, bridge: Bridge, moodle: MoodleSimulator, value: object, fetch: bool
    ) -> None:
        """Only sections.attachments == "1" enables attachments (contract 1.8.1)."""
        body = quiz_body(moodle.base_url)
        body["task_archive_quiz_attempts"]["sections"]["attachments"] = value
        moodle.add_job(SECRET_TOKEN, "quiz_archiver")
        assert (await bridge.post("/archive", body)).status == 200
        spec = await last_job(bridge.broker, Flavour.QUIZ_ARCHIVER)
        assert spec.reports is not None
        assert spec.reports.fetch_attachments is fetch

    async def test_quiz_sections_pass_through_unchanged(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """Quiz section values keep their form; only JSON booleans become 1/0."""
        body = aq_body(moodle.base_url)
        body["job"]["report_sections"] = {"header": "1", "question": 0, "history": True}
        moodle.add_job(SECRET_TOKEN, "archivingmod_quiz")
        assert (await bridge.post(PATHS[Flavour.ARCHIVINGMOD_QUIZ], body)).status == 200
        spec = await last_job(bridge.broker, Flavour.ARCHIVINGMOD_QUIZ)
        assert spec.reports is not None
        assert spec.reports.sections == {"header": "1", "question": 0, "history": 1}
        assert spec.taskid == 42

    @pytest.mark.parametrize("key", ["attachment_types", "attachments"])
    async def test_assign_values_become_wire_flags(
        self, bridge: Bridge, moodle: MoodleSimulator, key: str
    ) -> None:
        """Assign sections become 1/0 and either attachment key is accepted."""
        body = aa_body(moodle.base_url)
        body["job"][key] = body["job"].pop("attachment_types")
        moodle.add_job(SECRET_TOKEN, "archivingmod_assign")
        reply = await bridge.post(PATHS[Flavour.ARCHIVINGMOD_ASSIGN], body)
        assert reply.status == 200, reply.body
        spec = await last_job(bridge.broker, Flavour.ARCHIVINGMOD_ASSIGN)
        assert spec.reports is not None
        assert spec.reports.sections == {"header": 1, "submission": 1, "grade": 0}
        assert spec.reports.attachment_types == {
            "assignment": True,
            "submission": True,
            "feedback": False,
        }
        assert spec.reports.ids == [101, 102]
        assert spec.moodle.max_upload_bytes == 536870912
        assert (spec.archive_flatten, spec.archive_filehashes) == (False, True)

    async def test_empty_job_is_accepted(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """The contract's empty_job (both tasks null) is valid."""
        body = quiz_body(moodle.base_url, "opensesame")
        body.update(
            courseid=1,
            cmid=1,
            quizid=1,
            archive_filename="archive",
            task_archive_quiz_attempts=None,
            task_moodle_backups=None,
        )
        moodle.add_job("opensesame", "quiz_archiver")
        assert (await bridge.post("/archive", body)).status == 200
        spec = await last_job(bridge.broker, Flavour.QUIZ_ARCHIVER)
        assert (spec.reports, spec.backups) == (None, [])

    async def test_php_style_values_are_accepted(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """Ids as decimal strings, optional layout flags and upload limit are read."""
        body = quiz_body(moodle.base_url)
        body.update(courseid="9", moodle_max_upload_bytes=1024, archive_flatten=True)
        body["task_archive_quiz_attempts"]["attemptids"] = ["24", 25]
        body["task_archive_quiz_attempts"]["image_optimize"] = _IMAGE
        moodle.add_job(SECRET_TOKEN, "quiz_archiver")
        assert (await bridge.post("/archive", body)).status == 200
        spec = await last_job(bridge.broker, Flavour.QUIZ_ARCHIVER)
        assert spec.courseid == 9
        assert spec.moodle.max_upload_bytes == 1024
        assert (spec.archive_flatten, spec.archive_filehashes) == (True, True)
        assert spec.reports is not None
        assert spec.reports.ids == [24, 25]
        assert spec.reports.image_optimize is not None
        assert spec.reports.image_optimize.quality == 85

    async def test_json_suffix_content_type_is_json(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """``application/*+json`` counts as JSON, as in the reference."""
        moodle.add_job(SECRET_TOKEN, "quiz_archiver")
        reply = await bridge.call(
            "POST",
            "/archive",
            json_body=quiz_body(moodle.base_url),
            content_type="application/vnd.moodle+json; charset=utf-8",
        )
        assert reply.status == 200


# --- duplicates, queue limit, several bridges -----------------------------------------


class TestQueue:
    async def test_duplicate_is_one_job(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """A resubmitted job gets the same id, one message and one queued event."""
        first = await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, SECRET_TOKEN)
        second = await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, SECRET_TOKEN)
        assert first.status == second.status == 200
        assert first.body == second.body
        assert await stream_messages(bridge.broker, c.JOBS_STREAM) == 1
        assert await stream_messages(bridge.broker, c.STATUS_STREAM) == 1

    async def test_queue_full_then_recovers(
        self, start_bridge: StartBridge, moodle: MoodleSimulator
    ) -> None:
        """A full queue answers 429 with Retry-After, unprobed, until a job leaves."""
        bridge = await start_bridge(queue_size=2, retry_after_s=17)
        for token in ("job-1", "job-2"):
            assert (
                await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, token)
            ).status == 200

        refused = await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, "job-3")
        assert (refused.status, refused.body) == (429, {"error": QUEUE_FULL})
        assert refused.headers["Retry-After"] == "17"
        assert len(moodle.calls) == 2

        async with worker_consumer(bridge.broker) as sub:
            (msg,) = await sub.fetch(1, timeout=5)
            await msg.ack_sync()
        accepted = await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, "job-3")
        assert accepted.status == 200

    async def test_duplicate_of_queued_job_is_accepted_when_full(
        self, start_bridge: StartBridge, moodle: MoodleSimulator
    ) -> None:
        """Resubmitting a job that is already queued is not refused as queue full."""
        bridge = await start_bridge(queue_size=1)
        first = await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, "only")
        again = await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, "only")
        assert (again.status, again.body) == (200, first.body)
        assert await stream_messages(bridge.broker, c.JOBS_STREAM) == 1

    async def test_two_bridges_agree(
        self, start_bridge: StartBridge, moodle: MoodleSimulator
    ) -> None:
        """Two bridges on one NATS answer /status and /status/<id> alike."""
        one, two = await start_bridge(), await start_bridge()
        reply = await one.submit(moodle, Flavour.ARCHIVINGMOD_QUIZ, "shared")
        job = f"/status/{reply.body['jobid']}"
        assert (await one.get("/status")).body == (await two.get("/status")).body
        assert (await two.get(job)).body == {
            "id": reply.body["jobid"],
            "status": "AWAITING_PROCESSING",
        }
        assert (await one.get(job)).body == (await two.get(job)).body
        dup = await two.submit(moodle, Flavour.ARCHIVINGMOD_QUIZ, "shared")
        assert dup.body == reply.body

    async def test_new_bridge_still_knows_the_job(
        self,
        nats_server: EmbeddedNats,
        make_settings: Callable[..., Settings],
        moodle: MoodleSimulator,
    ) -> None:
        """A bridge started after another stopped answers /status/<id> of its jobs."""
        assert nats_server.url
        settings = make_settings(nats_url=nats_server.url)
        async with served_bridge(nats_server.url, settings) as first:
            reply = await first.submit(moodle, Flavour.QUIZ_ARCHIVER, SECRET_TOKEN)
        async with served_bridge(nats_server.url, settings) as second:
            status = await second.get(f"/status/{reply.body['jobid']}")
        assert status.body == {
            "id": reply.body["jobid"],
            "status": "AWAITING_PROCESSING",
        }


# --- status endpoints -----------------------------------------------------------------


class TestStatus:
    async def test_index_and_version(self, bridge: Bridge) -> None:
        """GET / names the app and version, GET /version the version alone."""
        assert (await bridge.get("/")).body == {
            "app": "moodle-archive-worker",
            "version": __version__,
        }
        assert (await bridge.get("/version")).body == {"version": __version__}

    async def test_status_follows_the_queue(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """GET /status reports queued and running jobs and derives the status."""
        idle = await bridge.get("/status")
        assert idle.body == {
            "status": "IDLE",
            "jobs_processing": [],
            "jobs_queued": [],
            "jobs_max": bridge.settings.job_slots,
            "queue_max": 8,
            "queue_len": 0,
        }
        ids = [
            (await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, f"t{i}")).body["jobid"]
            for i in range(2)
        ]
        waiting = (await bridge.get("/status")).body
        assert (waiting["status"], waiting["jobs_queued"], waiting["queue_len"]) == (
            "UNKNOWN",
            ids,
            2,
        )
        async with worker_consumer(bridge.broker) as sub:
            (first,) = await sub.fetch(1, timeout=5)
            busy = (await bridge.get("/status")).body
            assert (busy["status"], busy["jobs_processing"], busy["jobs_queued"]) == (
                "BUSY",
                ids[:1],
                ids[1:],
            )
            (second,) = await sub.fetch(1, timeout=5)
            assert (await bridge.get("/status")).body["status"] == "ACTIVE"
            await first.ack_sync()
            await second.ack_sync()
        assert (await bridge.get("/status")).body["status"] == "IDLE"

    async def test_status_unavailable_when_full(
        self, start_bridge: StartBridge, moodle: MoodleSimulator
    ) -> None:
        """GET /status says UNAVAILABLE when a new job would get 429."""
        bridge = await start_bridge(queue_size=1)
        await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, "t")
        assert (await bridge.get("/status")).body["status"] == "UNAVAILABLE"

    @pytest.mark.parametrize(
        ("waiting", "processing", "expected"),
        [
            (0, 0, "IDLE"),
            (0, 1, "ACTIVE"),
            (0, 7, "ACTIVE"),
            (1, 1, "BUSY"),
            (2, 0, "UNKNOWN"),
            (8, 0, "UNAVAILABLE"),
            (5, 3, "UNAVAILABLE"),
        ],
    )
    def test_worker_status_derivation(
        self, waiting: int, processing: int, expected: str
    ) -> None:
        """The status values keep the meaning contract 1.4 gives them."""
        assert derive_worker_status(waiting, processing, 8) == expected

    async def test_job_status_follows_events(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """GET /status/<id> answers the newest event's status, CANCELED as FAILED."""
        reply = await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, SECRET_TOKEN)
        job_id = reply.body["jobid"]
        for status, shown in [
            (JobStatus.RUNNING, "RUNNING"),
            (JobStatus.CANCELED, "FAILED"),
        ]:
            await bridge.broker.publish_event(
                StatusEvent(job_id=job_id, flavour="quiz_archiver", status=status)
            )
            got = await bridge.get(f"/status/{job_id.upper()}")
            assert got.body == {"id": job_id, "status": shown}

    @pytest.mark.parametrize(
        "jobid", [str(uuid.uuid4()), "not-a-uuid", "*", ">", "a.b"]
    )
    async def test_unknown_job_is_404(self, bridge: Bridge, jobid: str) -> None:
        """Unknown or malformed job ids get the contract's 404 message."""
        reply = await bridge.get(f"/status/{jobid}")
        assert (reply.status, reply.body) == (
            404,
            {"error": f"Job with requested jobid '{jobid}' was not found"},
        )


# --- probe ----------------------------------------------------------------------------


class TestProbe:
    async def test_unknown_token(self, bridge: Bridge, moodle: MoodleSimulator) -> None:
        """A token Moodle does not know fails the probe with the contract's 400."""
        body = quiz_body(moodle.base_url, "never-registered")
        reply = await bridge.post("/archive", body)
        assert (reply.status, reply.body) == (
            400,
            {"error": PROBE_FAILED.format(body["moodle_ws_url"])},
        )
        assert len(moodle.calls) == 1
        assert await stream_messages(bridge.broker, c.JOBS_STREAM) == 0

    async def test_closed_port(self, bridge: Bridge, moodle: MoodleSimulator) -> None:
        """Nothing listening at the web service URL fails the probe."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        body = aa_body(moodle.base_url)
        body["moodle_api"].update(
            base_url=base,
            webservice_url=f"{base}/webservice/rest/server.php",
            upload_url=f"{base}/webservice/upload.php",
        )
        reply = await bridge.post(PATHS[Flavour.ARCHIVINGMOD_ASSIGN], body)
        assert (reply.status, reply.body) == (
            400,
            {"error": PROBE_FAILED.format(f"{base}/webservice/rest/server.php")},
        )

    async def test_answer_without_errorcode(self, bridge: Bridge) -> None:
        """A JSON answer that is not Moodle's invalidparameter object fails."""
        # The bridge itself answers that path with {"error": "Not found."}.
        base = bridge.address.url
        body = quiz_body(base)
        reply = await bridge.post("/archive", body)
        assert (reply.status, reply.body) == (
            400,
            {"error": PROBE_FAILED.format(f"{base}/webservice/rest/server.php")},
        )

    async def test_timeout(self, start_bridge: StartBridge) -> None:
        """A Moodle that never answers fails the probe after probe_timeout_s."""
        release = asyncio.Event()

        async def hang(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await release.wait()
            writer.close()

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        try:
            bridge = await start_bridge(probe_timeout_s=0.2)
            port = server.sockets[0].getsockname()[1]
            body = quiz_body(f"http://127.0.0.1:{port}")
            reply = await bridge.post("/archive", body)
            assert (reply.status, reply.body) == (
                400,
                {"error": PROBE_FAILED.format(body["moodle_ws_url"])},
            )
        finally:
            release.set()
            server.close()
            await server.wait_closed()


# --- security and limits --------------------------------------------------------------


class TestGuards:
    async def test_allowlist_refuses_before_any_call(
        self, start_bridge: StartBridge, moodle: MoodleSimulator
    ) -> None:
        """A site not on the allow-list gets 403 and Moodle is never called."""
        bridge = await start_bridge(moodle_allowlist=["https://moodle.example"])
        moodle.add_job(SECRET_TOKEN, "quiz_archiver")
        reply = await bridge.post("/archive", quiz_body(moodle.base_url))
        assert reply.status == 403
        assert reply.body == {
            "error": f'Moodle at "{moodle.base_url}" is not allowed to use this worker.'
        }
        assert moodle.calls == []
        assert await stream_messages(bridge.broker, c.JOBS_STREAM) == 0

    async def test_allowlist_admits_listed_site(
        self, start_bridge: StartBridge, moodle: MoodleSimulator
    ) -> None:
        """A listed site (trailing slash or not) is accepted."""
        bridge = await start_bridge(moodle_allowlist=[moodle.base_url + "/"])
        reply = await bridge.submit(moodle, Flavour.ARCHIVINGMOD_QUIZ, SECRET_TOKEN)
        assert reply.status == 200

    async def test_allowlist_covers_every_url(
        self, start_bridge: StartBridge, moodle: MoodleSimulator
    ) -> None:
        """A listed base URL with the web service elsewhere is refused unprobed."""
        bridge = await start_bridge(moodle_allowlist=[moodle.base_url])
        body = aq_body(moodle.base_url)
        body["moodle_api"]["webservice_url"] = (
            "http://127.0.0.2:9/webservice/rest/server.php"
        )
        reply = await bridge.post(PATHS[Flavour.ARCHIVINGMOD_QUIZ], body)
        assert reply.status == 403
        assert moodle.calls == []

    async def test_secret_prefix(
        self,
        start_bridge: StartBridge,
        moodle: MoodleSimulator,
        caplog_debug: pytest.LogCaptureFixture,
    ) -> None:
        """With a prefix every route lives below it; without it all is 404."""
        bridge = await start_bridge(path_prefix="s3cr3t")
        for path in ("/", "/version", "/status", "/healthz", "/openapi.json"):
            hidden = await bridge.get(path)
            assert (hidden.status, hidden.body) == (404, {"error": "Not found."})
            assert (await bridge.get("/s3cr3t" + path)).status == 200
        assert (await bridge.get("/s3cr3t")).body["app"] == "moodle-archive-worker"

        body = quiz_body(moodle.base_url)
        moodle.add_job(SECRET_TOKEN, "quiz_archiver")
        assert (await bridge.post("/archive", body)).status == 404
        assert moodle.calls == []
        accepted = await bridge.post("/s3cr3t/archive", body)
        assert accepted.status == 200
        assert "s3cr3t" not in accepted.text
        assert "s3cr3t" not in caplog_debug.text

    async def test_body_too_large(
        self, start_bridge: StartBridge, moodle: MoodleSimulator
    ) -> None:
        """A body over max_request_bytes gets a JSON 413, declared or streamed."""
        bridge = await start_bridge(max_request_bytes=2048)
        body = quiz_body(moodle.base_url)
        body["padding"] = "x" * 4096
        declared = await bridge.post("/archive", body)
        message = {"error": "Request payload too large (limit: 2048 bytes)."}
        assert (declared.status, declared.body) == (413, message)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(8):
                yield b" " * 512

        streamed = await bridge.call(
            "POST", "/archive", data=chunks(), content_type="application/json"
        )
        assert (streamed.status, streamed.body) == (413, message)
        assert moodle.calls == []

    async def test_unknown_path_and_wrong_method(self, bridge: Bridge) -> None:
        """Unknown paths get a JSON 404, wrong methods a JSON 405 with Allow."""
        missing = await bridge.get("/nothing/here")
        assert (missing.status, missing.body) == (404, {"error": "Not found."})
        wrong = await bridge.get("/archive")
        assert (wrong.status, wrong.body) == (405, {"error": "Method not allowed."})
        assert "POST" in wrong.headers["Allow"]
        posted = await bridge.call("POST", "/status", data=b"{}")
        assert posted.status == 405

    async def test_token_is_never_logged_or_returned(
        self,
        bridge: Bridge,
        moodle: MoodleSimulator,
        caplog_debug: pytest.LogCaptureFixture,
    ) -> None:
        """At DEBUG the token is in no log record and no response."""
        replies = [
            await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, SECRET_TOKEN),
            await bridge.submit(moodle, Flavour.QUIZ_ARCHIVER, SECRET_TOKEN),
            await bridge.post(
                "/archive", {**quiz_body(moodle.base_url), "courseid": 0}
            ),
        ]
        unknown = quiz_body(moodle.base_url, SECRET_TOKEN[::-1])
        replies.append(await bridge.post("/archive", unknown))
        job_id = replies[0].body["jobid"]
        replies += [await bridge.get("/status"), await bridge.get(f"/status/{job_id}")]
        assert [r.status for r in replies] == [200, 200, 400, 400, 200, 200]

        assert caplog_debug.records, "DEBUG logging was captured"
        assert any(
            r.getMessage().startswith("job.accepted ") and r.levelno == logging.INFO
            for r in caplog_debug.records
        )
        for token in (SECRET_TOKEN, SECRET_TOKEN[::-1]):
            for record in caplog_debug.records:
                assert token not in record.getMessage(), record.name
                assert token not in str(record.args)
            assert token not in caplog_debug.text
            assert all(token not in r.text for r in replies)
            assert all(token not in str(dict(r.headers)) for r in replies)

    async def test_broker_unavailable(
        self, bridge: Bridge, moodle: MoodleSimulator
    ) -> None:
        """Without NATS, POST and /status answer 503 with Retry-After, /readyz 503."""
        await bridge.broker.close()
        moodle.add_job(SECRET_TOKEN, "quiz_archiver")
        for reply in (
            await bridge.post("/archive", quiz_body(moodle.base_url)),
            await bridge.get("/status"),
            await bridge.get(f"/status/{uuid.uuid4()}"),
        ):
            assert reply.status == 503
            assert reply.headers["Retry-After"] == str(bridge.settings.retry_after_s)
            assert set(reply.body) == {"error"}
        assert (await bridge.get("/readyz")).status == 503
        assert moodle.calls == []


class TestOperations:
    async def test_health_and_readiness(self, bridge: Bridge) -> None:
        """/healthz is 200; /readyz is 200 only while the topology exists."""
        assert (await bridge.get("/healthz")).body == {"status": "ok"}
        assert (await bridge.get("/readyz")).body == {"status": "ready"}
        await bridge.broker.js.delete_stream(c.DLQ_STREAM)
        not_ready = await bridge.get("/readyz")
        assert not_ready.status == 503
        assert set(not_ready.body) == {"error"}

    async def test_openapi_document(self, bridge: Bridge) -> None:
        """/openapi.json describes every endpoint and the three request bodies."""
        doc = (await bridge.get("/openapi.json")).body
        assert doc["openapi"].startswith("3.")
        assert set(doc["paths"]) >= {
            "/",
            "/version",
            "/status",
            "/status/{jobid}",
            *PATHS.values(),
            "/archive",
            "/healthz",
            "/readyz",
        }
        schemas = doc["components"]["schemas"]
        assert {
            "QuizArchiverRequest",
            "ArchivingmodQuizRequest",
            "ArchivingmodAssignRequest",
        } <= set(schemas)

    async def test_run_bridge_on_port_zero(
        self, broker: Broker, make_settings: Callable[..., Settings]
    ) -> None:
        """run_bridge binds a free port, sets ready, serves, and stops on stop."""
        ready, stop = asyncio.Event(), asyncio.Event()
        address = BridgeAddress()
        task = asyncio.create_task(
            run_bridge(make_settings(), broker, ready=ready, stop=stop, address=address)
        )
        await asyncio.wait_for(ready.wait(), timeout=10)
        assert address.port > 0
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{address.url}/version") as reply,
        ):
            assert reply.status == 200
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as http:
                await http.get(f"{address.url}/version")
