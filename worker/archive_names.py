"""Rules for the folder and file names that end up inside an archive.

Folder and file names come from Moodle's pattern expansion (contract 2.2.2),
attachment and backup names straight from Moodle's file store.  Moodle
sanitises them, but the worker must not trust that: a name is a path on our
disk before it is a member of the archive.  The checks here only *describe*
what is wrong; :mod:`worker.archive` turns a problem into the right error.
"""

from __future__ import annotations

import posixpath
import unicodedata
from collections.abc import Callable

#: Characters the old worker refused in folder and file names (contract 2.2.2).
#: ``.`` is among them, which also rules out ``..`` path segments.
FORBIDDEN_CHARACTERS = frozenset('\\.:;*?!"<>|\x00')

#: Longest single path segment most file systems accept, in bytes.
MAX_SEGMENT_BYTES = 255


def folder_name_problem(name: str) -> str | None:
    """Say what is wrong with a report folder name, or None if it is fine.

    A folder name may hold ``/`` to make sub-folders, but no empty segment
    and no leading or trailing ``/``.
    """
    if not name:
        return "is empty"
    if name.startswith("/") or name.endswith("/"):
        return "starts or ends with '/'"
    if "//" in name:
        return "has an empty path segment"

    return _character_problem(name, FORBIDDEN_CHARACTERS)


def file_name_problem(name: str) -> str | None:
    """Say what is wrong with a report file name, or None if it is fine."""
    if not name:
        return "is empty"

    return _character_problem(name, FORBIDDEN_CHARACTERS | {"/"})


def relaxed_name_problem(name: str) -> str | None:
    """Check an attachment or backup file name, which may contain dots.

    Moodle's own file names (``answer.png``, ``backup-23.mbz``) need ``.``,
    so only what could leave the folder is refused: separators, ``.`` and
    ``..`` as a whole name, NUL and control characters.
    """
    if not name:
        return "is empty"
    if name in {".", ".."}:
        return "is a relative path reference"

    return _character_problem(name, frozenset("/\\\x00"))


def segment_too_long(segment: str) -> bool:
    """True if ``segment`` is longer than a file system allows."""
    return len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES


def _character_problem(name: str, forbidden: frozenset[str]) -> str | None:
    for char in name:
        if char in forbidden:
            return f"contains the forbidden character {char!r}"
        # Category Cc covers C0, DEL and C1: newlines and escapes in a file
        # name break logs, CSV readers and terminals.
        if unicodedata.category(char) == "Cc":
            return f"contains the control character {char!r}"
    return None


def numbered(name: str, number: int) -> str:
    """Insert ``(number)`` before the extension of the last path segment.

    ``a/b.txt`` becomes ``a/b(1).txt``; a name without extension, or with a
    leading dot only (``.profile``), gets the suffix at its end.
    """
    stem, extension = posixpath.splitext(name)

    return f"{stem}({number}){extension}"


def first_free(name: str, taken: Callable[[str], bool]) -> str:
    """Return ``name``, or its first numbered variant that is not taken."""
    candidate = name
    number = 0
    while taken(candidate):
        number += 1
        candidate = numbered(name, number)

    return candidate
