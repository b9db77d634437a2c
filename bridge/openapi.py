"""The OpenAPI 3 description of the bridge, served at ``GET /openapi.json``.

Kept as Python data so that it is type-checked with the code and needs no
package data.  It describes the contract's API (section 1) and what we added
(health, readiness, this document); the request bodies mirror contract 1.8
to 1.10 with the decisions of :mod:`bridge.requests`.
"""

from __future__ import annotations

from typing import Any

from archive_worker import __version__
from archive_worker.jobs import PAPER_FORMATS

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response = _json(_ref("Error"), description)
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "schema": {"type": "integer"},
            }
        }
    return response


_STRING = {"type": "string"}
_BOOL = {"type": "boolean"}
_POSITIVE_INT = {"type": "integer", "minimum": 1}
_FLAG = {
    "oneOf": [
        _BOOL,
        {"type": "integer", "enum": [0, 1]},
        {"type": "string", "enum": ["0", "1"]},
    ]
}

_IMAGE_OPTIMIZE = {
    "description": "false, or how to shrink images in the PDFs.",
    "oneOf": [
        {"type": "boolean", "enum": [False]},
        {"type": "null"},
        {
            "type": "object",
            "required": ["width", "height", "quality"],
            "properties": {
                "width": _POSITIVE_INT,
                "height": _POSITIVE_INT,
                "quality": {"type": "integer", "minimum": 0, "maximum": 100},
            },
        },
    ],
}

_PAPER_FORMAT = {
    "type": "string",
    "description": (
        "Case-insensitive; both Moodle's (Letter) and the old worker's "
        "(LETTER) spelling."
    ),
    "enum": list(PAPER_FORMATS),
}

_ARCHIVE_FILENAME = {
    "type": "string",
    "minLength": 1,
    "description": 'ZIP name without extension; none of \\0 \\ / : * ? " < > | .',
}

_MOODLE_API = {
    "type": "object",
    "required": ["wstoken", "base_url", "webservice_url", "upload_url"],
    "properties": {
        "wstoken": _STRING,
        "base_url": {"type": "string", "format": "uri"},
        "webservice_url": {
            "type": "string",
            "format": "uri",
            "pattern": "/webservice/rest/server\\.php$",
        },
        "upload_url": {
            "type": "string",
            "format": "uri",
            "pattern": "/webservice/upload\\.php$",
        },
        "max_upload_bytes": {"type": "integer", "minimum": 0},
    },
}

_COMMON_JOB = {
    "archive_filename": _ARCHIVE_FILENAME,
    "paper_format": _PAPER_FORMAT,
    "keep_html_files": _BOOL,
    "fetch_metadata": _BOOL,
    "foldername_pattern": {"type": "string", "minLength": 1},
    "filename_pattern": {"type": "string", "minLength": 1},
    "image_optimize": _IMAGE_OPTIMIZE,
    "archive_flatten": _BOOL,
    "archive_filehashes": _BOOL,
}

_QUIZ_ARCHIVER_REQUEST = {
    "type": "object",
    "description": "quiz_archiver, API version 7 (contract 1.8).",
    "required": [
        "api_version",
        "moodle_base_url",
        "moodle_ws_url",
        "moodle_upload_url",
        "wstoken",
        "courseid",
        "cmid",
        "quizid",
        "archive_filename",
        "task_archive_quiz_attempts",
        "task_moodle_backups",
    ],
    "properties": {
        "api_version": {"type": "integer", "enum": [7]},
        "moodle_base_url": {"type": "string", "format": "uri"},
        "moodle_ws_url": {"type": "string", "format": "uri"},
        "moodle_upload_url": {"type": "string", "format": "uri"},
        "moodle_max_upload_bytes": {"type": "integer", "minimum": 0},
        "wstoken": _STRING,
        "courseid": _POSITIVE_INT,
        "cmid": _POSITIVE_INT,
        "quizid": _POSITIVE_INT,
        "archive_filename": _ARCHIVE_FILENAME,
        "archive_flatten": _BOOL,
        "archive_filehashes": _BOOL,
        "task_archive_quiz_attempts": {
            "oneOf": [
                {"type": "null"},
                {"type": "boolean", "enum": [False]},
                {
                    "type": "object",
                    "required": [
                        "attemptids",
                        "fetch_metadata",
                        "sections",
                        "paper_format",
                        "keep_html_files",
                        "foldername_pattern",
                        "filename_pattern",
                        "image_optimize",
                    ],
                    "properties": {
                        "attemptids": {
                            "type": "array",
                            "minItems": 1,
                            "items": _POSITIVE_INT,
                        },
                        "sections": {
                            "type": "object",
                            "minProperties": 1,
                            "description": (
                                "Forwarded to Moodle unchanged; attachments are "
                                'fetched when sections.attachments is the string "1".'
                            ),
                            "additionalProperties": {
                                "oneOf": [_STRING, {"type": "integer"}, _BOOL]
                            },
                        },
                        **{
                            k: v
                            for k, v in _COMMON_JOB.items()
                            if k != "archive_filename"
                        },
                    },
                },
            ]
        },
        "task_moodle_backups": {
            "oneOf": [
                {"type": "null"},
                {"type": "boolean", "enum": [False]},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["backupid", "filename", "file_download_url"],
                        "properties": {
                            "backupid": {"type": "string", "minLength": 1},
                            "filename": {"type": "string", "minLength": 1},
                            "file_download_url": {
                                "type": "string",
                                "description": "Must lie below moodle_base_url.",
                            },
                        },
                    },
                },
            ]
        },
    },
}

_ARCHIVINGMOD_QUIZ_REQUEST = {
    "type": "object",
    "description": "archivingmod_quiz, API version 1 (contract 1.9).",
    "required": ["api_version", "taskid", "moodle_api", "job"],
    "properties": {
        "api_version": {"type": "integer", "enum": [1]},
        "taskid": _POSITIVE_INT,
        "moodle_api": _MOODLE_API,
        "job": {
            "type": "object",
            "required": [
                "attemptids",
                "report_sections",
                "paper_format",
                "archive_filename",
                "foldername_pattern",
                "filename_pattern",
                "image_optimize",
                "fetch_metadata",
                "fetch_attachments",
                "keep_html_files",
            ],
            "properties": {
                "attemptids": {"type": "array", "minItems": 1, "items": _POSITIVE_INT},
                "report_sections": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": {
                        "oneOf": [_STRING, {"type": "integer"}, _BOOL]
                    },
                },
                "fetch_attachments": _BOOL,
                **_COMMON_JOB,
            },
        },
    },
}

_ARCHIVINGMOD_ASSIGN_REQUEST = {
    "type": "object",
    "description": "archivingmod_assign, API version 1 (contract 1.10).",
    "required": ["api_version", "taskid", "moodle_api", "job"],
    "properties": {
        "api_version": {"type": "integer", "enum": [1]},
        "taskid": _POSITIVE_INT,
        "moodle_api": {
            **_MOODLE_API,
            "required": [*_MOODLE_API["required"], "max_upload_bytes"],
        },
        "job": {
            "type": "object",
            "description": "attachment_types may also be sent as attachments.",
            "required": [
                "submissionids",
                "report_sections",
                "attachment_types",
                "paper_format",
                "archive_filename",
                "archive_flatten",
                "archive_filehashes",
                "keep_html_files",
                "fetch_metadata",
                "foldername_pattern",
                "filename_pattern",
                "image_optimize",
            ],
            "properties": {
                "submissionids": {
                    "type": "array",
                    "minItems": 1,
                    "items": _POSITIVE_INT,
                },
                "report_sections": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": _FLAG,
                },
                "attachment_types": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": _FLAG,
                },
                "attachments": {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": _FLAG,
                },
                **_COMMON_JOB,
            },
        },
    },
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": _STRING},
    },
    "JobAccepted": {
        "type": "object",
        "required": ["jobid", "status"],
        "properties": {
            "jobid": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": ["AWAITING_PROCESSING"]},
        },
    },
    "WorkerStatus": {
        "type": "object",
        "required": [
            "status",
            "jobs_processing",
            "jobs_queued",
            "jobs_max",
            "queue_max",
            "queue_len",
        ],
        "properties": {
            "status": {
                "type": "string",
                "enum": ["IDLE", "ACTIVE", "BUSY", "UNAVAILABLE", "UNKNOWN"],
            },
            "jobs_processing": {
                "type": "array",
                "items": {"type": "string", "format": "uuid"},
            },
            "jobs_queued": {
                "type": "array",
                "items": {"type": "string", "format": "uuid"},
            },
            "jobs_max": {
                "type": "integer",
                "description": "Configured job slots per worker process.",
            },
            "queue_max": {
                "type": "integer",
                "description": "Unfinished jobs the queue accepts.",
            },
            "queue_len": {
                "type": "integer",
                "description": "Length of jobs_queued (pre-4.0 plugins).",
            },
        },
    },
    "JobStatus": {
        "type": "object",
        "required": ["id", "status"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "status": {
                "type": "string",
                "enum": [
                    "UNINITIALIZED",
                    "AWAITING_PROCESSING",
                    "RUNNING",
                    "WAITING_FOR_BACKUP",
                    "FINALIZING",
                    "FINISHED",
                    "FAILED",
                    "TIMEOUT",
                ],
            },
        },
    },
    "QuizArchiverRequest": _QUIZ_ARCHIVER_REQUEST,
    "ArchivingmodQuizRequest": _ARCHIVINGMOD_QUIZ_REQUEST,
    "ArchivingmodAssignRequest": _ARCHIVINGMOD_ASSIGN_REQUEST,
}


def _archive_operation(schema: str, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(schema)}},
            },
            "responses": {
                "200": _json(_ref("JobAccepted"), "Job queued (or already queued)."),
                "400": _error("Invalid request, or the Moodle probe failed."),
                "403": _error("Moodle site not on the allow-list."),
                "413": _error("Request body too large."),
                "429": _error("Queue full.", retry_after=True),
                "503": _error("Job queue not reachable.", retry_after=True),
            },
        }
    }


def _get(
    summary: str, schema: dict[str, Any], *, errors: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": _json(schema, "OK"), **(errors or {})},
        }
    }


_OBJECT = {"type": "object"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "moodle-archive-worker bridge",
        "version": __version__,
        "description": (
            "The existing archive worker's HTTP API (contract section 1), backed "
            "by NATS JetStream. When a secret path prefix is configured, every "
            "path below lives under /<prefix>."
        ),
    },
    "paths": {
        "/": _get("App name and version.", _OBJECT),
        "/version": _get("Version.", _OBJECT),
        "/status": _get(
            "Queue and worker load.",
            _ref("WorkerStatus"),
            errors={"503": _error("Job queue not reachable.", retry_after=True)},
        ),
        "/status/{jobid}": {
            **_get(
                "Status of one job.",
                _ref("JobStatus"),
                errors={
                    "404": _error("Unknown job id."),
                    "503": _error("Job queue not reachable.", retry_after=True),
                },
            ),
            "parameters": [
                {"name": "jobid", "in": "path", "required": True, "schema": _STRING}
            ],
        },
        "/archive": _archive_operation(
            "QuizArchiverRequest", "quiz_archiver job (legacy path)."
        ),
        "/archive/quiz_archiver": _archive_operation(
            "QuizArchiverRequest", "quiz_archiver job."
        ),
        "/archive/archivingmod_quiz": _archive_operation(
            "ArchivingmodQuizRequest", "archivingmod_quiz job."
        ),
        "/archive/archivingmod_assign": _archive_operation(
            "ArchivingmodAssignRequest", "archivingmod_assign job."
        ),
        "/healthz": _get("Liveness: the process answers.", _OBJECT),
        "/readyz": _get(
            "Readiness: connected to NATS and the streams exist.",
            _OBJECT,
            errors={"503": _error("Not ready.")},
        ),
        "/openapi.json": _get("This document.", _OBJECT),
    },
    "components": {"schemas": _SCHEMAS},
}
