"""OpenTelemetry: traces from Moodle's request to the upload, metrics, export.

One :class:`Telemetry` per process, made by :func:`setup_telemetry` and held
by the roles; :meth:`Telemetry.shutdown` flushes and stops it.  Nothing here
touches OpenTelemetry's global providers, so processes (and tests) that set
up telemetry twice do not leak into each other.

What is exported, and where, follows the standard ``OTEL_*`` variables plus
one setting:

* **Traces** go to an OTLP/HTTP collector when ``OTEL_TRACES_EXPORTER`` says
  ``otlp``, or when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (and the exporter is not
  ``none``).  Spans are still made without an exporter, so that every job has
  a trace id in its logs and status events.
* **Metrics** go to OTLP likewise (``OTEL_METRICS_EXPORTER``,
  ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``), and are served for Prometheus on
  ``/metrics`` of ``metrics_port`` when that setting is set (the bridge also
  serves them on its own port).
* Neither configured: nothing leaves the process.  ``OTEL_SDK_DISABLED=true``
  turns everything off.

Code deep in a job (the pipeline, the Moodle client) reaches the process's
telemetry through a context variable that the worker sets per job
(:func:`use`), and opens spans with :func:`span` or :func:`stage_span`; with
no telemetry bound they do nothing.  Span names are the stage names of
:class:`~archive_worker.events.Stage` as ``job.<stage>``, plus ``job.run``,
``http.archive`` and ``moodle.call``.  No attribute ever holds a token or a
URL with its query.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import __version__
from . import constants as c
from .config import Settings
from .errors import ArchiveWorkerError

log = logging.getLogger(__name__)

#: Instrumentation scope of every span and instrument.
SCOPE = "archive_worker"
#: Histogram buckets for stage durations in seconds: a report renders in
#: about a second, a whole backup download may take many minutes.
STAGE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
#: How often a role reads the queue depth for the gauge; Prometheus scrapes
#: every 15 to 60 s, so fresher values would never be seen.
QUEUE_POLL_S = 15.0

_propagator = TraceContextTextMapPropagator()
_current: contextvars.ContextVar[Telemetry | None] = contextvars.ContextVar(
    "archive_telemetry", default=None
)


def _enabled(env: Mapping[str, str], signal: str) -> bool:
    """Whether OTLP export of ``signal`` (traces, metrics) is configured."""
    chosen = env.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if chosen:
        return "otlp" in chosen.split(",")
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


def _endpoint(env: Mapping[str, str], signal: str) -> str | None:
    """The OTLP/HTTP URL of ``signal``, as the OTLP specification derives it."""
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base:
        return base.rstrip("/") + f"/v1/{signal}"
    return None  # the exporter's own default (localhost:4318)


class Telemetry:
    """The process's tracer, meter, instruments and exporters.

    Args:
        tracer_provider: an SDK provider, or None for no tracing at all.
        meter_provider: an SDK provider, or None for no metrics at all.
        prometheus: the registry Prometheus scrapes, if enabled.
        metrics_port: where :meth:`serve_metrics` listens.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        prometheus: CollectorRegistry | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self.prometheus = prometheus
        self.metrics_port = metrics_port
        self.tracer: Tracer = (
            tracer_provider.get_tracer(SCOPE, __version__)
            if tracer_provider is not None
            else trace.NoOpTracer()
        )
        self.meter: Meter = (meter_provider or NoOpMeterProvider()).get_meter(
            SCOPE, __version__
        )
        self._jobs = self.meter.create_counter(
            "archive.jobs", unit="{job}", description="Jobs ended, by outcome"
        )
        self._stage = self.meter.create_histogram(
            "archive.stage.duration",
            unit="s",
            description="Duration of pipeline stages",
            explicit_bucket_boundaries_advisory=STAGE_BUCKETS_S,
        )
        self._runner: web.AppRunner | None = None
        #: Newest queue depth seen (set by whoever reads the queue).
        self.queue_depth: int | None = None
        self.meter.create_observable_gauge(
            "archive.queue.depth",
            callbacks=[self._observe_queue_depth],
            unit="{job}",
            description="Unfinished jobs in the jobs stream",
        )

    @classmethod
    def disabled(cls) -> Telemetry:
        """Telemetry that records nothing (the default of library code)."""
        return cls()

    # --- traces ------------------------------------------------------------------

    def inject(self, headers: dict[str, str]) -> None:
        """Write the current trace context into message headers."""
        _propagator.inject(headers)

    def extract(self, headers: Mapping[str, str]) -> otel_context.Context:
        """The trace context carried in message or HTTP headers."""
        carrier = {k.lower(): v for k, v in headers.items()}
        wanted = {c.TRACEPARENT_HEADER, c.TRACESTATE_HEADER}

        return _propagator.extract({k: v for k, v in carrier.items() if k in wanted})

    # --- metrics -----------------------------------------------------------------

    def job_ended(self, outcome: str, flavour: str) -> None:
        """Count one job by how it ended (finished, failed, retried, ...)."""
        self._jobs.add(1, {"outcome": outcome.lower(), "flavour": flavour})

    def stage_done(self, stage: str, duration_s: float) -> None:
        """Record how long one stage took."""
        self._stage.record(duration_s, {"stage": stage})

    def observe(
        self,
        name: str,
        read: Callable[[], float],
        *,
        unit: str,
        description: str,
        counter: bool = False,
    ) -> None:
        """Publish ``read()`` as a gauge (or a monotonic counter) at each export."""

        def callback(_: CallbackOptions) -> list[Observation]:
            return [Observation(read())]

        if counter:
            self.meter.create_observable_counter(
                name, callbacks=[callback], unit=unit, description=description
            )
        else:
            self.meter.create_observable_gauge(
                name, callbacks=[callback], unit=unit, description=description
            )

    def _observe_queue_depth(self, _: CallbackOptions) -> list[Observation]:
        if self.queue_depth is None:
            return []
        return [Observation(self.queue_depth)]

    @property
    def metrics_enabled(self) -> bool:
        """True when some reader collects metrics (worth polling for)."""
        return self._meter_provider is not None

    def prometheus_text(self) -> bytes:
        """The Prometheus exposition of every metric (empty when disabled)."""
        if self.prometheus is None:
            return b""
        return generate_latest(self.prometheus)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        """aiohttp handler for ``GET /metrics``."""
        if self.prometheus is None:
            raise web.HTTPNotFound()
        return web.Response(
            body=self.prometheus_text(),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def serve_metrics(self, host: str = "0.0.0.0") -> int | None:
        """Serve ``/metrics`` on ``metrics_port``; returns the bound port.

        Does nothing (and returns None) when Prometheus is not enabled.
        """
        if self.prometheus is None or self.metrics_port is None or self._runner:
            return None
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, self.metrics_port)
        await site.start()
        port = _bound_port(self._runner)
        log.info("metrics.listening port=%d", port)

        return port

    async def shutdown(self) -> None:
        """Stop the metrics server, flush spans and metrics, release exporters."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # Flushing exports over blocking HTTP: keep it off the event loop,
        # which may be serving the very collector (or metrics) it talks to.
        if self._tracer_provider is not None:
            await asyncio.to_thread(self._tracer_provider.shutdown)
        if self._meter_provider is not None:
            await asyncio.to_thread(self._meter_provider.shutdown)


async def poll_queue_depth(
    telemetry: Telemetry, read: Callable[[], Awaitable[int]], *, interval_s: float
) -> None:
    """Keep :attr:`Telemetry.queue_depth` fresh until cancelled.

    Metric callbacks cannot await, so the depth is read here and the gauge
    reports the newest value.  Read errors are logged at DEBUG and retried.
    """
    while True:
        try:
            telemetry.queue_depth = await read()
        except ArchiveWorkerError as exc:
            log.debug("metrics.queue_depth_failed error=%s", exc)
        await asyncio.sleep(interval_s)


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("metrics server is not listening on a TCP port")


def setup_telemetry(
    settings: Settings,
    *,
    role: str,
    environ: Mapping[str, str] | None = None,
    instance_id: str | None = None,
) -> Telemetry:
    """Build the process's telemetry from ``settings`` and ``OTEL_*``.

    Args:
        settings: ``metrics_port`` enables the Prometheus endpoint.
        role: ``bridge``, ``worker`` or ``bridge+worker``; a resource attribute.
        environ: the environment (``os.environ`` by default).
        instance_id: ``service.instance.id`` (the worker id, for example).

    Returns:
        Telemetry that the caller must :meth:`~Telemetry.shutdown`.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Telemetry.disabled()
    attributes: dict[str, Any] = {
        "service.name": env.get("OTEL_SERVICE_NAME") or c.APP_NAME,
        "service.version": __version__,
        "archive_worker.role": role,
    }
    if instance_id:
        attributes["service.instance.id"] = instance_id
    resource = Resource.create(attributes)

    tracer_provider = TracerProvider(resource=resource)
    if _enabled(env, "traces"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        endpoint = _endpoint(env, "traces")
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
        )
        log.info("telemetry.traces exporter=otlp endpoint=%s", endpoint or "default")

    readers: list[MetricReader] = []
    registry: CollectorRegistry | None = None
    if settings.metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        registry = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=registry))
    if _enabled(env, "metrics"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter,
        )

        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=_endpoint(env, "metrics"))
            )
        )
    meter_provider = (
        MeterProvider(resource=resource, metric_readers=readers) if readers else None
    )

    return Telemetry(
        tracer_provider,
        meter_provider,
        prometheus=registry,
        metrics_port=settings.metrics_port,
    )


# --- per-job access ------------------------------------------------------------------


def current() -> Telemetry | None:
    """The telemetry bound to this task by :func:`use`, if any."""
    return _current.get()


@contextlib.contextmanager
def use(telemetry: Telemetry) -> Iterator[None]:
    """Bind ``telemetry`` for :func:`span` and :func:`stage_span` in this task."""
    token = _current.set(telemetry)
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def job_trace(
    telemetry: Telemetry,
    headers: Mapping[str, str],
    *,
    queued_at: float,
    delivery: int,
    **attributes: Any,
) -> Iterator[str | None]:
    """Continue a job's trace in the worker; yields its trace id (hex).

    The context comes from the message headers the bridge wrote.  On the
    first delivery a ``job.queued`` span covers the wait in the queue (from
    the message's stream timestamp to now); then ``job.run`` is the current
    span for everything the worker does, with ``telemetry`` bound for
    :func:`span` and :func:`stage_span`.
    """
    parent = telemetry.extract(headers)
    attrs = _attrs({**attributes, "messaging.delivery": delivery})
    with use(telemetry):
        if delivery == 1 and queued_at > 0:
            waited = telemetry.tracer.start_span(
                "job.queued",
                context=parent,
                kind=SpanKind.CONSUMER,
                attributes=attrs,
                start_time=int(queued_at * 1e9),
            )
            waited.end()
            telemetry.stage_done("queued", max(0.0, time.time() - queued_at))
        with telemetry.tracer.start_as_current_span(
            "job.run", context=parent, kind=SpanKind.CONSUMER, attributes=attrs
        ) as run:
            yield trace_id_of(run)


def _attrs(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}


@contextlib.contextmanager
def span(
    name: str, *, kind: SpanKind = SpanKind.INTERNAL, **attributes: Any
) -> Iterator[Span]:
    """A span under the current one; errors mark it failed and propagate."""
    telemetry = _current.get()
    tracer = telemetry.tracer if telemetry is not None else trace.NoOpTracer()
    with tracer.start_as_current_span(
        name, kind=kind, attributes=_attrs(attributes), record_exception=True
    ) as current_span:
        yield current_span


@contextlib.contextmanager
def stage_span(stage: str, **attributes: Any) -> Iterator[Span]:
    """A ``job.<stage>`` span whose duration also goes to the stage histogram."""
    started = time.monotonic()
    try:
        with span(f"job.{stage}", stage=stage, **attributes) as current_span:
            yield current_span
    finally:
        telemetry = _current.get()
        if telemetry is not None:
            telemetry.stage_done(stage, time.monotonic() - started)


def trace_id_of(span_: Span) -> str | None:
    """The hex trace id of a span, or None when it is not recording."""
    ctx = span_.get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x")


def mark_error(span_: Span, message: str) -> None:
    """Set a span's status to error with a (token-free) description."""
    span_.set_status(Status(StatusCode.ERROR, message))
