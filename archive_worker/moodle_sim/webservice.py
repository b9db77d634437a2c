"""``/webservice/rest/server.php``: Moodle's REST server in front of the functions.

The order of checks follows Moodle: output format, token, function in the
token's service, parameter validation (PHP decoding included), then the
plugin's own checks in :mod:`.functions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from .functions import FUNCTIONS, Call
from .model import RecordedCall
from .params import InvalidParameter, decode_php, plain
from .params import validate as validate_params
from .responses import json_response, rest_error

if TYPE_CHECKING:
    from .server import MoodleSimulator

#: Parameters the REST server consumes itself (never function parameters).
_TRANSPORT_PARAMS: Final = ("wstoken", "wsfunction", "moodlewsrestformat")


async def handle(sim: MoodleSimulator, request: web.Request) -> web.StreamResponse:
    """Answer one REST request as Moodle would."""
    pairs = list(request.query.items())
    if request.method == "POST":
        pairs += [
            (k, v) for k, v in (await request.post()).items() if isinstance(v, str)
        ]
    decoded = decode_php(pairs)
    transport = {key: decoded.pop(key, None) for key in _TRANSPORT_PARAMS}
    wsfunction = transport["wsfunction"]
    sim.record(
        RecordedCall(
            method=request.method,
            path=request.path,
            wsfunction=wsfunction if isinstance(wsfunction, str) else None,
            params={
                **{key: plain(value) for key, value in decoded.items()},
                "moodlewsrestformat": transport["moodlewsrestformat"],
            },
            raw=[(k, v) for k, v in pairs if k != "wstoken"],
        )
    )
    faulted = await sim.apply_fault(wsfunction if isinstance(wsfunction, str) else None)
    if faulted is not None:
        return faulted
    if transport["moodlewsrestformat"] != "json":
        return web.Response(
            text="<?xml version='1.0' encoding='UTF-8' ?>\n<EXCEPTION/>",
            content_type="application/xml",
        )

    return await _dispatch(sim, request, transport, decoded)


async def _dispatch(
    sim: MoodleSimulator,
    request: web.Request,
    transport: Mapping[str, Any],
    decoded: dict[str, Any],
) -> web.StreamResponse:
    job = sim.job_for_token(transport["wstoken"])
    if job is None:
        return rest_error("invalidtoken", "Invalid token - token not found")
    wsfunction = transport["wsfunction"]
    entry = FUNCTIONS.get(wsfunction) if isinstance(wsfunction, str) else None
    if entry is None:
        return rest_error(
            "invalidrecord",
            "Can't find data record in database table external_functions.",
            exception="dml_missing_record_exception",
        )
    flavour, handler, signature = entry
    if flavour != job.flavour:
        return rest_error(
            "accessexception",
            "Access control exception",
            exception="webservice_access_exception",
        )
    try:
        params = validate_params(signature(job), decoded)
    except InvalidParameter as exc:
        return rest_error(
            "invalidparameter",
            "Invalid parameter value detected",
            exception="invalid_parameter_exception",
            debuginfo=str(exc) if sim.debug else None,
        )
    answer = await handler(Call(sim, job, request, wsfunction, params))
    if isinstance(answer, web.StreamResponse):
        return answer

    return json_response(answer)
