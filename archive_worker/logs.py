"""Logging: JSON lines or console output, with per-job context bound once.

Library modules only create ``logging.getLogger(__name__)``; :func:`configure`
is called by the CLI alone.  :func:`bind_job` sets the job id (and trace id)
in a context variable for the current task, so that every record logged
while the job runs carries them without passing them down.  Every record
passes :func:`~archive_worker.errors.redact` on its way out, a last line of
defence should a token ever reach a message.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from .errors import redact

_EMPTY: Mapping[str, str] = MappingProxyType({})
_job_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "archive_job_context", default=_EMPTY
)

#: Attributes every LogRecord has; anything else was passed in ``extra``.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
}


@contextlib.contextmanager
def bind_job(**fields: str | None) -> Iterator[None]:
    """Attach ``fields`` (job_id, trace_id, ...) to every record in this task."""
    merged = {**_job_context.get(), **{k: v for k, v in fields.items() if v}}
    token = _job_context.set(merged)
    try:
        yield
    finally:
        _job_context.reset(token)


def bound_fields() -> dict[str, str]:
    """The job fields bound in the current task."""
    return dict(_job_context.get())


class _ContextFilter(logging.Filter):
    """Copies the bound job fields onto each record and masks secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _job_context.get().items():
            setattr(record, key, value)
        record.msg = redact(record.getMessage())
        record.args = None

        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event text, fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))

        return json.dumps(data, default=str)


class ConsoleFormatter(logging.Formatter):
    """Readable lines for a terminal, with bound fields appended."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        ]
        if extras:
            line = f"{line} [{' '.join(extras)}]"
        return redact(line)


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    """Install the service's log handler on the root logger (CLI only).

    Args:
        level: a standard level name (``WARN`` and ``FATAL`` are accepted).
        fmt: ``json``, ``console``, or ``auto`` (console on a terminal,
            JSON otherwise).
    """
    level = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(level.upper(), level.upper())
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            ConsoleFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless we debug.
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(
            logging.DEBUG if level == "DEBUG" else logging.WARNING
        )


def install_context_filter(handler: logging.Handler) -> None:
    """Add the context/redaction filter to a handler (tests use this)."""
    handler.addFilter(_ContextFilter())
