"""One typed configuration for every role, and where its values come from.

Values are layered, later wins:

1. the defaults below;
2. an optional TOML file (``--config`` or ``ARCHIVE_WORKER_CONFIG``), flat
   keys named as the fields;
3. the existing workers' environment names (``QUIZ_ARCHIVER_*``, then
   ``MOODLE_ARCHIVER_*``, contract section 4), for every option we share;
4. ``ARCHIVE_WORKER_<FIELD>`` and, for the broker, ``NATS_URL``;
5. command line flags.

:func:`load_settings` validates the result once, at start-up, and raises
:class:`~archive_worker.errors.ConfigError` naming the key and the bad value.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from .errors import ConfigError

ENV_PREFIX = "ARCHIVE_WORKER_"
LEGACY_PREFIXES = ("QUIZ_ARCHIVER_", "MOODLE_ARCHIVER_")

ZipCompression = Literal["STORED", "DEFLATED", "BZIP2", "LZMA"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG"]


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every option of the service; see README "Configuration" for the table."""

    # --- logging -------------------------------------------------------------
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "auto"

    # --- NATS ------------------------------------------------------------------
    #: Comma-separated server URLs; unset = start an embedded nats-server.
    nats_url: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    nats_connect_timeout_s: float = 5.0
    #: Embedded server: data folder, and the loopback port (0 = any free one).
    data_dir: str = ".archive-worker"
    embedded_nats_port: int = 4222
    #: Replicas of every stream (3 on a three-node cluster).
    stream_replicas: int = 1
    #: Unfinished jobs (waiting and running) the jobs stream holds; more get 429.
    queue_size: int = 32
    #: A resubmission within this window is recognised as the same job.
    duplicate_window_s: float = 7200.0
    #: A job not taken within this time leaves the queue (Moodle's token is
    #: dead by then anyway).
    job_max_age_s: float = 86400.0
    #: How long status events are kept, and how many per job at most.
    status_retention_s: float = 7 * 86400.0
    status_max_events_per_job: int = 1000

    # --- bridge ----------------------------------------------------------------
    host: str = "0.0.0.0"
    port: int = 8080
    max_request_bytes: int = 1_048_576
    probe_timeout_s: float = 10.0
    #: Moodle base URLs allowed to submit jobs; empty = any.
    moodle_allowlist: list[str] = []
    #: Secret first path segment, e.g. ``s3cr3t`` for ``http://worker:8080/s3cr3t``.
    path_prefix: str | None = None
    retry_after_s: int = 30

    # --- worker ----------------------------------------------------------------
    worker_id: str | None = None
    job_slots: int = 2
    render_concurrency: int = 2
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    retry_backoff_s: float = 10.0
    retry_backoff_max_s: float = 300.0
    job_timeout_s: float = 3600.0
    drain_grace_s: float = 30.0
    status_interval_s: float = 15.0
    backup_poll_s: float = 30.0
    work_dir: str | None = None
    zip_compression: ZipCompression = "DEFLATED"

    # --- Moodle calls ---------------------------------------------------------
    http_connect_timeout_s: float = 10.0
    http_read_timeout_s: float = 60.0
    http_transfer_timeout_s: float = 1800.0
    skip_https_cert_validation: bool = False
    proxy_server_url: str | None = None
    proxy_bypass_domains: list[str] = []
    report_max_bytes: int = 200_000_000
    attachment_max_bytes: int = 1_280_000_000
    backup_max_bytes: int = 5_120_000_000

    # --- rendering -------------------------------------------------------------
    chromium_path: str | None = None
    viewport_width: int = 1240
    page_margin: str = "5mm"
    wait_for_ready_signal: bool = True
    ready_signal_timeout_s: float = 30.0
    continue_after_ready_signal_timeout: bool = False
    navigation_timeout_s: float = 30.0
    prevent_redirect_to_login: bool = True
    browser_max_pages: int = 200
    browser_max_memory_mb: int = 1536
    pdfa_conversion: bool = True
    pdfa_timeout_s: float = 30.0
    ghostscript_path: str | None = None

    # --- telemetry -------------------------------------------------------------
    metrics_port: int | None = None

    def masked(self) -> dict[str, Any]:
        """All values as builtins, secrets replaced by ``***``."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        for key in SECRET_FIELDS:
            if data.get(key):
                data[key] = "***"

        return data


#: Fields whose values never appear in output.
SECRET_FIELDS = frozenset({"nats_password", "nats_token", "path_prefix"})

#: Legacy environment suffixes (after ``QUIZ_ARCHIVER_``/``MOODLE_ARCHIVER_``)
#: and the field they set.  Contract section 4 lists both the variable names
#: and the internal names of some options; both spellings are accepted.
LEGACY_ENV = {
    "LOG_LEVEL": "log_level",
    "SERVER_HOST": "host",
    "SERVER_PORT": "port",
    "SKIP_HTTPS_CERT_VALIDATION": "skip_https_cert_validation",
    "PROXY_SERVER_URL": "proxy_server_url",
    "PROXY_BYPASS_DOMAINS": "proxy_bypass_domains",
    "QUEUE_SIZE": "queue_size",
    "PARALLEL_JOBS": "job_slots",
    "ZIP_COMPRESSION_ALGO": "zip_compression",
    "STATUS_REPORTING_INTERVAL_SEC": "status_interval_s",
    "REQUEST_TIMEOUT_SEC": "job_timeout_s",
    "BACKUP_STATUS_RETRY_SEC": "backup_poll_s",
    "BACKUP_DOWNLOAD_MAX_FILESIZE_BYTES": "backup_max_bytes",
    "QUESTION_ATTACHMENT_DOWNLOAD_MAX_FILESIZE_BYTES": "attachment_max_bytes",
    "REPORT_BASE_VIEWPORT_WIDTH": "viewport_width",
    "REPORT_PAGE_MARGIN": "page_margin",
    "WAIT_FOR_READY_SIGNAL": "wait_for_ready_signal",
    "REPORT_WAIT_FOR_READY_SIGNAL": "wait_for_ready_signal",
    "WAIT_FOR_READY_SIGNAL_TIMEOUT_SEC": "ready_signal_timeout_s",
    "REPORT_WAIT_FOR_READY_SIGNAL_TIMEOUT_SEC": "ready_signal_timeout_s",
    "CONTINUE_AFTER_READY_SIGNAL_TIMEOUT": "continue_after_ready_signal_timeout",
    "REPORT_CONTINUE_AFTER_READY_SIGNAL_TIMEOUT": "continue_after_ready_signal_timeout",
    "WAIT_FOR_NAVIGATION_TIMEOUT_SEC": "navigation_timeout_s",
    "REPORT_WAIT_FOR_NAVIGATION_TIMEOUT_SEC": "navigation_timeout_s",
    "PREVENT_REDIRECT_TO_LOGIN": "prevent_redirect_to_login",
    "PDFA_CONVERSION": "pdfa_conversion",
    "PDFA_CONVERSION_TIMEOUT_SEC": "pdfa_timeout_s",
    "PDFA_CONVERSION_GHOSTSCRIPT_BINARY_PATH": "ghostscript_path",
}

#: Legacy options that have no meaning here; accepted and ignored, so an old
#: compose file still starts (``HISTORY_SIZE``: history lives in JetStream).
LEGACY_IGNORED = frozenset({"HISTORY_SIZE", "DOWNLOAD_MAX_FILESIZE_BYTES", "DEMO_MODE"})

FIELD_NAMES: tuple[str, ...] = Settings.__struct_fields__

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_name(field: str) -> str:
    """The ``ARCHIVE_WORKER_*`` variable of a field."""
    return ENV_PREFIX + field.upper()


def legacy_env_names(field: str) -> list[str]:
    """The existing workers' variables that set ``field``."""
    return [
        prefix + suffix
        for suffix, name in LEGACY_ENV.items()
        if name == field
        for prefix in LEGACY_PREFIXES
    ]


def load_settings(
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build and validate the effective settings.

    Args:
        config_file: TOML file; defaults to ``$ARCHIVE_WORKER_CONFIG`` if set.
        environ: the environment to read (``os.environ`` by default).
        overrides: values from command line flags; ``None`` values are skipped.

    Returns:
        The validated settings.

    Raises:
        ConfigError: a value is of the wrong type or out of range, a key is
            unknown, or the file cannot be read; the message names the key.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}

    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        raw.update(_read_toml(Path(path)))
    raw.update(_from_env(env))
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})

    return _validate(raw)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("config", str(path), f"cannot read file: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"not valid TOML: {exc}") from exc
    for key in data:
        if key not in FIELD_NAMES:
            raise ConfigError(key, data[key], f"unknown key in {path}")

    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for prefix in LEGACY_PREFIXES:
        for suffix, field in LEGACY_ENV.items():
            if prefix + suffix in env:
                values[field] = _parse_env(field, prefix + suffix, env[prefix + suffix])
    if "NATS_URL" in env:
        values["nats_url"] = env["NATS_URL"]
    for field in FIELD_NAMES:
        name = env_name(field)
        if name in env:
            values[field] = _parse_env(field, name, env[name])

    return values


def _parse_env(field: str, name: str, text: str) -> Any:
    """Turn one environment string into the field's type, or fail naming it."""
    annotation = Settings.__annotations__[field]
    text = text.strip()
    if "bool" in annotation:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(name, text, "expected true or false")
    if annotation.startswith("list["):
        return [item.strip() for item in text.split(",") if item.strip()]
    if "None" in annotation and text == "":
        return None
    if field == "proxy_server_url" and text.lower() == "false":
        return None
    return text


def _validate(raw: dict[str, Any]) -> Settings:
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        key = _key_from_error(str(exc))
        value = raw.get(key, "<missing>")
        if key in SECRET_FIELDS:
            value = "***"
        raise ConfigError(key, value, str(exc).split(" - at ")[0]) from None
    _check_ranges(settings)

    return settings


def _key_from_error(message: str) -> str:
    # msgspec reports "Expected `int`, got `str` - at `$.queue_size`".
    if "`$." in message:
        return message.split("`$.", 1)[1].split("`", 1)[0].split("[", 1)[0]
    if "unknown field" in message.lower() and "`" in message:
        return message.split("`", 2)[1]

    return "config"


_POSITIVE = (
    "queue_size",
    "job_slots",
    "render_concurrency",
    "max_deliver",
    "max_request_bytes",
    "viewport_width",
    "browser_max_pages",
    "browser_max_memory_mb",
    "status_max_events_per_job",
    "report_max_bytes",
    "attachment_max_bytes",
    "backup_max_bytes",
    "ack_wait_s",
    "job_timeout_s",
    "probe_timeout_s",
    "nats_connect_timeout_s",
    "duplicate_window_s",
    "job_max_age_s",
    "status_retention_s",
    "http_connect_timeout_s",
    "http_read_timeout_s",
    "http_transfer_timeout_s",
    "navigation_timeout_s",
    "ready_signal_timeout_s",
    "pdfa_timeout_s",
    "retry_backoff_s",
    "retry_backoff_max_s",
)
_NON_NEGATIVE = ("status_interval_s", "backup_poll_s", "drain_grace_s", "retry_after_s")


def _check_ranges(s: Settings) -> None:
    for key in _POSITIVE:
        if getattr(s, key) <= 0:
            raise ConfigError(key, getattr(s, key), "must be greater than 0")
    for key in _NON_NEGATIVE:
        if getattr(s, key) < 0:
            raise ConfigError(key, getattr(s, key), "must not be negative")
    for key in ("port", "embedded_nats_port", "metrics_port"):
        value = getattr(s, key)
        if value is not None and not 0 <= value <= 65535:
            raise ConfigError(key, value, "must be a TCP port (0-65535)")
    if s.stream_replicas not in (1, 3, 5):
        raise ConfigError("stream_replicas", s.stream_replicas, "must be 1, 3 or 5")
    if s.duplicate_window_s > s.job_max_age_s:
        raise ConfigError(
            "duplicate_window_s", s.duplicate_window_s, "must not exceed job_max_age_s"
        )
    if s.path_prefix is not None and (
        not s.path_prefix.strip("/") or "/" in s.path_prefix.strip("/")
    ):
        raise ConfigError("path_prefix", "***", "must be one non-empty path segment")
    for url in s.moodle_allowlist:
        if not url.startswith(("http://", "https://")):
            raise ConfigError("moodle_allowlist", url, "entries must be http(s) URLs")
    if not s.page_margin or not s.page_margin[0].isdigit():
        raise ConfigError(
            "page_margin", s.page_margin, "expected a CSS length like 5mm"
        )
