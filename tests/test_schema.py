"""The published event contract: shipped schema files match the code."""

from __future__ import annotations

import json

import jsonschema
import msgspec
from typer.testing import CliRunner

from archive_worker.cli import app
from archive_worker.events import (
    STATUS_EVENT_SCHEMA,
    StatusEvent,
    decode_event,
    encode_event,
)
from archive_worker.jobs import JobStatus, MoodleRef
from archive_worker.ops import schema


class TestShippedDocuments:
    def test_shipped_files_are_current(self) -> None:
        """The files in archive_worker/schemas equal what the types generate.

        If this fails, run ``archive-worker schema --write archive_worker/schemas``
        and, if the change breaks subscribers, bump STATUS_EVENT_SCHEMA first.
        """
        assert schema.shipped() == schema.generated()

    def test_schema_version_is_in_every_event(self) -> None:
        """Even with defaults omitted, an encoded event names its version."""
        event = StatusEvent(
            job_id="j", flavour="quiz_archiver", status=JobStatus.RUNNING
        )
        data = json.loads(encode_event(event))
        assert data["schema"] == STATUS_EVENT_SCHEMA
        assert STATUS_EVENT_SCHEMA in schema.STATUS_SCHEMA_FILE

    def test_events_validate_against_the_schema(self) -> None:
        """A full event validates against the shipped JSON Schema."""
        doc = json.loads(schema.shipped()[schema.STATUS_SCHEMA_FILE])
        event = StatusEvent(
            job_id="j",
            flavour="archivingmod_quiz",
            status=JobStatus.FAILED,
            progress=50,
            stage="render",
            item=24,
            error_code="render_failed",
            error="[stage render, item 24] boom",
            moodle=MoodleRef(base_url="https://moodle.example", taskid=7),
        )
        jsonschema.validate(json.loads(encode_event(event)), doc)

    def test_other_versions_are_refused(self) -> None:
        """A subscriber on v1 refuses an event of another version."""
        data = b'{"schema":"archive.status.v2","job_id":"j","flavour":"x","status":"RUNNING"}'
        try:
            decode_event(data)
        except msgspec.ValidationError:
            return
        raise AssertionError("a v2 event decoded as v1")

    def test_asyncapi_names_the_subjects(self) -> None:
        """The AsyncAPI document describes the status subject."""
        doc = json.loads(schema.shipped()[schema.ASYNCAPI_FILE])
        assert doc["channels"]["jobStatus"]["address"] == "archive.status.{jobId}"
        assert "StatusEvent" in doc["components"]["schemas"]


class TestCommand:
    def test_prints_schema_and_asyncapi(self) -> None:
        """archive-worker schema prints the JSON Schema, --asyncapi the other."""
        runner = CliRunner()
        printed = json.loads(runner.invoke(app, ["schema"]).stdout)
        assert printed["$id"].endswith(STATUS_EVENT_SCHEMA)
        asyncapi = json.loads(runner.invoke(app, ["schema", "--asyncapi"]).stdout)
        assert asyncapi["asyncapi"].startswith("3.")
