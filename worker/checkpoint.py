"""Checkpoints of rendered items, so that a redelivered job resumes.

Rendering is the expensive part of a job.  Once an attempt or submission is
done (report fetched, PDF rendered and post-processed, attachments
downloaded), the pipeline stores one object per item in the JetStream object
store ``ARCHIVE_CHECKPOINTS``, named ``<job id>/<item id>``.  When the job
comes back after a crash, a lost lease or a transient failure, every item
with a checkpoint skips both the Moodle report call and the render.

What a checkpoint holds, and what it does not:

* Moodle's folder and file name for the item, so that the item is added to
  the workspace under the same names and in the original report order, which
  keeps folder-collision handling deterministic;
* the final PDF (after PDF/A conversion and image optimisation);
* the report HTML, only if the job keeps HTML files;
* the attachment *descriptions* (URL, size, SHA-1), not their bytes.
  Attachments are downloaded again on resume: they can be up to
  ``attachment_max_bytes`` each (1.28 GB by default), storing them would
  double their footprint in NATS, and the download is verified against
  Moodle's SHA-1 anyway, so a resumed archive is byte-for-byte what a fresh
  run would build.

Checkpoints are an optimisation: a failure to read or write one is logged
and the item is simply done again.  They are removed when the job reaches
any terminal state; the bucket's TTL (the jobs stream's ``max_age``) removes
what a crash leaves behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import msgspec

from archive_worker.errors import BrokerError
from archive_worker.moodle import Attachment, Report

log = logging.getLogger(__name__)

#: Layout version of a checkpoint object; others are ignored (item redone).
CHECKPOINT_SCHEMA = 1
#: Checkpoints deleted at the same time when a job ends.
_DELETE_CONCURRENCY = 8


class CheckpointStore(Protocol):
    """The object store operations checkpoints need (:class:`Broker` has them)."""

    async def put_checkpoint(self, name: str, data: bytes) -> None:
        """Store or replace one object."""

    async def get_checkpoint(self, name: str) -> bytes | None:
        """One object, or None."""

    async def delete_checkpoint(self, name: str) -> bool:
        """Remove one object; False if there was none."""


class SavedAttachment(msgspec.Struct, frozen=True, kw_only=True):
    """An attachment as Moodle described it; downloaded again on resume."""

    group: str
    filename: str
    filesize: int
    mimetype: str
    contenthash: str
    download_url: str


class ItemCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to put one finished item back into a workspace."""

    schema: int = CHECKPOINT_SCHEMA
    item_id: int
    foldername: str
    filename: str
    pdf: bytes
    html: str | None = None
    attachments: list[SavedAttachment] = []

    def report(self) -> Report:
        """The item's report as if Moodle had just answered (HTML may be '')."""
        return Report(
            item_id=self.item_id,
            foldername=self.foldername,
            filename=self.filename,
            html=self.html or "",
            attachments=[
                Attachment(
                    group=a.group,
                    filename=a.filename,
                    filesize=a.filesize,
                    mimetype=a.mimetype,
                    contenthash=a.contenthash,
                    download_url=a.download_url,
                    item_id=self.item_id,
                )
                for a in self.attachments
            ],
        )

    def write(self, pdf: Path, html: Path | None) -> None:
        """Write the PDF (and the HTML, if kept and asked for) to disk."""
        pdf.write_bytes(self.pdf)
        if html is not None and self.html is not None:
            html.write_text(self.html, encoding="utf-8")


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ItemCheckpoint)


def checkpoint_name(job_id: str, item_id: int) -> str:
    """Object name of one item's checkpoint."""
    return f"{job_id}/{item_id}"


class JobCheckpoints:
    """The checkpoints of one job delivery.

    Args:
        store: the object store (the broker).
        job_id: the job.
        resume: look for checkpoints; False on a first delivery, which
            cannot have any and so saves one lookup per item.
    """

    def __init__(self, store: CheckpointStore, job_id: str, *, resume: bool) -> None:
        self._store = store
        self.job_id = job_id
        self.resume = resume
        #: Items restored from a checkpoint in this delivery.
        self.restored: list[int] = []
        #: Items checkpointed in this delivery.
        self.saved: list[int] = []

    async def load(self, item_id: int) -> ItemCheckpoint | None:
        """The checkpoint of ``item_id``, or None if the item must be done."""
        if not self.resume:
            return None
        name = checkpoint_name(self.job_id, item_id)
        try:
            data = await self._store.get_checkpoint(name)
        except BrokerError as exc:
            log.warning("checkpoint.read_failed item=%d error=%s", item_id, exc)
            return None
        if data is None:
            return None
        try:
            saved = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            log.warning("checkpoint.undecodable item=%d error=%s", item_id, exc)
            return None
        if saved.schema != CHECKPOINT_SCHEMA or saved.item_id != item_id:
            log.warning("checkpoint.ignored item=%d schema=%d", item_id, saved.schema)
            return None
        self.restored.append(item_id)
        log.info("checkpoint.restored item=%d", item_id)

        return saved

    async def save(self, report: Report, pdf: Path, *, keep_html: bool) -> None:
        """Checkpoint a finished item; failures are logged, not raised."""
        try:
            data = await asyncio.to_thread(pdf.read_bytes)
        except OSError as exc:
            log.warning("checkpoint.not_saved item=%d error=%s", report.item_id, exc)
            return
        saved = ItemCheckpoint(
            item_id=report.item_id,
            foldername=report.foldername,
            filename=report.filename,
            pdf=data,
            html=report.html if keep_html else None,
            attachments=[
                SavedAttachment(
                    group=a.group,
                    filename=a.filename,
                    filesize=a.filesize,
                    mimetype=a.mimetype,
                    contenthash=a.contenthash,
                    download_url=a.download_url,
                )
                for a in report.attachments
            ],
        )
        name = checkpoint_name(self.job_id, report.item_id)
        payload = await asyncio.to_thread(_encoder.encode, saved)
        try:
            await self._store.put_checkpoint(name, payload)
        except BrokerError as exc:
            log.warning("checkpoint.not_saved item=%d error=%s", report.item_id, exc)
            return
        self.saved.append(report.item_id)
        log.debug("checkpoint.saved item=%d bytes=%d", report.item_id, len(data))


async def clear_checkpoints(
    store: CheckpointStore, job_id: str, item_ids: Iterable[int]
) -> int:
    """Remove the checkpoints of a job that ended; failures are logged.

    Args:
        store: the object store.
        job_id: the job.
        item_ids: every item of the job (a checkpoint may come from any
            earlier delivery, in any process).

    Returns:
        How many checkpoints were removed.
    """
    slots = asyncio.Semaphore(_DELETE_CONCURRENCY)

    async def delete(item_id: int) -> bool:
        async with slots:
            try:
                return await store.delete_checkpoint(checkpoint_name(job_id, item_id))
            except BrokerError as exc:
                log.warning("checkpoint.not_deleted item=%d error=%s", item_id, exc)
                return False

    removed = sum(await asyncio.gather(*(delete(i) for i in item_ids)))
    if removed:
        log.debug("checkpoint.cleared job_id=%s count=%d", job_id, removed)

    return removed
