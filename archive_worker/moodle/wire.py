"""Moodle's REST protocol: functions, parameters, answers and their errors.

The wsfunction table of each flavour, PHP-style parameter encoding, one REST
request (:func:`request`), and the checks every answer goes through: HTTP
status, size, JSON, and Moodle's error objects.  :class:`Route` holds how a
job's requests travel (token, TLS, proxy, timeouts).  aiohttp's exceptions
become ours here and in :mod:`.transfer`, never chained (see the package
docstring).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ..config import Settings
from ..errors import (
    DownloadTooLarge,
    MoodleBadResponse,
    MoodleRejected,
    MoodleUnavailable,
    redact,
    redact_url,
)
from ..jobs import Flavour, MoodleEndpoint

#: Download and upload I/O unit.  The reference reads 320 MB at a time and can
#: overshoot its limit by that much; 1 MiB keeps the overshoot negligible.
IO_CHUNK_BYTES = 1 << 20
#: Downloads smaller than this are checked for a Moodle error object instead
#: of the file (contract 2.5; the reference's threshold).
ERROR_SNIFF_BYTES = 10_240
#: Moodle 4.3 can wrap report answers in stray tags; the reference strips
#: these character sets from both ends (contract 2.1.2).
REPORT_QUIRK_LEAD = "<html><body>"
REPORT_QUIRK_TAIL = "</body></html>"


@dataclass(frozen=True)
class Api:
    """The wsfunction names and answer keys of one flavour."""

    status: str
    report: str
    metadata: str
    process: str
    #: ``attemptid`` or ``submissionid``: the item key of report answers.
    item_key: str
    #: ``attemptids`` or ``submissionids``: the metadata list parameter.
    ids_param: str
    #: ``attempts`` or ``submissions``: the metadata rows key.
    rows_key: str


APIS = {
    Flavour.QUIZ_ARCHIVER: Api(
        status="quiz_archiver_update_job_status",
        report="quiz_archiver_generate_attempt_report",
        metadata="quiz_archiver_get_attempts_metadata",
        process="quiz_archiver_process_uploaded_artifact",
        item_key="attemptid",
        ids_param="attemptids",
        rows_key="attempts",
    ),
    Flavour.ARCHIVINGMOD_QUIZ: Api(
        status="archivingmod_quiz_update_task_status",
        report="archivingmod_quiz_generate_attempt_report",
        metadata="archivingmod_quiz_get_attempts_metadata",
        process="archivingmod_quiz_process_uploaded_artifact",
        item_key="attemptid",
        ids_param="attemptids",
        rows_key="attempts",
    ),
    Flavour.ARCHIVINGMOD_ASSIGN: Api(
        status="archivingmod_assign_update_task_status",
        report="archivingmod_assign_generate_submission_report",
        metadata="archivingmod_assign_get_submissions_metadata",
        process="archivingmod_assign_process_uploaded_artifact",
        item_key="submissionid",
        ids_param="submissionids",
        rows_key="submissions",
    ),
}
BACKUP_STATUS_FUNCTION = "quiz_archiver_get_backup_status"


def encode_params(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Encode function parameters the way PHP decodes them (contract 2.1.1).

    Scalars become ``name=value``, sequences ``name[]=v`` per element and
    mappings ``name[key]=v`` per key.  Booleans become ``1``/``0``, never
    ``True``/``False``; ``None`` values are left out.

    Args:
        params: parameter names and values, in the order to send them.

    Returns:
        The query pairs.

    Raises:
        TypeError: a value is of a type Moodle has no encoding for.
    """
    pairs: list[tuple[str, str]] = []
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            pairs.extend((f"{name}[{k}]", _scalar(v)) for k, v in value.items())
        elif isinstance(value, list | tuple):
            pairs.extend((f"{name}[]", _scalar(v)) for v in value)
        else:
            pairs.append((name, _scalar(value)))

    return pairs


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | str):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} for Moodle")


@dataclass(frozen=True)
class Route:
    """How one job's requests reach its Moodle.

    The REST and upload URLs, the token, TLS, proxy and timeouts, and the
    most bytes any answer may have (``report_max_bytes``).
    """

    ws_url: str
    upload_url: str
    token: str = field(repr=False)
    ssl: bool
    proxy: str | None
    call_timeout: aiohttp.ClientTimeout
    download_timeout: aiohttp.ClientTimeout
    upload_timeout: aiohttp.ClientTimeout
    answer_limit: int

    @classmethod
    def create(cls, settings: Settings, moodle: MoodleEndpoint) -> Route:
        """The route to ``moodle`` under ``settings``."""
        return cls(
            ws_url=moodle.ws_url,
            upload_url=moodle.upload_url,
            token=moodle.token,
            ssl=not settings.skip_https_cert_validation,
            proxy=_proxy_for(settings, moodle.base_url.rstrip("/")),
            call_timeout=aiohttp.ClientTimeout(
                connect=settings.http_connect_timeout_s,
                sock_connect=settings.http_connect_timeout_s,
                sock_read=settings.http_read_timeout_s,
            ),
            # Downloads keep the read timeout to detect a stalled transfer.
            # Moodle may be silent for minutes while it stores or reassembles
            # and hashes a large upload (the reference allows 1800 s there), so
            # upload.php and process_uploaded_artifact only have the total limit.
            download_timeout=aiohttp.ClientTimeout(
                total=settings.http_transfer_timeout_s,
                connect=settings.http_connect_timeout_s,
                sock_connect=settings.http_connect_timeout_s,
                sock_read=settings.http_read_timeout_s,
            ),
            upload_timeout=aiohttp.ClientTimeout(
                total=settings.http_transfer_timeout_s,
                connect=settings.http_connect_timeout_s,
                sock_connect=settings.http_connect_timeout_s,
            ),
            answer_limit=settings.report_max_bytes,
        )


def _proxy_for(settings: Settings, base_url: str) -> str | None:
    """The proxy for this Moodle, unless its host is in the bypass list."""
    if not settings.proxy_server_url:
        return None
    host = (urlsplit(base_url).hostname or "").lower()
    for entry in settings.proxy_bypass_domains:
        domain = entry.strip().lower().lstrip(".")
        if domain == "*" or host == domain or host.endswith("." + domain):
            return None
    return settings.proxy_server_url


async def request(
    session: aiohttp.ClientSession,
    route: Route,
    wsfunction: str,
    params: Mapping[str, Any],
    *,
    stage: str,
    item: int | None,
    quirk: bool,
    long_running: bool,
) -> dict[str, Any]:
    """Call ``wsfunction`` on ``route`` and return its answer object.

    ``quirk`` strips Moodle 4.3's stray tags first, and ``long_running``
    drops the read timeout.
    """
    query = [
        ("wstoken", route.token),
        ("moodlewsrestformat", "json"),
        ("wsfunction", wsfunction),
        *encode_params(params),
    ]
    try:
        async with session.get(
            route.ws_url,
            params=query,
            timeout=route.upload_timeout if long_running else route.call_timeout,
            proxy=route.proxy,
            ssl=route.ssl,
        ) as resp:
            await check_http_status(resp, wsfunction, stage, item)
            if resp.content_type != "application/json":
                raise MoodleBadResponse(
                    f"{wsfunction} answered Content-Type {resp.content_type!r}, "
                    "not JSON",
                    stage=stage,
                    attempt=item,
                )
            body = await read_body(resp, route.answer_limit, wsfunction, stage, item)
    except (aiohttp.ClientError, OSError) as exc:
        raise unavailable(wsfunction, exc, stage, item) from None
    if quirk:
        body = body.strip().lstrip(REPORT_QUIRK_LEAD.encode())
        body = body.rstrip(REPORT_QUIRK_TAIL.encode())
    data = decode_json(body, wsfunction, stage, item)
    if not isinstance(data, dict):
        raise MoodleBadResponse(
            f"{wsfunction} answered {type(data).__name__}, not an object",
            stage=stage,
            attempt=item,
        )
    raise_for_error_object(data, wsfunction, stage, item)

    return data


async def read_body(
    resp: aiohttp.ClientResponse, limit: int, what: str, stage: str, item: int | None
) -> bytes:
    """Read a whole answer, at most ``limit`` (``report_max_bytes``) of it."""
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large(f"answer of {what}", resp.content_length, limit, stage, item)
    body = bytearray()
    async for chunk in resp.content.iter_chunked(IO_CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            resp.close()
            raise too_large(f"answer of {what}", len(body), limit, stage, item)

    return bytes(body)


async def check_http_status(
    resp: aiohttp.ClientResponse, what: str, stage: str, item: int | None
) -> None:
    if resp.status < 400:
        return
    if resp.status >= 500:
        raise MoodleUnavailable(
            f"{what}: Moodle answered HTTP {resp.status}", stage=stage, attempt=item
        )
    detail = ""
    if (resp.content_length or 0) <= ERROR_SNIFF_BYTES:
        try:
            body = await resp.content.read(ERROR_SNIFF_BYTES)
            detail = _error_object_text(json.loads(body))
        except (ValueError, aiohttp.ClientError, OSError):
            pass  # the status code alone is the message
    raise MoodleRejected(
        f"{what}: Moodle answered HTTP {resp.status}{detail}",
        stage=stage,
        attempt=item,
    )


def decode_json(body: bytes, what: str, stage: str, item: int | None) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MoodleBadResponse(
            f"{what} answered something that is not JSON: {shorten(body[:80])}",
            stage=stage,
            attempt=item,
        ) from None


def sniff_error_object(head: bytes, what: str, stage: str, item: int | None) -> None:
    """Raise MoodleRejected if a small download is a Moodle error object."""
    try:
        data = json.loads(head)
    except ValueError:
        return
    if isinstance(data, dict):
        raise_for_error_object(data, what, stage, item)


def unavailable(
    what: str, exc: BaseException, stage: str, item: int | None
) -> MoodleUnavailable:
    return MoodleUnavailable(f"{what}: {_describe(exc)}", stage=stage, attempt=item)


def raise_for_error_object(
    data: Mapping[str, Any], what: str, stage: str, item: int | None
) -> None:
    """Raise MoodleRejected if ``data`` is one of Moodle's error objects (2.1.2)."""
    if "errorcode" in data or "exception" in data:
        raise MoodleRejected(
            f"{what} failed{_error_object_text(data)}", stage=stage, attempt=item
        )


def _error_object_text(data: object) -> str:
    if not isinstance(data, Mapping) or not (
        "errorcode" in data or "exception" in data
    ):
        return ""
    code = data.get("errorcode") or data.get("exception")
    message = data.get("message") or data.get("error") or ""

    return f": Moodle error {code}: {message}".rstrip(": ")


def too_large(
    what: str, size: int, limit: int, stage: str, item: int | None
) -> DownloadTooLarge:
    return DownloadTooLarge(
        f"{what} exceeds the limit of {limit} bytes (at least {size})",
        stage=stage,
        attempt=item,
    )


def _describe(exc: BaseException) -> str:
    """Name an aiohttp or OS error without any URL it may quote."""
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "no data within the read timeout (stalled)"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connection timed out"
    if isinstance(exc, TimeoutError):
        return "time limit exceeded"
    text = redact(str(exc)).split(" for url", 1)[0]
    for secret_url in re.findall(r"https?://\S+", text):
        text = text.replace(secret_url, redact_url(secret_url))

    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shorten(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
