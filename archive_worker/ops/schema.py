"""The published contract of the status events: JSON Schema and AsyncAPI.

Both documents are generated from the msgspec types, shipped in
``archive_worker/schemas/`` and printed by ``archive-worker schema``.  A test
compares the shipped files with what this module generates, so a change to
an event type cannot go out without regenerating them; a change that breaks
subscribers must also bump :data:`~archive_worker.events.STATUS_EVENT_SCHEMA`
(``archive.status.v1`` -> ``v2``), which renames the schema file.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from archive_worker import constants as c
from archive_worker.events import STATUS_EVENT_SCHEMA, StatusEvent

from .model import WorkerSnapshot

#: File names of the shipped documents.
STATUS_SCHEMA_FILE = f"{STATUS_EVENT_SCHEMA}.schema.json"
ASYNCAPI_FILE = "asyncapi.json"
#: Version of the AsyncAPI document: its major follows the event schema's
#: (``v1``), so that it does not change with every release of the package.
CONTRACT_VERSION = "1.0.0"


def status_event_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of :class:`StatusEvent`, with its version pinned."""
    schema: dict[str, Any] = msgspec.json.schema(StatusEvent)
    event = schema["$defs"]["StatusEvent"]
    event["properties"]["schema"] = {
        "const": STATUS_EVENT_SCHEMA,
        "default": STATUS_EVENT_SCHEMA,
    }
    event["required"] = sorted({*event.get("required", []), "schema"})

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:moodle-archive-worker:{STATUS_EVENT_SCHEMA}",
        "title": "Archive job status event",
        **schema,
    }


def asyncapi() -> dict[str, Any]:
    """AsyncAPI 3.0 description of the subjects other services may use."""
    _, components = msgspec.json.schema_components(
        (StatusEvent, WorkerSnapshot), ref_template="#/components/schemas/{name}"
    )
    components["StatusEvent"]["properties"]["schema"] = {"const": STATUS_EVENT_SCHEMA}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "moodle-archive-worker events",
            "version": CONTRACT_VERSION,
            "description": (
                "Status events of archive jobs on NATS JetStream (stream "
                f"{c.STATUS_STREAM}), and the workers' registry. Events are JSON; "
                "fields may be added within a schema version, anything that "
                "breaks subscribers gets a new version."
            ),
        },
        "defaultContentType": "application/json",
        "channels": {
            "jobStatus": {
                "address": f"{c.STATUS_SUBJECT_PREFIX}.{{jobId}}",
                "description": (
                    "Every status change and progress step of one job; "
                    f"stored in {c.STATUS_STREAM}."
                ),
                "parameters": {
                    "jobId": {
                        "description": (
                            "The job id the bridge returned to Moodle (a UUID)."
                        )
                    }
                },
                "messages": {
                    "statusEvent": {"$ref": "#/components/messages/StatusEvent"}
                },
            },
            "workerStats": {
                "address": f"{c.CONTROL_SUBJECT_PREFIX}.workers.{{workerId}}",
                "description": (
                    "Request/reply: a worker's registry entry "
                    f"(also in $SRV.STATS.{c.MICRO_SERVICE_NAME})."
                ),
                "parameters": {
                    "workerId": {
                        "description": (
                            "Worker id with characters other than A-Z, a-z, "
                            "0-9, _ and - replaced by _."
                        )
                    }
                },
                "messages": {
                    "workerSnapshot": {"$ref": "#/components/messages/WorkerSnapshot"}
                },
            },
        },
        "operations": {
            "receiveJobStatus": {
                "action": "receive",
                "channel": {"$ref": "#/channels/jobStatus"},
                "summary": (
                    f"Subscribe to {c.STATUS_SUBJECTS} (core NATS or a "
                    f"JetStream consumer on {c.STATUS_STREAM})."
                ),
            },
            "requestWorkerStats": {
                "action": "send",
                "channel": {"$ref": "#/channels/workerStats"},
                "reply": {"channel": {"$ref": "#/channels/workerStats"}},
            },
        },
        "components": {
            "messages": {
                "StatusEvent": {
                    "name": STATUS_EVENT_SCHEMA,
                    "payload": {"$ref": "#/components/schemas/StatusEvent"},
                },
                "WorkerSnapshot": {
                    "name": "archive.worker.v1",
                    "payload": {"$ref": "#/components/schemas/WorkerSnapshot"},
                },
            },
            "schemas": components,
        },
    }


def dump(document: dict[str, Any]) -> str:
    """The canonical text of a document (what the shipped files contain)."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def generated() -> dict[str, str]:
    """File name -> text of every document, as the code defines them now."""
    return {
        STATUS_SCHEMA_FILE: dump(status_event_schema()),
        ASYNCAPI_FILE: dump(asyncapi()),
    }


def shipped() -> dict[str, str]:
    """File name -> text of the documents shipped with the package."""
    folder = resources.files("archive_worker") / "schemas"
    return {
        name: (folder / name).read_text(encoding="utf-8")
        for name in generated()
        if (folder / name).is_file()
    }


def write(folder: Path) -> list[Path]:
    """Write every document into ``folder`` (regeneration for developers)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in generated().items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)

    return paths
