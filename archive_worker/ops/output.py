"""Printing command results: JSON for scripts, rich tables for people."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

_encoder = msgspec.json.Encoder(order="deterministic")


def console() -> Console:
    """A console on stdout; no colours or wrapping when it is not a terminal."""
    return Console(highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Print ``data`` (structs, lists, dicts) as indented JSON."""
    console().print(
        msgspec.json.format(_encoder.encode(data), indent=2).decode(),
        markup=False,
    )


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    header: bool = True,
) -> Table:
    """A plain table; ``None`` cells print as ``-``."""
    t = Table(
        title=title,
        title_justify="left",
        show_edge=False,
        pad_edge=False,
        show_header=header,
    )
    for name in columns:
        t.add_column(name, overflow="fold")
    for row in rows:
        # Text, not str: cells hold error messages like "[stage render]",
        # which rich would otherwise read as markup and drop.
        t.add_row(*(Text("-" if cell is None else str(cell)) for cell in row))

    return t


def emit(data: Any, as_json: bool, render: Callable[[Console], None]) -> None:
    """Print ``data`` as JSON, or call ``render`` with a console."""
    if as_json:
        print_json(data)
        return
    render(console())


def age(seconds: float | None) -> str:
    """``42s``, ``7m``, ``3h12m``, ``2d4h``: a duration for a table."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def since(ts: float | None) -> float | None:
    """Seconds from Unix time ``ts`` to now."""
    return None if not ts else max(0.0, time.time() - ts)


def clock(ts: float | None) -> str:
    """Local ``HH:MM:SS`` of a Unix time."""
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
