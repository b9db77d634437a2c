"""The Moodle connection probe made while Moodle's POST is still open (2.1.3).

The bridge calls the flavour's status function with the job's token and *no*
parameters.  Moodle then answers with an ``invalidparameter`` error object,
which proves three things at once: the web service URL is Moodle, the token
is valid, and the token's service allows the function.  Any other answer is
a failure, and so is a network error or the time limit.

The token is a query parameter of that request, so nothing here logs the
request URL with its query; failures are logged with the bare web service
URL and a redacted cause.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import aiohttp
import msgspec

from archive_worker.config import Settings
from archive_worker.errors import redact
from archive_worker.jobs import Flavour, MoodleEndpoint

log = logging.getLogger(__name__)

#: The status function of each flavour; called without parameters it answers
#: ``invalidparameter`` when the token may call it (contract 2.1.3).
PROBE_WSFUNCTIONS = {
    Flavour.QUIZ_ARCHIVER: "quiz_archiver_update_job_status",
    Flavour.ARCHIVINGMOD_QUIZ: "archivingmod_quiz_update_task_status",
    Flavour.ARCHIVINGMOD_ASSIGN: "archivingmod_assign_update_task_status",
}

#: Moodle's error object is a few hundred bytes; a larger answer is not one,
#: and reading it whole would let any URL fill our memory.
MAX_PROBE_RESPONSE_BYTES = 65_536

_EXPECTED_ERRORCODE = "invalidparameter"


def probe_failed_message(endpoint: MoodleEndpoint) -> str:
    """The contract's 400 message for a failed probe (1.7 step 6)."""
    return (
        "Could not establish a connection to Moodle webservice API at "
        f'"{endpoint.ws_url}" using the provided wstoken.'
    )


def open_probe_session(settings: Settings) -> aiohttp.ClientSession:
    """Create the HTTP session the bridge shares for all probes.

    Proxies come only from ``proxy_server_url`` (not from the environment),
    so that the setting alone decides; the caller closes the session.
    """
    connector = aiohttp.TCPConnector(
        ssl=not settings.skip_https_cert_validation,
        limit=100,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=settings.probe_timeout_s),
        trust_env=False,
    )


def loggable_url(url: str) -> str:
    """``url`` without user info, query and fragment, fit for a log line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _proxy_for(url: str, settings: Settings) -> str | None:
    if not settings.proxy_server_url:
        return None
    host = (urlsplit(url).hostname or "").lower()
    for domain in settings.proxy_bypass_domains:
        domain = domain.strip().lower().lstrip(".")
        # Same rule as the worker's Moodle client ("*" bypasses every host).
        if domain == "*" or (
            domain and (host == domain or host.endswith("." + domain))
        ):
            return None
    return settings.proxy_server_url


async def probe_moodle(
    session: aiohttp.ClientSession,
    endpoint: MoodleEndpoint,
    flavour: Flavour,
    settings: Settings,
) -> bool:
    """Check that Moodle accepts the job's token for the flavour's functions.

    Args:
        session: the shared session from :func:`open_probe_session`.
        endpoint: where Moodle is and the job's token.
        flavour: selects the status function to call.
        settings: timeout and proxy settings.

    Returns:
        True only when Moodle answered a JSON object whose ``errorcode`` is
        ``invalidparameter``.  Every failure is logged at WARNING with the
        web service URL (never its query) and returns False; nothing raises.
    """
    params = {
        "wstoken": endpoint.token,
        "moodlewsrestformat": "json",
        "wsfunction": PROBE_WSFUNCTIONS[flavour],
    }
    try:
        async with session.get(
            endpoint.ws_url,
            params=params,
            proxy=_proxy_for(endpoint.ws_url, settings),
            # A redirect would carry the token to another URL.
            allow_redirects=False,
        ) as response:
            body = await response.content.read(MAX_PROBE_RESPONSE_BYTES + 1)
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        cause = redact(f"{type(exc).__name__}: {exc}")
        log.warning(
            "probe.failed url=%s cause=%s", loggable_url(endpoint.ws_url), cause
        )
        return False

    return _judge(body, status, loggable_url(endpoint.ws_url))


def _judge(body: bytes, status: int, url: str) -> bool:
    """Decide from Moodle's answer whether the probe passed."""
    answer: object = None
    if len(body) <= MAX_PROBE_RESPONSE_BYTES:
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError:
            answer = None
    if not isinstance(answer, dict):
        log.warning(
            "probe.failed url=%s http_status=%d cause=not a JSON object", url, status
        )
        return False
    errorcode = answer.get("errorcode")
    if errorcode != _EXPECTED_ERRORCODE:
        # errorcode is Moodle's short code (invalidtoken, accessexception ...).
        log.warning(
            "probe.failed url=%s http_status=%d errorcode=%s",
            url,
            status,
            redact(str(errorcode))[:100],
        )
        return False
    log.debug("probe.passed url=%s", url)

    return True
