"""Stream files from disk into a ZIP, hashing each one on the way.

Backups reach several gigabytes, so nothing here holds a whole file: every
file is read once, in chunks, and each chunk goes both into the member's
SHA-256 and into the ZIP entry.  Memory use depends on the chunk size and on
the number of members (zipfile keeps the central directory), never on the
size of a file.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

#: Read size for copying and hashing.  Large enough to keep the per-call
#: overhead negligible, small enough not to matter for memory.
CHUNK_BYTES = 1024 * 1024

#: Compression names as ``Settings.zip_compression`` spells them (contract 3.14).
COMPRESSION_METHODS = {
    "STORED": zipfile.ZIP_STORED,
    "DEFLATED": zipfile.ZIP_DEFLATED,
    "BZIP2": zipfile.ZIP_BZIP2,
    "LZMA": zipfile.ZIP_LZMA,
}

#: Suffix of the checksum file written next to each member (contract 3.12).
SIDECAR_SUFFIX = ".sha256"

#: ``rw-r--r--`` for entries that have no file of their own (the sidecars).
_PLAIN_FILE_MODE = 0o100644 << 16


def write_zip(
    target: Path,
    entries: Iterable[tuple[Path, str]],
    *,
    compress_type: int,
    sidecars: bool,
) -> list[str]:
    """Write ``entries`` (source file, member name) into a new ZIP at ``target``.

    Only file entries are written, no directory entries.  ZIP64 is used
    where a member needs it.

    Args:
        target: the ZIP file to create (replaced if it exists).
        entries: source files and their member names, in archive order.
        compress_type: one of the ``zipfile.ZIP_*`` constants, used for every
            member.
        sidecars: also write ``<member>.sha256`` after each member, holding
            its SHA-256 as 64 lowercase hex characters and nothing else.

    Returns:
        The member names in archive order, sidecars included.

    Raises:
        OSError: a source file cannot be read or the target written.
    """
    members: list[str] = []
    with zipfile.ZipFile(
        target, "w", compression=compress_type, allowZip64=True
    ) as archive:
        for source, member in entries:
            sidecar = _copy_member(archive, source, member, compress_type, sidecars)
            members.append(member)
            if sidecar is not None:
                members.append(sidecar)

    return members


def _copy_member(
    archive: zipfile.ZipFile,
    source: Path,
    member: str,
    compress_type: int,
    sidecar: bool,
) -> str | None:
    # from_file fills in file_size, which zipfile uses to decide on ZIP64
    # before any data is written; strict_timestamps=False clamps pre-1980
    # mtimes instead of failing.
    info = zipfile.ZipInfo.from_file(source, member, strict_timestamps=False)
    info.compress_type = compress_type
    digest = hashlib.sha256()
    with source.open("rb") as reader, archive.open(info, "w") as writer:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
    log.debug("archive.member name=%s size=%d", member, info.file_size)
    if not sidecar:
        return None

    sidecar_info = zipfile.ZipInfo(member + SIDECAR_SUFFIX, date_time=info.date_time)
    sidecar_info.compress_type = compress_type
    sidecar_info.external_attr = _PLAIN_FILE_MODE
    archive.writestr(sidecar_info, digest.hexdigest())

    return sidecar_info.filename


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file as lowercase hex, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)

    return digest.hexdigest()
