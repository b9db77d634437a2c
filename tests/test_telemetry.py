"""Telemetry: one trace from the bridge's request to the worker's upload.

A tiny OTLP/HTTP receiver on loopback collects what the exporter sends; the
whole stack (real NATS, bridge, worker with Chromium, Moodle simulator) runs
one job with that telemetry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from archive_worker.config import Settings
from archive_worker.devstack import dev_stack
from archive_worker.embedded import EmbeddedNats
from archive_worker.jobs import JobStatus
from archive_worker.moodle_sim import MoodleSimulator
from archive_worker.moodle_sim.scenario import reference_quiz
from archive_worker.telemetry import Telemetry, setup_telemetry
from tests.conftest import SECRET_TOKEN


class Receiver:
    """Collects the spans posted to ``/v1/traces`` as (name, trace id, attrs)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, dict[str, Any]]] = []

    async def traces(self, request: web.Request) -> web.Response:
        """Decode one OTLP export request."""
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attrs = {a.key: str(a.value) for a in span.attributes}
                    self.spans.append((span.name, span.trace_id.hex(), attrs))
        return web.Response(content_type="application/x-protobuf")

    async def metrics(self, request: web.Request) -> web.Response:
        """Accept (and ignore) one OTLP metrics export."""
        await request.read()
        return web.Response(content_type="application/x-protobuf")


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    """The OTLP receiver and its base URL."""
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", rx.traces)
    app.router.add_post("/v1/metrics", rx.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield rx, f"http://127.0.0.1:{port}"
    await runner.cleanup()


class TestSetup:
    def test_nothing_configured(self, make_settings: Callable[..., Settings]) -> None:
        """Without OTEL_* and metrics_port nothing is exported or served."""
        telemetry = setup_telemetry(make_settings(), role="worker", environ={})
        assert telemetry.prometheus is None
        assert not telemetry.metrics_enabled
        assert telemetry.prometheus_text() == b""

    def test_disabled_sdk(self, make_settings: Callable[..., Settings]) -> None:
        """OTEL_SDK_DISABLED=true turns everything off, metrics port too."""
        env = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}
        telemetry = setup_telemetry(
            make_settings(metrics_port=0), role="w", environ=env
        )
        assert telemetry.prometheus is None

    def test_traceparent_round_trip(self) -> None:
        """A context injected into headers is extracted with the same trace id."""
        from opentelemetry.sdk.trace import TracerProvider

        telemetry = Telemetry(TracerProvider())
        headers: dict[str, str] = {}
        with telemetry.tracer.start_as_current_span("x") as span:
            telemetry.inject(headers)
        ctx = telemetry.extract({"Traceparent": headers["traceparent"]})
        from opentelemetry import trace

        assert trace.get_current_span(ctx).get_span_context().trace_id == (
            span.get_span_context().trace_id
        )


@pytest.mark.browser
@pytest.mark.slow
async def test_one_trace_bridge_to_worker(
    receiver: tuple[Receiver, str],
    nats_server: EmbeddedNats,
    make_settings: Callable[..., Settings],
    moodle: MoodleSimulator,
) -> None:
    """Bridge and worker spans share one trace id, which the events carry."""
    rx, url = receiver
    settings = make_settings(nats_url=nats_server.url, metrics_port=0)
    telemetry = setup_telemetry(
        settings, role="bridge+worker", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": url}
    )
    port = await telemetry.serve_metrics(host="127.0.0.1")
    try:
        job, body = reference_quiz(moodle, attempt_ids=[24], backups=False)
        async with dev_stack(settings, moodle=moodle, telemetry=telemetry) as stack:
            job_id = await stack.submit("quiz_archiver", body)
            end = await stack.wait_for_end(job_id)
            # The worker counts the job after its ack; stopping it settles that.
            await stack.stop_worker()
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    metrics = await resp.text()
                async with http.get(stack.bridge_url + "/metrics") as resp:
                    assert resp.status == 200
    finally:
        await telemetry.shutdown()

    assert end.status is JobStatus.FINISHED
    assert job.state == "FINISHED"
    by_name = {name: trace_id for name, trace_id, _ in rx.spans}
    for name in ("http.archive", "job.queued", "job.run", "job.report", "job.render"):
        assert name in by_name, sorted(by_name)
    assert {"job.pack", "job.upload", "moodle.call"} <= set(by_name)
    trace_ids = {trace_id for _, trace_id, _ in rx.spans}
    assert trace_ids == {end.trace_id}
    calls = [attrs for name, _, attrs in rx.spans if name == "moodle.call"]
    assert any(
        "quiz_archiver_generate_attempt_report" in a["wsfunction"] for a in calls
    )
    for _, _, attrs in rx.spans:
        assert all(SECRET_TOKEN not in value for value in attrs.values())
    assert "archive_jobs_total" in metrics
    assert "archive_stage_duration" in metrics
    assert "archive_browser_restarts" in metrics
