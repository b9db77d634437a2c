"""Checks on the names and download URLs Moodle hands us.

Folder and file names from report answers become paths in the archive, and
attachment download URLs are fetched with the job's token, so each is
refused unless it is safe (contract 2.2.2, 2.5).  The functions here return
the problem as text, or None; the caller raises the error of its stage.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

PLUGINFILE_PATH = "/webservice/pluginfile.php/"
#: Characters Moodle removes from expanded folder names, and that we therefore
#: refuse (contract 2.2.2); file names also may not contain ``/``.
FOLDERNAME_FORBIDDEN = frozenset('\\.:;*?!"<>|\0')
FILENAME_FORBIDDEN = FOLDERNAME_FORBIDDEN | {"/"}
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def folder_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if _CONTROL_CHARS.search(name):
        return "it contains control characters"
    forbidden = sorted(set(name) & FOLDERNAME_FORBIDDEN)
    if forbidden:
        return f"it contains {''.join(forbidden)!r}"
    if name.startswith("/") or name.endswith("/"):
        return "it starts or ends with '/'"
    if any(segment in ("", ".", "..") for segment in name.split("/")):
        return "it has an empty or relative path segment"
    return None


def file_problem(name: str) -> str | None:
    if "/" in name:
        return "it contains '/'"
    return folder_problem(name)


def attachment_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "it is empty or not a string"
    if name in (".", ".."):
        return "it is a relative path"
    if _CONTROL_CHARS.search(name):
        return "it contains control characters"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    return None


def is_pluginfile_url(base_url: str, url: str) -> bool:
    """True if ``url`` stays inside this Moodle's pluginfile.php (SSRF guard)."""
    prefix = base_url + PLUGINFILE_PATH
    if not url.startswith(prefix) or _CONTROL_CHARS.search(url) or "\\" in url:
        return False
    path = urlsplit(url).path[len(urlsplit(prefix).path) :]
    segments = [unquote(s) for s in path.split("/")]

    return not any(s in (".", "..") or "/" in s or "\\" in s for s in segments)
