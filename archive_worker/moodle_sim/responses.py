"""How Moodle's scripts answer: PHP's JSON encoding and the two error shapes.

The REST server answers framework errors with ``exception``, ``errorcode``
and ``message`` (plus ``debuginfo`` with developer debugging); scripts that
run as AJAX scripts (``pluginfile.php``, ``upload.php``) with ``error``,
``errorcode``, ``stacktrace``, ``debuginfo`` and ``reproductionlink``.
Both come with HTTP 200 unless the script sent a status header first.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def php_json(data: object) -> str:
    """Encode like PHP's ``json_encode``: compact, ASCII, ``/`` escaped.

    Replacing every ``/`` is safe because it only ever occurs inside strings.
    """
    return json.dumps(data, separators=(",", ":")).replace("/", "\\/")


def json_response(data: object, *, suffix: str = "") -> web.Response:
    """A JSON answer; ``suffix`` is appended verbatim (Moodle 4.3's quirk)."""
    return web.Response(text=php_json(data) + suffix, content_type="application/json")


def rest_error(
    errorcode: str,
    message: str,
    *,
    exception: str = "moodle_exception",
    debuginfo: str | None = None,
) -> web.Response:
    """The REST server's error object (contract 2.1.2)."""
    data: dict[str, Any] = {
        "exception": exception,
        "errorcode": errorcode,
        "message": message,
    }
    if debuginfo:
        data["debuginfo"] = debuginfo

    return json_response(data)


def ajax_error_object(errorcode: str, message: str) -> dict[str, Any]:
    """Moodle's error object for AJAX scripts (debug details off)."""
    return {
        "error": message,
        "errorcode": errorcode,
        "stacktrace": None,
        "debuginfo": None,
        "reproductionlink": None,
    }


def ajax_error(errorcode: str, message: str, *, status: int = 200) -> web.Response:
    """An AJAX script's error answer."""
    return web.Response(
        text=php_json(ajax_error_object(errorcode, message)),
        status=status,
        content_type="application/json",
    )
