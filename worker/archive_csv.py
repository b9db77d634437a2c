"""The metadata CSV that Moodle reads back out of the archive (contract 3.10).

quiz_archiver's GDPR export parses this file, so its bytes follow the old
worker exactly: comma separated, ``"`` quoted, every string quoted and every
number bare (``csv.QUOTE_NONNUMERIC``), CRLF line ends, UTF-8 without BOM.

Value mapping, for the JSON types Moodle can send:

* int and float: bare, as Python prints them (``24``, ``1.5``);
* string: quoted, inner quotes doubled;
* null: an empty quoted field (``""``), as the old worker wrote it;
* bool: bare ``1`` or ``0``.  The old worker would have written Python's
  ``True``/``False``; no Moodle field is boolean today, and ``1``/``0`` is how
  Moodle itself (PARAM_BOOL) and PHP readers spell a boolean;
* array or object: compact JSON text, quoted, rather than a Python repr.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from archive_worker.errors import ArchiveError
from archive_worker.events import Stage

log = logging.getLogger(__name__)

#: The column every row gets (or has overwritten) with the report's location.
PATH_COLUMN = "path"


def write_metadata_csv(
    target: Path, rows: Sequence[Mapping[str, Any]], *, id_key: str
) -> None:
    """Write ``rows`` to ``target`` as the archive's metadata CSV.

    The header is the keys of the first row, in order; every row must use
    those keys only (a missing key is written as an empty string).

    Args:
        target: the file to create or replace.
        rows: one mapping per attempt or submission, ``path`` already set.
        id_key: ``attemptid`` or ``submissionid``, used to name the row at
            fault in errors.

    Raises:
        ArchiveError: (stage ``metadata``) when there are no rows, a row has
            a key the header lacks, or the file cannot be written.
    """
    if not rows:
        raise ArchiveError("no metadata rows to write", stage=Stage.METADATA)
    header = list(rows[0])
    known = set(header)
    for row in rows:
        extra = set(row) - known
        if extra:
            raise ArchiveError(
                f"metadata row has columns the header lacks: {sorted(extra)}",
                stage=Stage.METADATA,
                attempt=_row_id(row, id_key),
            )
    try:
        with target.open("w", encoding="utf-8", newline="") as stream:
            writer = csv.writer(stream, quoting=csv.QUOTE_NONNUMERIC)
            writer.writerow(header)
            writer.writerows(
                [_cell(row.get(key, "")) for key in header] for row in rows
            )
    except (OSError, UnicodeError) as exc:
        raise ArchiveError(
            f"cannot write {target.name}: {exc}", stage=Stage.METADATA
        ) from exc
    log.debug("metadata_csv.written file=%s rows=%d", target.name, len(rows))


def _cell(value: Any) -> Any:
    # bool is an int subclass and csv would print it as True/False.
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value


def _row_id(row: Mapping[str, Any], id_key: str) -> int | None:
    value = row.get(id_key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
