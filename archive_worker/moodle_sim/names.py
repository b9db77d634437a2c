"""Folder and file name patterns, expanded the way the Moodle plugins do.

Patterns like ``${username}/${attemptid}-${date}_${time}`` are checked
(known variables, no forbidden characters) and expanded with each value cut
to 128 characters and stripped of forbidden characters, then each path
segment cut to 240 characters (contract 3.13.1).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Final

FOLDERNAME_FORBIDDEN: Final = '\\.:;*?!"<>|\0'
FILENAME_FORBIDDEN: Final = FOLDERNAME_FORBIDDEN + "/"

QUIZ_VARIABLES: Final = frozenset(
    {
        "courseid",
        "coursename",
        "courseshortname",
        "cmid",
        "groupids",
        "groupidnumbers",
        "groupnames",
        "quizid",
        "quizname",
        "attemptid",
        "username",
        "firstname",
        "lastname",
        "idnumber",
        "timestart",
        "timefinish",
        "date",
        "time",
        "timestamp",
    }
)
SUBMISSION_VARIABLES: Final = frozenset(
    {
        "courseid",
        "coursename",
        "courseshortname",
        "cmid",
        "assignmentid",
        "assignmentname",
        "submissionid",
        "attemptnumber",
        "username",
        "firstname",
        "lastname",
        "idnumber",
        "timecreated",
        "timemodified",
        "date",
        "time",
        "timestamp",
    }
)

_VARIABLE: Final = re.compile(r"\$\{([^}]*)\}")
VALUE_MAX_CHARS: Final = 128
SEGMENT_MAX_CHARS: Final = 240


def is_valid_pattern(pattern: str, variables: frozenset[str], *, folder: bool) -> bool:
    """True if ``pattern`` uses only known variables and allowed characters."""
    forbidden = FOLDERNAME_FORBIDDEN if folder else FILENAME_FORBIDDEN
    if not pattern or any(name not in variables for name in _VARIABLE.findall(pattern)):
        return False
    literal = _VARIABLE.sub("", pattern)

    return not any(char in forbidden for char in literal)


def expand(pattern: str, values: Mapping[str, object], *, folder: bool) -> str:
    """Expand a valid pattern into a sanitised folder or file name."""
    now = time.gmtime()
    defaults = {
        "date": time.strftime("%Y-%m-%d", now),
        "time": time.strftime("%H-%M-%S", now),
        "timestamp": str(int(time.time())),
    }

    def replace(match: re.Match[str]) -> str:
        value = str(values.get(match.group(1), defaults.get(match.group(1), "")))
        value = "".join(c for c in value if c not in FILENAME_FORBIDDEN)
        return value[:VALUE_MAX_CHARS]

    name = _VARIABLE.sub(replace, pattern)
    forbidden = FOLDERNAME_FORBIDDEN if folder else FILENAME_FORBIDDEN
    name = "".join(c for c in name if c not in forbidden)
    segments = [s[:SEGMENT_MAX_CHARS] for s in name.split("/") if s]

    return "/".join(segments)
