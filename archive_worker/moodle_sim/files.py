"""``pluginfile.php`` downloads, ``upload.php`` uploads and the draft area.

Both scripts run in Moodle as AJAX scripts, so their errors are the AJAX
error object (``error``, ``errorcode``, ``stacktrace``, ``debuginfo``,
``reproductionlink``), not the REST server's.  Uploaded files are streamed to
disk, never held in memory; ``process_uploaded_artifact`` reassembles chunked
uploads (``<name>.chunk%09d.bin``), verifies the SHA-256 and stores the
archive where tests can read it (:attr:`SimJob.archive_path`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from .model import (
    PLUGINFILE,
    TASK_FAILED,
    TASK_FINISHED,
    UPLOAD,
    DraftFile,
    FileFault,
    RecordedCall,
    SimBackup,
    SimFile,
    SimJob,
    UploadRecord,
)
from .responses import ajax_error, php_json

if TYPE_CHECKING:
    from .server import MoodleSimulator

PLUGINFILE_PREFIX: Final = "/webservice/pluginfile.php"
IO_CHUNK: Final = 1 << 16
#: A trickling download sends one byte per interval, forever.
TRICKLE_INTERVAL_S: Final = 0.05
#: A stalled download sends this much before going silent.
STALL_AFTER_BYTES: Final = 1024

_QUIZ_CODES: Final = {
    "no_upload": "E_NO_ARTIFACT_UPLOAD_EXPECTED",
    "not_found": "E_UPLOADED_ARTIFACT_NOT_FOUND",
    "checksum": "E_ARTIFACT_CHECKSUM_INVALID",
}
_TASK_CODES: Final = {
    "no_upload": "E_NO_UPLOAD_EXPECTED",
    "not_found": "E_FILE_NOT_FOUND",
    "checksum": "E_CHECKSUM_MISMATCH",
}


def _not_found() -> web.Response:
    # send_file_not_found(): a 404 header, then the exception as JSON.
    return ajax_error(
        "filenotfound", "Sorry, the requested file could not be found", status=404
    )


# --- pluginfile.php ---------------------------------------------------------------


async def handle_pluginfile(
    sim: MoodleSimulator, request: web.Request
) -> web.StreamResponse:
    """Serve a file (HEAD or GET) to a caller with a valid ``token``."""
    query = [(k, v) for k, v in request.query.items() if k != "token"]
    sim.record(RecordedCall(request.method, request.path, None, dict(query), query))
    faulted = await sim.apply_fault(PLUGINFILE)
    if faulted is not None:
        return faulted
    job = sim.job_for_token(request.query.get("token"))
    if job is None:
        return ajax_error("invalidtoken", "Invalid token - token not found")
    file = job.find_file(request.path[len(PLUGINFILE_PREFIX) :])
    if file is None or (isinstance(file, SimBackup) and file.status != "SUCCESS"):
        return _not_found()

    return await _serve(sim, request, file)


async def _serve(
    sim: MoodleSimulator, request: web.Request, file: SimFile
) -> web.StreamResponse:
    fault = file.fault
    if fault is FileFault.JSON_ERROR:
        return ajax_error(
            "nopermissions",
            "Sorry, but you do not currently have permissions to do that.",
        )
    if fault is FileFault.NOT_FOUND:
        return _not_found()
    endless = fault in (FileFault.STALL, FileFault.TRICKLE, FileFault.ENDLESS)
    content_type = file.mimetype
    if fault is FileFault.WRONG_CONTENT_TYPE:
        content_type = "text/html; charset=utf-8"
    response = web.StreamResponse(headers={"Content-Type": content_type})
    if "forcedownload" in request.query:
        name = quote(PurePosixPath(file.path).name)
        response.headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{name}"
    if file.declared_size is not None:
        response.content_length = file.declared_size
    elif not endless:
        response.content_length = len(file.content)
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    with contextlib.suppress(ConnectionError):
        await _write_body(sim, response, file)

    return response


async def _write_body(
    sim: MoodleSimulator, response: web.StreamResponse, file: SimFile
) -> None:
    async def send(data: bytes) -> None:
        await response.write(data)
        file.bytes_sent += len(data)

    if file.fault is FileFault.STALL:
        await send((file.content or b"\0" * STALL_AFTER_BYTES)[:STALL_AFTER_BYTES])
        await sim.stopping.wait()
    elif file.fault is FileFault.TRICKLE:
        while not sim.stopping.is_set():
            await send(b"\0")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sim.stopping.wait(), TRICKLE_INTERVAL_S)
    elif file.fault is FileFault.ENDLESS:
        chunk = b"\0" * IO_CHUNK
        while not sim.stopping.is_set():
            await send(chunk)
    else:
        for start in range(0, len(file.content), IO_CHUNK):
            await send(file.content[start : start + IO_CHUNK])


# --- upload.php -----------------------------------------------------------------------


async def handle_upload(
    sim: MoodleSimulator, request: web.Request
) -> web.StreamResponse:
    """Store uploaded files in the token user's draft area (contract 2.6)."""
    fields: dict[str, str] = {}
    received: list[tuple[str, Path, int]] = []
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.filename is None:
                fields[part.name or ""] = await part.text()
            else:
                received.append(await _receive(sim, part))
    visible = [(k, v) for k, v in fields.items() if k != "token"]
    names = [name for name, _, _ in received]
    sim.record(
        RecordedCall(
            "POST", request.path, None, {**dict(visible), "files": names}, visible
        )
    )
    faulted = await sim.apply_fault(UPLOAD)
    job = sim.job_for_token(fields.get("token"))
    if faulted is not None or job is None:
        for _, path, _ in received:
            path.unlink(missing_ok=True)
        return faulted or ajax_error("invalidtoken", "Invalid token - token not found")

    return web.Response(
        text=php_json(_store(sim, job, fields, received)),
        content_type="application/json",
    )


async def _receive(sim: MoodleSimulator, part: BodyPartReader) -> tuple[str, Path, int]:
    """Stream one file part to disk; returns its cleaned name, path and size."""
    target = sim.storage_dir / "incoming" / secrets.token_hex(8)
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    size = 0
    fh = await asyncio.to_thread(target.open, "wb")
    try:
        while chunk := await part.read_chunk(IO_CHUNK):
            size += len(chunk)
            await asyncio.to_thread(fh.write, chunk)
    finally:
        await asyncio.to_thread(fh.close)

    return _clean_filename(part.filename or ""), target, size


def _clean_filename(name: str) -> str:
    # clean_param(PARAM_FILE): no path, no control characters.
    name = PurePosixPath(name.replace("\\", "/")).name
    return "".join(c for c in name if ord(c) >= 0x20 and c not in '"*:<>?|')


def _store(
    sim: MoodleSimulator,
    job: SimJob,
    fields: dict[str, str],
    received: list[tuple[str, Path, int]],
) -> list[dict[str, Any]]:
    filepath = fields.get("filepath") or "/"
    filearea = fields.get("filearea") or "draft"
    itemid = (
        int(fields.get("itemid", "0")) if fields.get("itemid", "0").isdigit() else 0
    )
    if itemid <= 0:
        itemid = sim.new_draft_itemid()
    record = UploadRecord(itemid=itemid, filepath=filepath)
    area = job.drafts.setdefault(itemid, {})
    results: list[dict[str, Any]] = []
    for name, path, size in received:
        error = None
        if job.max_upload_bytes is not None and size > job.max_upload_bytes:
            error = ("fileoversized", "This file is bigger than the maximum size")
        elif (filepath, name) in area:
            error = ("filenameexist", f"File name already exists: {name}")
        if error is not None:
            path.unlink(missing_ok=True)
            record.refused.append(name)
            results.append({"filename": name, "errortype": error[0], "error": error[1]})
            continue
        area[(filepath, name)] = DraftFile(
            itemid=itemid, filepath=filepath, filename=name, path=path, size=size
        )
        record.stored.append(name)
        results.append(_file_record(job, filearea, name, filepath, itemid))
    job.uploads.append(record)

    return results


def _file_record(
    job: SimJob, filearea: str, name: str, filepath: str, itemid: int
) -> dict[str, Any]:
    # The file record upload.php echoes; userid comes from the database as text.
    return {
        "component": "user",
        "contextid": job.user_contextid,
        "userid": str(job.userid),
        "filearea": filearea,
        "filename": name,
        "filepath": filepath,
        "itemid": itemid,
        "license": "unknown",
        "author": "Archive Service",
        "source": f'O:8:"stdClass":1:{{s:6:"source";s:{len(name.encode())}:"{name}";}}',
    }


# --- process_uploaded_artifact -------------------------------------------------------------


async def process_artifact(sim: MoodleSimulator, job: SimJob, p: dict[str, Any]) -> str:
    """Find, reassemble, verify and store the uploaded archive.

    Returns:
        The business status: ``OK`` (job FINISHED) or the flavour's error
        code (job FAILED, as every failure path in the plugins does).
    """
    codes = _QUIZ_CODES if job.is_quiz_archiver else _TASK_CODES
    if job.is_complete:
        return codes["no_upload"]
    count = p.get("artifact_count") or 1
    if count < 1:
        return _fail(job, "E_INVALID_ARTIFACT_COUNT")
    in_drafts = (p["artifact_component"], p["artifact_filearea"]) == ("user", "draft")
    same_user = p["artifact_contextid"] == job.user_contextid
    area = job.drafts.get(p["artifact_itemid"], {}) if in_drafts and same_user else {}
    key = (p["artifact_filepath"], p["artifact_filename"])
    if count > 1 and not await _reassemble(sim, area, key, count):
        return _fail(job, "E_CHUNK_REASSEMBLY_FAILED")
    draft = area.pop(key, None)
    if draft is None:
        return _fail(job, codes["not_found"])
    digest = await asyncio.to_thread(_sha256, draft.path)
    if digest != p["artifact_sha256sum"]:
        draft.path.unlink(missing_ok=True)
        return _fail(job, codes["checksum"])
    target = sim.storage_dir / "archives" / secrets.token_hex(4) / draft.filename
    await asyncio.to_thread(target.parent.mkdir, parents=True)
    await asyncio.to_thread(shutil.move, draft.path, target)
    job.archive_path, job.artifact_sha256, job.artifact_count = target, digest, count
    job.complete("FINISHED" if job.is_quiz_archiver else TASK_FINISHED)

    return "OK"


def _fail(job: SimJob, code: str) -> str:
    job.complete("FAILED" if job.is_quiz_archiver else TASK_FAILED)
    return code


async def _reassemble(
    sim: MoodleSimulator,
    area: dict[tuple[str, str], DraftFile],
    key: tuple[str, str],
    count: int,
) -> bool:
    """Concatenate ``<name>.chunk%09d.bin`` parts into ``<name>``; False if any lacks."""
    filepath, filename = key
    keys = [(filepath, f"{filename}.chunk{index:09d}.bin") for index in range(count)]
    if any(k not in area for k in keys):
        return False
    parts = [area.pop(k) for k in keys]
    target = sim.storage_dir / "incoming" / secrets.token_hex(8)
    size = await asyncio.to_thread(_concatenate, [d.path for d in parts], target)
    area[key] = DraftFile(
        itemid=parts[0].itemid,
        filepath=filepath,
        filename=filename,
        path=target,
        size=size,
    )

    return True


def _concatenate(sources: list[Path], target: Path) -> int:
    with target.open("wb") as out:
        for source in sources:
            with source.open("rb") as part:
                shutil.copyfileobj(part, out)
            source.unlink()
        return out.tell()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
