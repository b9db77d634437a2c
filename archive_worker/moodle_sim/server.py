"""The simulator's HTTP server, job registry, call log and fault knobs.

Requests are served concurrently (the bridge probes Moodle while Moodle's own
request to the bridge is still open).  Three routes exist, as on a real site:
``/webservice/rest/server.php`` (:mod:`.webservice`),
``/webservice/pluginfile.php/...`` and ``/webservice/upload.php``
(:mod:`.files`); anything else is a 404.  Tokens are never logged.

Faults are armed per *target*: a wsfunction name, :data:`PLUGINFILE` or
:data:`UPLOAD`.  Each armed fault applies to the next matching request(s)
after the request has been recorded in :attr:`MoodleSimulator.calls`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from . import files, webservice
from .model import PLUGINFILE, UPLOAD, RecordedCall, SimJob
from .responses import ajax_error_object

log = logging.getLogger(__name__)

REST_PATH: Final = "/webservice/rest/server.php"
UPLOAD_PATH: Final = "/webservice/upload.php"
PLUGINFILE_PREFIX: Final = "/webservice/pluginfile.php"

#: The status function each flavour's probe calls (contract 2.1.3).
PROBE_FUNCTIONS: Final = {
    "quiz_archiver_update_job_status": "quiz_archiver",
    "archivingmod_quiz_update_task_status": "archivingmod_quiz",
    "archivingmod_assign_update_task_status": "archivingmod_assign",
}
#: How long stop() lets open requests finish; hanging ones are released first.
SHUTDOWN_TIMEOUT_S: Final = 1.0


@dataclass
class Fault:
    """A scripted misbehaviour for the next ``remaining`` requests of a target.

    Attributes:
        status: answer this HTTP status with an HTML error page.
        release: wait until this event is set before answering (a hang).
        body: answer these bytes instead, with ``content_type``.
        remaining: how many requests it applies to; None = all.
    """

    status: int | None = None
    release: asyncio.Event | None = None
    body: bytes | None = None
    content_type: str = "text/html"
    remaining: int | None = 1


class MoodleSimulator:
    """A loopback HTTP server imitating Moodle for the archiving plugins.

    Start with :meth:`start` (or ``async with``); :attr:`base_url` is the
    simulated ``wwwroot``.  Register a job with :meth:`add_job` (or a builder
    from :mod:`.scenario`) before submitting it, since Moodle creates the
    token first.  Uploaded files live in a temporary folder that :meth:`stop`
    removes, unless ``storage_dir`` was given.

    Args:
        host: interface to bind (loopback by default).
        port: TCP port; 0 lets the OS choose.
        storage_dir: where drafts and archives are kept.
        debug: add ``debuginfo`` to error objects, as Moodle does with
            developer debugging on.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_dir: Path | None = None,
        debug: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.debug = debug
        #: Append Moodle 4.3's stray ``</body></html>`` to report answers.
        self.report_quirk = False
        self.jobs: dict[str, SimJob] = {}
        self.calls: list[RecordedCall] = []
        self.faults: dict[str, deque[Fault]] = {}
        self.stopping = asyncio.Event()
        self._own_storage = storage_dir is None
        self.storage_dir = storage_dir or Path(tempfile.mkdtemp(prefix="moodle-sim-"))
        self._draft_ids = itertools.count(481_516_230)
        self._down = False
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.app = web.Application(middlewares=[self._drop_when_down])
        self.app.router.add_route("*", REST_PATH, self._rest)
        self.app.router.add_route("*", UPLOAD_PATH, self._upload)
        self.app.router.add_route("*", PLUGINFILE_PREFIX + "/{path:.*}", self._file)

    async def __aenter__(self) -> MoodleSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind and serve."""
        self.stopping.clear()
        self._runner = web.AppRunner(
            self.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        await self._start_site()
        self.port = self._runner.addresses[0][1]
        log.info("moodle_sim.started base_url=%s", self.base_url)

    async def stop(self) -> None:
        """Release hanging requests, stop serving, remove own storage."""
        self.stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None
        if self._own_storage:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    async def take_down(self) -> None:
        """Moodle goes away: refuse connections and drop open ones."""
        self._down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for connection in self._runner.server.connections:
                connection.force_close()

    async def bring_up(self) -> None:
        """Moodle is back, on the same port."""
        self._down = False
        await self._start_site()

    async def _start_site(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port)
        await self._site.start()

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
        return self.base_url + UPLOAD_PATH

    # --- jobs ------------------------------------------------------------

    def add_job(self, token: str, flavour: str, **fields: Any) -> SimJob:
        """Register a job (and its token) as Moodle would before the POST.

        Args:
            token: the job's web service token.
            flavour: ``quiz_archiver``, ``archivingmod_quiz`` or
                ``archivingmod_assign``.
            **fields: any other :class:`SimJob` field.
        """
        job = SimJob(token=token, flavour=str(flavour), **fields)
        self.jobs[token] = job

        return job

    def job_for_token(self, token: str | None) -> SimJob | None:
        """The job whose token is ``token`` and still valid."""
        job = self.jobs.get(token or "")
        return job if job is not None and job.token_valid else None

    def job_by_jobid(self, jobid: str) -> SimJob | None:
        """The job Moodle knows under the worker's job id."""
        return next((j for j in self.jobs.values() if j.jobid == jobid), None)

    def job_by_taskid(self, taskid: int) -> SimJob | None:
        """The local_archiving task with this id."""
        return next((j for j in self.jobs.values() if j.taskid == taskid), None)

    def new_draft_itemid(self) -> int:
        """A fresh draft item id, like ``file_get_unused_draft_itemid()``."""
        return next(self._draft_ids)

    # --- call log -----------------------------------------------------------

    def record(self, call: RecordedCall) -> None:
        """Append a request to :attr:`calls` and log it at DEBUG."""
        self.calls.append(call)
        log.debug(
            "moodle_sim.call method=%s path=%s wsfunction=%s",
            call.method,
            call.path,
            call.wsfunction,
        )

    def calls_to(self, wsfunction: str) -> list[RecordedCall]:
        """Recorded REST calls of one function."""
        return [c for c in self.calls if c.wsfunction == wsfunction]

    def file_requests(self, method: str | None = None) -> list[RecordedCall]:
        """Recorded pluginfile.php requests, optionally of one method."""
        return [
            c
            for c in self.calls
            if c.path.startswith(PLUGINFILE_PREFIX) and method in (None, c.method)
        ]

    # --- faults ---------------------------------------------------------------

    def fail_next(
        self, target: str, times: int | None = 1, *, status: int = 500
    ) -> None:
        """Answer the next ``times`` requests of ``target`` with HTTP ``status``."""
        self._arm(target, Fault(status=status, remaining=times))

    def hang(self, target: str, times: int | None = 1) -> asyncio.Event:
        """Hold the next requests of ``target`` until the returned event is set.

        A request never released is answered only when the simulator stops.
        """
        release = asyncio.Event()
        self._arm(target, Fault(release=release, remaining=times))

        return release

    def respond_with(
        self,
        target: str,
        body: bytes | str,
        *,
        content_type: str = "text/html",
        status: int = 200,
        times: int | None = 1,
    ) -> None:
        """Answer the next requests of ``target`` with a raw body."""
        data = body.encode() if isinstance(body, str) else body
        fault = Fault(body=data, content_type=content_type, remaining=times)
        fault.status = status if status != 200 else None
        self._arm(target, fault)

    def respond_error(
        self,
        target: str,
        errorcode: str,
        message: str,
        *,
        exception: str = "moodle_exception",
        times: int | None = 1,
    ) -> None:
        """Answer the next requests of ``target`` with Moodle's error object."""
        if target in (PLUGINFILE, UPLOAD):
            data: dict[str, Any] = ajax_error_object(errorcode, message)
        else:
            data = {"exception": exception, "errorcode": errorcode, "message": message}
        self.respond_with(
            target,
            json.dumps(data),
            content_type="application/json",
            times=times,
        )

    def clear_faults(self, target: str | None = None) -> None:
        """Disarm the faults of one target, or all."""
        if target is None:
            self.faults.clear()
        else:
            self.faults.pop(target, None)

    def _arm(self, target: str, fault: Fault) -> None:
        self.faults.setdefault(target, deque()).append(fault)

    async def apply_fault(self, target: str | None) -> web.StreamResponse | None:
        """Run the next armed fault of ``target``; None = answer normally."""
        queue = self.faults.get(target or "")
        if not queue:
            return None
        fault = queue[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.popleft()
        if fault.release is not None:
            await self.wait_or_stop(fault.release)
            if self.stopping.is_set():
                return web.Response(status=503, text="shutting down")
        if fault.body is not None:
            return web.Response(
                body=fault.body,
                status=fault.status or 200,
                headers={"Content-Type": fault.content_type},
            )
        if fault.status is not None:
            return web.Response(
                status=fault.status,
                text=f"<html><body><h1>HTTP {fault.status}</h1></body></html>",
                content_type="text/html",
            )
        return None

    async def wait_or_stop(self, event: asyncio.Event) -> None:
        """Wait for ``event``, or until the simulator stops."""
        waiters = {
            asyncio.ensure_future(event.wait()),
            asyncio.ensure_future(self.stopping.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    # --- routes ------------------------------------------------------------------

    @web.middleware
    async def _drop_when_down(
        self, request: web.Request, handler: Any
    ) -> web.StreamResponse:
        if self._down:
            # A keep-alive connection opened before take_down(): drop it like
            # a dead server would, without an answer.
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPServiceUnavailable()
        response: web.StreamResponse = await handler(request)
        return response

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        return await webservice.handle(self, request)

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        return await files.handle_upload(self, request)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        return await files.handle_pluginfile(self, request)
