"""The bridge's aiohttp application: the existing worker's HTTP API on JetStream.

Every answer is JSON; errors are ``{"error": "<message>"}`` with the
contract's status codes (section 1).  The bridge holds no state: the queue
and ``/status`` come from the jobs stream and its consumer, a job's status
from the newest event on ``archive.status.<jobid>``.

A POST runs the contract's steps (1.7) in order: content type, JSON, the
flavour's validation (:mod:`bridge.requests`), the allow-list, a capacity
check, the Moodle probe (:mod:`bridge.probe`), then the publish.  JetStream's
discard-new limit is what really bounds the queue; the capacity check only
spares Moodle a probe that could not lead anywhere.

Logging: one INFO line per accepted job (``job.accepted``), one WARNING line
per rejected POST (``job.rejected``) and ``log.exception`` for anything
unexpected, which is still answered with JSON.  Neither the token nor the
secret path prefix appears in a log line or a response.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry.trace import SpanKind

from archive_worker import __version__
from archive_worker import constants as c
from archive_worker.broker import Broker, QueueState
from archive_worker.config import Settings
from archive_worker.errors import BrokerError, QueueFull
from archive_worker.events import Stage, StatusEvent
from archive_worker.jobs import Flavour, JobSpec, JobStatus, job_identity
from archive_worker.telemetry import Telemetry

from .openapi import OPENAPI
from .probe import open_probe_session, probe_failed_message, probe_moodle
from .requests import (
    INVALID_REQUEST,
    NOT_JSON,
    RequestRejected,
    decode_body,
    is_json_content_type,
    parse_job,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

QUEUE_FULL = "Maximum number of queued jobs exceeded."
BROKER_UNAVAILABLE = "Job queue temporarily unavailable. Please try again later."
NOT_FOUND = "Not found."
METHOD_NOT_ALLOWED = "Method not allowed."

#: The POST paths and the flavour each one speaks (contract 1.2); the bare
#: ``/archive`` is the one quiz_archiver actually uses.
ARCHIVE_PATHS = {
    "/archive": Flavour.QUIZ_ARCHIVER,
    "/archive/quiz_archiver": Flavour.QUIZ_ARCHIVER,
    "/archive/archivingmod_quiz": Flavour.ARCHIVINGMOD_QUIZ,
    "/archive/archivingmod_assign": Flavour.ARCHIVINGMOD_ASSIGN,
}


class WorkerStatus:
    """The ``status`` values of ``GET /status`` (contract 1.4)."""

    IDLE = "IDLE"
    ACTIVE = "ACTIVE"
    BUSY = "BUSY"
    UNAVAILABLE = "UNAVAILABLE"
    UNKNOWN = "UNKNOWN"


def derive_worker_status(waiting: int, processing: int, queue_max: int) -> str:
    """Map queue occupancy to the contract's worker status.

    The reference compared ``processing`` with its own thread count; a bridge
    does not know how many workers run, so the derivation keeps the meaning
    of each value instead:

    * ``UNAVAILABLE``: the queue is full, a new job would get 429.  Our limit
      counts waiting *and* running jobs, because JetStream holds both.
    * ``IDLE``: nothing waits, nothing runs.
    * ``ACTIVE``: jobs run, none waits.
    * ``BUSY``: jobs wait while others run (workers take jobs only when they
      have a free slot, so waiting means every slot is taken).
    * ``UNKNOWN``: jobs wait but none runs, i.e. no worker is taking jobs
      right now (none started, or all of them restarting).
    """
    if waiting + processing >= queue_max:
        return WorkerStatus.UNAVAILABLE
    if waiting == 0:
        return WorkerStatus.ACTIVE if processing else WorkerStatus.IDLE
    return WorkerStatus.BUSY if processing else WorkerStatus.UNKNOWN


def status_body(state: QueueState, settings: Settings) -> dict[str, Any]:
    """The ``GET /status`` body from the queue's state.

    ``jobs_max`` is ``job_slots``, the configured slots *per worker process*:
    the bridge cannot know how many workers run, and the field has no other
    honest value.  ``queue_len`` keeps pre-4.0 plugins working (1.4).
    """
    return {
        "status": derive_worker_status(
            len(state.waiting), len(state.processing), settings.queue_size
        ),
        "jobs_processing": state.processing,
        "jobs_queued": state.waiting,
        "jobs_max": settings.job_slots,
        "queue_max": settings.queue_size,
        "queue_len": len(state.waiting),
    }


def route_prefix(path_prefix: str | None) -> str:
    """``/<prefix>`` for a configured secret prefix, else the empty string."""
    return "/" + path_prefix.strip("/") if path_prefix else ""


def create_app(
    settings: Settings, broker: Broker, telemetry: Telemetry | None = None
) -> web.Application:
    """Build the bridge application.

    Args:
        settings: the service settings (limits, prefix, allow-list, probe).
        broker: a connected broker; the app does not close it.
        telemetry: the process's telemetry (spans of POSTs, ``/metrics``);
            none records nothing.

    Returns:
        The application.  Its startup opens one HTTP session for the Moodle
        probes, its cleanup closes it.
    """
    bridge = _Bridge(settings, broker, telemetry or Telemetry.disabled())
    app = web.Application(
        client_max_size=settings.max_request_bytes,
        middlewares=[_error_middleware(settings)],
    )
    app.cleanup_ctx.append(bridge.http_session)
    prefix = route_prefix(settings.path_prefix)
    routes = [
        web.get(prefix + "/", bridge.index, name="index"),
        web.get(prefix + "/version", bridge.version, name="version"),
        web.get(prefix + "/status", bridge.status, name="status"),
        web.get(prefix + "/status/{jobid}", bridge.job_status, name="job_status"),
        web.get(prefix + "/healthz", bridge.healthz, name="healthz"),
        web.get(prefix + "/readyz", bridge.readyz, name="readyz"),
        web.get(prefix + "/openapi.json", bridge.openapi, name="openapi"),
        web.get(prefix + "/metrics", bridge.telemetry.metrics_handler, name="metrics"),
    ]
    if prefix:
        routes.append(web.get(prefix, bridge.index, name="index_bare"))
    for path, flavour in ARCHIVE_PATHS.items():
        name = "archive" + path.removeprefix("/archive").replace("/", "_")
        routes.append(
            web.post(prefix + path, bridge.archive_handler(flavour), name=name)
        )
    app.router.add_routes(routes)

    return app


def _json_error(
    message: str,
    status: int,
    *,
    retry_after_s: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    all_headers = dict(headers or {})
    if retry_after_s is not None:
        all_headers["Retry-After"] = str(retry_after_s)
    return web.json_response({"error": message}, status=status, headers=all_headers)


def _route_name(request: web.Request) -> str:
    # The route's name, never the path: the path may hold the secret prefix.
    return request.match_info.route.name or "unknown"


def _error_middleware(settings: Settings) -> Middleware:
    """Answer every failure with a JSON error; never HTML, never a 500."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestRejected as exc:
            return _json_error(exc.message, exc.status, retry_after_s=exc.retry_after_s)
        except web.HTTPException as exc:
            return _http_exception(exc, settings)
        except BrokerError as exc:
            log.warning(
                "http.broker_unavailable route=%s error=%s", _route_name(request), exc
            )
            return _json_error(
                BROKER_UNAVAILABLE, 503, retry_after_s=settings.retry_after_s
            )
        except Exception:
            log.exception("http.failed route=%s", _route_name(request))
            # Contract 1.7: any other failure of a POST is "Invalid request.";
            # for a GET the fault is ours, and may pass.
            if request.method == "POST":
                return _json_error(INVALID_REQUEST, 400)
            return _json_error(
                BROKER_UNAVAILABLE, 503, retry_after_s=settings.retry_after_s
            )

    return errors


def _http_exception(exc: web.HTTPException, settings: Settings) -> web.StreamResponse:
    if exc.status < 400:
        raise exc
    if exc.status == 404:
        return _json_error(NOT_FOUND, 404)
    if exc.status == 405:
        return _json_error(
            METHOD_NOT_ALLOWED, 405, headers={"Allow": exc.headers.get("Allow", "")}
        )
    if exc.status == 413:
        return _json_error(
            f"Request payload too large (limit: {settings.max_request_bytes} bytes).",
            413,
        )
    return _json_error(exc.reason, exc.status)


class _Bridge:
    """The handlers, sharing settings, broker and the probe's HTTP session."""

    def __init__(
        self, settings: Settings, broker: Broker, telemetry: Telemetry
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.telemetry = telemetry
        self._session: aiohttp.ClientSession | None = None

    async def http_session(self, app: web.Application) -> AsyncIterator[None]:
        """Open the shared probe session on startup, close it on cleanup."""
        self._session = open_probe_session(self.settings)
        try:
            yield
        finally:
            await self._session.close()
            self._session = None

    # --- information ---------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        """``GET /``: app name and version."""
        return web.json_response({"app": c.APP_NAME, "version": __version__})

    async def version(self, request: web.Request) -> web.Response:
        """``GET /version``."""
        return web.json_response({"version": __version__})

    async def status(self, request: web.Request) -> web.Response:
        """``GET /status``: load of the whole queue, the same on every bridge."""
        state = await self.broker.queue_state()
        return web.json_response(status_body(state, self.settings))

    async def job_status(self, request: web.Request) -> web.Response:
        """``GET /status/<jobid>``: the status of the job's newest event.

        A job id that is not a UUID is not looked up at all: it would be
        spliced into a NATS subject, where ``*`` and ``>`` are wildcards.
        CANCELED, which the contract does not know, is reported as FAILED.
        """
        jobid = request.match_info["jobid"]
        job_id = _canonical_uuid(jobid)
        event = await self.broker.last_event(job_id) if job_id else None
        if event is None:
            raise RequestRejected(
                f"Job with requested jobid '{jobid}' was not found", status=404
            )
        return web.json_response(
            {"id": job_id, "status": event.status.quiz_archiver_value}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``: the process serves requests."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """``GET /readyz``: 200 when NATS is connected and the topology exists."""
        if self.broker.connected and await self.broker.topology_present():
            return web.json_response({"status": "ready"})
        return _json_error("Not ready: job queue not available.", 503)

    async def openapi(self, request: web.Request) -> web.Response:
        """``GET /openapi.json``: the OpenAPI description of this API."""
        return web.json_response(OPENAPI)

    # --- jobs -------------------------------------------------------------------------

    def archive_handler(self, flavour: Flavour) -> Handler:
        """The POST handler of one flavour."""

        async def handle(request: web.Request) -> web.StreamResponse:
            # The trace starts here (or continues a caller's traceparent) and
            # travels to the worker in the job message's headers.
            with self.telemetry.tracer.start_as_current_span(
                "http.archive",
                context=self.telemetry.extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={
                    "flavour": flavour.value,
                    "http.route": _route_name(request),
                },
            ) as span:
                response = await self._archive_logged(request, flavour)
                span.set_attribute("http.response.status_code", response.status)
                return response

        return handle

    async def _archive_logged(
        self, request: web.Request, flavour: Flavour
    ) -> web.StreamResponse:
        try:
            return await self._archive(request, flavour)
        except (RequestRejected, web.HTTPException) as exc:
            reason = exc.message if isinstance(exc, RequestRejected) else exc.reason
            log.warning(
                "job.rejected flavour=%s status=%d error=%s",
                flavour.value,
                exc.status,
                reason,
            )
            raise

    async def _archive(self, request: web.Request, flavour: Flavour) -> web.Response:
        spec = await self._read_job(request, flavour)
        self._check_allowed(spec)
        await self._check_capacity(spec)
        await self._probe(spec)
        await self._publish(spec)

        return web.json_response(
            {"jobid": spec.job_id, "status": JobStatus.AWAITING_PROCESSING.value}
        )

    async def _read_job(self, request: web.Request, flavour: Flavour) -> JobSpec:
        if not is_json_content_type(request.content_type):
            raise RequestRejected(NOT_JSON)
        limit = self.settings.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            # Refuse before reading; read() enforces the same limit otherwise.
            raise web.HTTPRequestEntityTooLarge(
                max_size=limit, actual_size=request.content_length
            )
        body = await request.read()
        log.debug("job.received flavour=%s bytes=%d", flavour.value, len(body))

        return parse_job(flavour, decode_body(body))

    def _check_allowed(self, spec: JobSpec) -> None:
        """Refuse Moodle sites not on the allow-list, before any outbound call.

        Every URL the worker will call (web service, upload, backups) must lie
        below the allowed site, or the list would not stop requests elsewhere.
        """
        allowed = {url.rstrip("/") for url in self.settings.moodle_allowlist}
        if not allowed:
            return
        base = spec.moodle.base_url
        urls = [spec.moodle.ws_url, spec.moodle.upload_url]
        urls += [backup.download_url for backup in spec.backups]
        if base not in allowed or not all(u.startswith(base + "/") for u in urls):
            raise RequestRejected(
                f'Moodle at "{base}" is not allowed to use this worker.', status=403
            )

    async def _check_capacity(self, spec: JobSpec) -> None:
        """Contract 1.7 step 5: answer 429 before probing when the queue is full.

        A resubmission of a job still in the queue is let through: JetStream
        recognises it as a duplicate and it takes no room.  Its newest status
        event tells (one lookup, instead of reading every queued job); should
        it have left the queue meanwhile, the stream refuses the publish and
        the answer is 429 all the same.
        """
        if await self.broker.queue_depth() < self.settings.queue_size:
            return
        event = await self.broker.last_event(spec.job_id)
        if event is not None and not event.status.is_terminal:
            return
        raise self._queue_full()

    async def _probe(self, spec: JobSpec) -> None:
        assert self._session is not None, "the app's startup opens the session"
        if not await probe_moodle(
            self._session, spec.moodle, spec.flavour, self.settings
        ):
            raise RequestRejected(probe_failed_message(spec.moodle))

    async def _publish(self, spec: JobSpec) -> None:
        _, msg_id = job_identity(spec.flavour, spec.moodle.base_url, spec.moodle.token)
        headers: dict[str, str] = {}
        self.telemetry.inject(headers)
        try:
            is_new = await self.broker.publish_job(spec, msg_id=msg_id, headers=headers)
        except QueueFull:
            # Another bridge (or request) took the last place after our check.
            raise self._queue_full() from None
        if not is_new:
            log.info(
                "job.duplicate job_id=%s flavour=%s", spec.job_id, spec.flavour.value
            )
            return
        await self._publish_queued_event(spec)
        log.info(
            "job.accepted job_id=%s flavour=%s base_url=%s",
            spec.job_id,
            spec.flavour.value,
            spec.moodle.base_url,
        )

    async def _publish_queued_event(self, spec: JobSpec) -> None:
        event = StatusEvent(
            job_id=spec.job_id,
            flavour=spec.flavour.value,
            status=JobStatus.AWAITING_PROCESSING,
            stage=Stage.QUEUED,
            moodle=spec.moodle_ref(),
        )
        try:
            await self.broker.publish_event(event, only_if_first=True)
        except BrokerError as exc:
            # The job is queued, so Moodle must get its id: failing the POST
            # now would leave a job running that Moodle never recorded.
            log.warning("job.event_failed job_id=%s error=%s", spec.job_id, exc)

    def _queue_full(self) -> RequestRejected:
        return RequestRejected(
            QUEUE_FULL, status=429, retry_after_s=self.settings.retry_after_s
        )


def _canonical_uuid(text: str) -> str | None:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None
