"""File transfers: ``pluginfile.php`` downloads and ``upload.php`` uploads.

Downloads stream to disk through a non-blocking sink under a size limit,
optionally hashing as they go, and remove a partial file on any failure.
Uploads send a slice of the archive file per part (chunk planning follows
contract 2.6) and check ``upload.php``'s answer for the file record that
``process_uploaded_artifact`` needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from ..errors import (
    ArchiveError,
    DownloadTooLarge,
    JobError,
    MoodleBadResponse,
    MoodleRejected,
    redact_url,
)
from ..jobs import BackupTask
from .names import PLUGINFILE_PATH, is_pluginfile_url
from .wire import (
    ERROR_SNIFF_BYTES,
    IO_CHUNK_BYTES,
    Route,
    check_http_status,
    decode_json,
    is_int,
    raise_for_error_object,
    read_body,
    sniff_error_object,
    too_large,
    unavailable,
)

log = logging.getLogger(__name__)

#: The only Content-Type Moodle serves backups with (contract 2.5).
BACKUP_CONTENT_TYPE = "application/vnd.moodle.backup"
#: Keys of an upload.php answer that process_uploaded_artifact needs (2.6).
UPLOAD_FILE_FIELDS = (
    "component",
    "contextid",
    "userid",
    "filearea",
    "filename",
    "filepath",
    "itemid",
)


@contextlib.contextmanager
def failures_logged(what: str, url: str) -> Iterator[None]:
    """Log a JobError leaving the block at WARNING, then let it go on."""
    try:
        yield
    except JobError as exc:
        log.warning(
            "moodle.transfer.failed what=%s stage=%s item=%s url=%s error=%s",
            what,
            exc.stage,
            exc.attempt,
            redact_url(url),
            exc.message,
        )
        raise


# --- downloads ----------------------------------------------------------------


def check_file_url(base_url: str, url: str, stage: str, item: int | None) -> None:
    if not is_pluginfile_url(base_url, url):
        raise MoodleBadResponse(
            f"refusing to download {redact_url(url)}: not a "
            f"{PLUGINFILE_PATH} URL of {base_url}",
            stage=stage,
            attempt=item,
        )


async def check_backup_head(
    session: aiohttp.ClientSession, route: Route, backup: BackupTask, limit: int
) -> None:
    """HEAD the backup: its Content-Type, and its size against ``limit``."""
    url = backup.download_url
    try:
        async with session.head(
            url,
            params=[("token", route.token)],
            allow_redirects=True,
            timeout=route.call_timeout,
            proxy=route.proxy,
            ssl=route.ssl,
        ) as resp:
            await check_http_status(resp, "HEAD backup", "backup", None)
            content_type = resp.headers.get("Content-Type", "")
            length = resp.content_length
    except (aiohttp.ClientError, OSError) as exc:
        raise unavailable("HEAD backup", exc, "backup", None) from None
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != BACKUP_CONTENT_TYPE:
        raise MoodleBadResponse(
            f"backup {backup.filename}: Content-Type {content_type!r} is not "
            f"{BACKUP_CONTENT_TYPE}",
            stage="backup",
        )
    if length is None:
        log.warning("moodle.backup.no_length url=%s", redact_url(url))
    elif length > limit:
        raise DownloadTooLarge(
            f"backup {backup.filename} has {length} bytes, more than the "
            f"limit of {limit}",
            stage="backup",
        )


async def download(
    session: aiohttp.ClientSession,
    route: Route,
    url: str,
    target: Path,
    *,
    limit: int,
    stage: str,
    item: int | None,
    digest: Any = None,
) -> int:
    """GET a pluginfile URL into ``target``; removes the file on failure."""
    log.debug(
        "moodle.download.started stage=%s item=%s url=%s",
        stage,
        item,
        redact_url(url),
    )
    started = time.monotonic()
    done = False
    try:
        async with session.get(
            url,
            params=[("token", route.token), ("forcedownload", "1")],
            timeout=route.download_timeout,
            proxy=route.proxy,
            ssl=route.ssl,
        ) as resp:
            await check_http_status(resp, "download", stage, item)
            size, head = await _stream_to_file(resp, target, limit, stage, item, digest)
        if head is not None:
            sniff_error_object(head, "download", stage, item)
        done = True
    except (aiohttp.ClientError, OSError) as exc:
        raise unavailable("download", exc, stage, item) from None
    finally:
        if not done:
            await asyncio.to_thread(target.unlink, missing_ok=True)
    log.debug(
        "moodle.download.complete stage=%s item=%s bytes=%d duration_ms=%d",
        stage,
        item,
        size,
        (time.monotonic() - started) * 1000,
    )

    return size


async def _stream_to_file(
    resp: aiohttp.ClientResponse,
    target: Path,
    limit: int,
    stage: str,
    item: int | None,
    digest: Any,
) -> tuple[int, bytes | None]:
    """Write the body to ``target``; returns its size, and itself if small."""
    what = f"download of {target.name}"
    if resp.content_length is not None and resp.content_length > limit:
        raise too_large(what, resp.content_length, limit, stage, item)
    head = bytearray()
    total = 0
    sink = await _Sink.open(target, stage, item)
    try:
        async for chunk in resp.content.iter_chunked(IO_CHUNK_BYTES):
            total += len(chunk)
            if total > limit:
                resp.close()
                raise too_large(what, total, limit, stage, item)
            if digest is not None:
                digest.update(chunk)
            if total <= ERROR_SNIFF_BYTES:
                head += chunk
            await sink.write(chunk)
    finally:
        await sink.close()

    return total, (bytes(head) if total <= ERROR_SNIFF_BYTES else None)


class _Sink:
    """A file written from the event loop without blocking it."""

    def __init__(self, fh: IO[bytes], stage: str, item: int | None) -> None:
        self._fh = fh
        self._stage = stage
        self._item = item

    @classmethod
    async def open(cls, target: Path, stage: str, item: int | None) -> _Sink:
        try:
            fh = await asyncio.to_thread(target.open, "wb")
        except OSError as exc:
            raise ArchiveError(
                f"cannot write {target.name}: {exc.strerror}", stage=stage, attempt=item
            ) from exc
        return cls(fh, stage, item)

    async def write(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._fh.write, data)
        except OSError as exc:
            raise ArchiveError(
                f"cannot write {Path(self._fh.name).name}: {exc.strerror}",
                stage=self._stage,
                attempt=self._item,
            ) from exc

    async def close(self) -> None:
        await asyncio.to_thread(self._fh.close)


# --- uploads ------------------------------------------------------------------


def plan_parts(
    name: str, size: int, max_upload_bytes: int | None
) -> list[tuple[str, int, int]]:
    """Split an upload into ``(part name, offset, length)`` parts (2.6)."""
    if not max_upload_bytes or max_upload_bytes <= 0 or size <= max_upload_bytes:
        return [(name, 0, size)]
    count = math.ceil(size / max_upload_bytes)

    return [
        (
            f"{name}.chunk{index:09d}.bin",
            index * max_upload_bytes,
            min(max_upload_bytes, size - index * max_upload_bytes),
        )
        for index in range(count)
    ]


async def upload_part(
    session: aiohttp.ClientSession,
    route: Route,
    archive: Path,
    part: tuple[str, int, int],
    *,
    itemid: object,
) -> dict[str, Any]:
    """POST one part of ``archive`` to upload.php; returns its file record."""
    part_name, offset, length = part
    with aiohttp.MultipartWriter("form-data") as form:
        for field, value in (
            ("token", route.token),
            ("filepath", "/"),
            ("itemid", str(itemid)),
        ):
            form.append(value).set_content_disposition("form-data", name=field)
        # PHP takes the file name literally: percent-encoding it (aiohttp's
        # default) would store "Reference%20Quiz.zip" in Moodle.
        payload = _FileSlicePayload(archive, offset, length)
        payload.set_content_disposition(
            "form-data", quote_fields=False, name="file_1", filename=part_name
        )
        form.append_payload(payload)
    log.debug("moodle.upload.part name=%s bytes=%d", part_name, length)
    try:
        async with session.post(
            route.upload_url,
            data=form,
            timeout=route.upload_timeout,
            proxy=route.proxy,
            ssl=route.ssl,
        ) as resp:
            await check_http_status(resp, "upload.php", "upload", None)
            body = await read_body(
                resp, route.answer_limit, "upload.php", "upload", None
            )
    except (aiohttp.ClientError, OSError) as exc:
        raise unavailable("upload.php", exc, "upload", None) from None
    data = decode_json(body, "upload.php", "upload", None)

    return _parse_upload_answer(data, part_name)


class _FileSlicePayload(Payload):
    """``length`` bytes of a file from ``offset``, read in chunks off the loop."""

    _autoclose = True

    def __init__(self, path: Path, offset: int, length: int) -> None:
        super().__init__(path, content_type="application/octet-stream")
        self._path = path
        self._offset = offset
        self._length = length
        self._size = length

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file slice has no text form")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        remaining = self._length
        if content_length is not None:
            remaining = min(remaining, content_length)
        fh = await asyncio.to_thread(self._path.open, "rb")
        try:
            await asyncio.to_thread(fh.seek, self._offset)
            while remaining > 0:
                chunk = await asyncio.to_thread(fh.read, min(IO_CHUNK_BYTES, remaining))
                if not chunk:
                    raise OSError(f"{self._path.name} shrank during the upload")
                await writer.write(chunk)
                remaining -= len(chunk)
        finally:
            await asyncio.to_thread(fh.close)


def _parse_upload_answer(data: object, part_name: str) -> dict[str, Any]:
    def bad(problem: str) -> MoodleBadResponse:
        return MoodleBadResponse(
            f"upload.php {problem} for {part_name}", stage="upload"
        )

    if isinstance(data, dict):
        raise_for_error_object(data, "upload.php", "upload", None)
        raise bad("answered an object instead of a file list")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise bad("answered no file record")
    record: dict[str, Any] = data[0]
    if "error" in record or "errortype" in record:
        raise MoodleRejected(
            f"upload.php refused {part_name}: {record.get('errortype')}: "
            f"{record.get('error')}",
            stage="upload",
        )
    missing = [key for key in UPLOAD_FILE_FIELDS if key not in record]
    if missing:
        raise bad(f"answered a record without {', '.join(missing)}")
    for key in ("contextid", "userid", "itemid"):
        if not (is_int(record[key]) or str(record[key]).isdigit()):
            raise bad(f"answered a non-numeric {key}")
    for key in ("component", "filearea", "filename", "filepath"):
        if not isinstance(record[key], str):
            raise bad(f"answered a {key} that is not a string")

    return record
