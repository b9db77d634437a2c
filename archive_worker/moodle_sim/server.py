"""The simulator's HTTP server, job registry and call log."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

REST_PATH = "/webservice/rest/server.php"

#: The status function each flavour's probe calls (contract 2.1.3).
PROBE_FUNCTIONS = {
    "quiz_archiver_update_job_status": "quiz_archiver",
    "archivingmod_quiz_update_task_status": "archivingmod_quiz",
    "archivingmod_assign_update_task_status": "archivingmod_assign",
}


@dataclass
class RecordedCall:
    """One HTTP request the simulator received."""

    method: str
    path: str
    wsfunction: str | None
    params: dict[str, Any]
    time: float = field(default_factory=time.time)


@dataclass
class SimJob:
    """Moodle's side of one archive job, found by its token."""

    token: str
    flavour: str
    #: Status values the worker reported, in order (strings or task codes).
    statuses: list[Any] = field(default_factory=list)
    #: Progress values reported with RUNNING.
    progress: list[int] = field(default_factory=list)


class MoodleSimulator:
    """A loopback HTTP server imitating Moodle for the archiving plugins.

    Start with :meth:`start` (or ``async with``); :attr:`base_url` is the
    simulated ``wwwroot``.  Register a job with :meth:`add_job` before
    submitting it, since Moodle creates the token first.

    Args:
        host: interface to bind (loopback by default).
        port: TCP port; 0 lets the OS choose.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.jobs: dict[str, SimJob] = {}
        self.calls: list[RecordedCall] = []
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_route("*", REST_PATH, self._rest)

    async def __aenter__(self) -> MoodleSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind and serve."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """The simulated Moodle ``wwwroot``, without trailing slash."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """The REST endpoint URL."""
        return self.base_url + REST_PATH

    @property
    def upload_url(self) -> str:
        """The upload endpoint URL."""
        return self.base_url + "/webservice/upload.php"

    def add_job(self, token: str, flavour: str) -> SimJob:
        """Register a job (and its token) as Moodle would before the POST."""
        job = SimJob(token=token, flavour=flavour)
        self.jobs[token] = job

        return job

    def calls_to(self, wsfunction: str) -> list[RecordedCall]:
        """Recorded REST calls of one function."""
        return [c for c in self.calls if c.wsfunction == wsfunction]

    # --- REST ------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        params: dict[str, Any] = dict(request.query)
        if request.method == "POST":
            params.update(await request.post())
        wsfunction = params.get("wsfunction")
        self.calls.append(
            RecordedCall(
                request.method, request.path, wsfunction, _without_token(params)
            )
        )
        if params.get("moodlewsrestformat") != "json":
            return _xml_error()
        job = self.jobs.get(str(params.get("wstoken", "")))
        if job is None:
            return _error("invalidtoken", "Invalid token - token not found")
        if wsfunction in PROBE_FUNCTIONS and _is_probe(params):
            return _error(
                "invalidparameter",
                "Invalid parameter value detected",
                "moodle_exception",
            )

        return _error("invalidrecord", f"Unknown function {wsfunction}")


def _is_probe(params: dict[str, Any]) -> bool:
    return not (set(params) - {"wstoken", "wsfunction", "moodlewsrestformat"})


def _without_token(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in ("wstoken", "token")}


def _error(
    errorcode: str, message: str, exception: str = "moodle_exception"
) -> web.Response:
    # Moodle answers framework errors with HTTP 200 and this object.
    return web.json_response(
        {"exception": exception, "errorcode": errorcode, "message": message}
    )


def _xml_error() -> web.Response:
    return web.Response(
        text="<?xml version='1.0'?><EXCEPTION/>", content_type="application/xml"
    )
