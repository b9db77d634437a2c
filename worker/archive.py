"""The working folder of one job and the ZIP built from it (contract 3.9-3.14).

A :class:`Workspace` hands out the paths the pipeline writes reports,
attachments, backups and the metadata CSV to, and remembers each one as an
*artifact*.  :meth:`Workspace.build` then packs the artifacts that exist into
``<archive_filename>.zip``, naming each member by the job's layout.

On disk the workspace always uses the hierarchical layout::

    attempts/<folder>/<filename>.pdf            submissions/<folder>/<filename>.pdf
    attempts/<folder>/<filename>.html           submissions/<folder>/<filename>.html
    attempts/<folder>/attachments/<slot>/<file> submissions/<folder>/<type>/<file>
    attempts_metadata.csv                       submissions_metadata.csv
    backups/<file>

(quiz flavours on the left, assign on the right).

Decisions where the contract leaves room:

* quiz_archiver archives are always hierarchical and always carry ``.sha256``
  sidecars, whatever ``archive_flatten``/``archive_filehashes`` say: the
  plugin cannot send those fields, the old worker always wrote sidecars, and
  quiz_archiver finds an attempt's files by the CSV ``path`` prefix, which
  only works in the hierarchical layout.
* CSV ``path``: quiz_archiver gets the old worker's form
  ``attempts/<folder>/<filename>`` (no extension), the local_archiving
  flavours the member name of the PDF (``attempts/<folder>/<filename>.pdf``
  or ``attempt_<id>.<filename>.pdf``).
* Flat attachment names (``attempt_<id>.<name>.attachment.<slot>.<file>``)
  use the report's file name as the attempt's or submission's name.
* Folder collisions follow the old worker: a folder that is already in use
  (as an item's folder, a parent of one, or an attachment folder) becomes
  ``<folder>_<id>``, then ``<folder>_<id>_2``, ... if that is taken as well.
* A name handed out twice (two attachments or backups with one name) and a
  member name already used in the archive (including a sidecar's name) get
  ``(1)``, ``(2)``, ... before the extension, with a WARNING.  PDFs are named
  first so that the CSV ``path`` always stays right.
* Only files handed out by this workspace are packed, and only if they exist
  at build time; a report whose PDF is missing fails the build.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from archive_worker.errors import ArchiveError, MoodleBadResponse
from archive_worker.events import Stage
from archive_worker.jobs import Flavour, JobSpec
from worker.archive_csv import PATH_COLUMN, write_metadata_csv
from worker.archive_names import (
    MAX_SEGMENT_BYTES,
    file_name_problem,
    first_free,
    folder_name_problem,
    relaxed_name_problem,
    segment_too_long,
)
from worker.archive_paths import DUPLICATE_NOTE, PathRegistry
from worker.archive_zip import (
    COMPRESSION_METHODS,
    SIDECAR_SUFFIX,
    sha256_file,
    write_zip,
)

log = logging.getLogger(__name__)

_BACKUP_DIR = PurePosixPath("backups")

#: Checks a name; returns what is wrong with it, or None.
_NameRule = Callable[[str], str | None]


class _Kind(enum.Enum):
    PDF = "pdf"
    HTML = "html"
    ATTACHMENT = "attachment"
    BACKUP = "backup"
    METADATA = "metadata"


@dataclass(frozen=True, eq=False)
class _Artifact:
    """One file of the job: where it lies on disk and its flat member name.

    Identity, not value, tells artifacts apart (``eq=False``).
    """

    kind: _Kind
    disk: PurePosixPath
    flat: str


@dataclass(frozen=True)
class BuiltArchive:
    """The ZIP written by :meth:`Workspace.build`."""

    path: Path
    #: SHA-256 of the whole ZIP, lowercase hex (sent as ``artifact_sha256sum``).
    sha256: str
    size: int
    #: Member names in archive order, sidecars included.
    members: list[str]


@dataclass(frozen=True)
class ReportSlot:
    """Where one attempt's or submission's files go.

    Created by :meth:`Workspace.add_report`; every path is already checked to
    stay inside the workspace and its parent folder exists.
    """

    item_id: int
    #: The final, collision-resolved folder name.
    folder: str
    #: Where the renderer writes the PDF.
    pdf: Path
    #: Where to write the HTML, if the job keeps HTML files.
    html: Path
    #: The report's base name from Moodle, without extension.
    filename: str
    _workspace: Workspace = field(repr=False, compare=False)

    def attachment_path(self, group: str, filename: str) -> Path:
        """Hand out the path for one attachment of this item.

        See :meth:`Workspace.attachment_path`.
        """
        return self._workspace.attachment_path(self, group, filename)


@dataclass
class _Item:
    slot: ReportSlot
    artifacts: list[_Artifact]


class Workspace:
    """On-disk working folder of one job; files are written as the job goes.

    The workspace does not clear ``root``: leftovers of an earlier delivery
    are never packed, because only paths handed out by this instance are.
    Methods are synchronous and not thread-safe; call them from one thread
    (the event loop's), except :meth:`write_metadata` and :meth:`build`,
    which may run in a worker thread once nothing else calls in.
    """

    def __init__(self, root: Path, spec: JobSpec) -> None:
        """Prepare the workspace for ``spec`` in ``root`` (created if missing).

        Raises:
            MoodleBadResponse: (stage ``pack``) the archive name is unusable.
            ArchiveError: ``root`` cannot be created.
        """
        self._spec = spec
        self._kind = spec.item_kind
        self._top = f"{self._kind}s"
        legacy = spec.flavour is Flavour.QUIZ_ARCHIVER
        self._flat = spec.archive_flatten and not legacy
        self._sidecars = spec.archive_filehashes or legacy
        if legacy and (spec.archive_flatten or not spec.archive_filehashes):
            log.warning(
                "workspace.options_ignored archive_flatten=%s archive_filehashes=%s "
                "reason='quiz_archiver archives are hierarchical with checksums'",
                spec.archive_flatten,
                spec.archive_filehashes,
            )
        self._check_archive_name(spec.archive_filename)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(
                f"cannot create workspace: {exc}", stage=Stage.PACK
            ) from exc
        self._paths = PathRegistry(root)
        self._items: dict[int, _Item] = {}
        self._backups: list[_Artifact] = []
        self._metadata: _Artifact | None = None

    @property
    def root(self) -> Path:
        """The workspace folder, resolved."""
        return self._paths.root

    @property
    def flat(self) -> bool:
        """True if the archive uses the flat layout (3.13.2)."""
        return self._flat

    @property
    def sidecars(self) -> bool:
        """True if every member gets a ``.sha256`` sidecar (3.12)."""
        return self._sidecars

    @property
    def archive_name(self) -> str:
        """File name of the ZIP, ``<archive_filename>.zip``."""
        return f"{self._spec.archive_filename}.zip"

    @property
    def metadata_filename(self) -> str:
        """``attempts_metadata.csv`` or ``submissions_metadata.csv``."""
        return f"{self._top}_metadata.csv"

    def add_report(self, item_id: int, foldername: str, filename: str) -> ReportSlot:
        """Register one attempt or submission and hand out its report paths.

        Args:
            item_id: the attempt or submission id.
            foldername: Moodle's folder name; may contain ``/``.
            filename: Moodle's report base name, without extension.

        Raises:
            MoodleBadResponse: (stage ``report``) a name breaks the rules of
                contract 2.2.2 or does not fit on the file system.
            ArchiveError: the item was already added.
        """
        stage = Stage.REPORT
        self._require(folder_name_problem, "folder name", foldername, stage, item_id)
        self._require(file_name_problem, "file name", filename, stage, item_id)
        if item_id in self._items:
            raise ArchiveError(
                f"{self._kind} {item_id} was added twice", stage=stage, attempt=item_id
            )
        folder = self._paths.free_folder(self._top, foldername, item_id)
        base = PurePosixPath(self._top, folder)
        pdf, html = (
            _Artifact(
                kind,
                base / f"{filename}.{kind.value}",
                f"{self._kind}_{item_id}.{filename}.{kind.value}",
            )
            for kind in (_Kind.PDF, _Kind.HTML)
        )
        pdf_path, html_path = self._paths.claim(
            [pdf.disk, html.disk], stage=stage, item_id=item_id
        )
        slot = ReportSlot(item_id, folder, pdf_path, html_path, filename, self)
        self._items[item_id] = _Item(slot, [pdf, html])
        log.debug("workspace.report_added item=%d folder=%s", item_id, folder)

        return slot

    def attachment_path(self, slot: ReportSlot, group: str, filename: str) -> Path:
        """Hand out the path for one attachment of ``slot``'s item.

        Quiz attachments go to ``attempts/<folder>/attachments/<slot>/``,
        assignment attachments to ``submissions/<folder>/<type>/``.  Each call
        registers a new artifact: a name handed out before in the same folder
        gets ``(1)``, ``(2)``, ... (Moodle drops the file's sub-path, so two
        files of one question can share a name).

        Args:
            slot: the item, as returned by :meth:`add_report`.
            group: the question slot (quiz) or attachment type (assign).
            filename: the attachment's file name from Moodle.

        Raises:
            MoodleBadResponse: (stage ``attachments``) a name is unsafe.
            ArchiveError: ``slot`` does not belong to this workspace.
        """
        stage, item_id = Stage.ATTACHMENTS, slot.item_id
        item = self._items.get(item_id)
        if item is None or item.slot is not slot:
            raise ArchiveError("unknown report slot", stage=stage, attempt=item_id)
        self._require(file_name_problem, "attachment group", group, stage, item_id)
        self._require(relaxed_name_problem, "attachment name", filename, stage, item_id)
        directory = PurePosixPath(self._top, slot.folder)
        flat_group = group
        if self._kind == "attempt":
            directory /= "attachments"
            flat_group = f"attachment.{group}"
        disk = self._paths.free_file(directory / group, filename)
        flat = f"{self._kind}_{item_id}.{slot.filename}.{flat_group}.{disk.name}"
        (path,) = self._paths.claim([disk], stage=stage, item_id=item_id)
        item.artifacts.append(_Artifact(_Kind.ATTACHMENT, disk, flat))

        return path

    def backup_path(self, filename: str) -> Path:
        """Hand out the path for a Moodle backup, under ``backups/``.

        Raises:
            MoodleBadResponse: (stage ``backup``) the name is unsafe.
        """
        self._require(
            relaxed_name_problem, "backup file name", filename, Stage.BACKUP, None
        )
        disk = self._paths.free_file(_BACKUP_DIR, filename)
        (path,) = self._paths.claim([disk], stage=Stage.BACKUP, item_id=None)
        self._backups.append(_Artifact(_Kind.BACKUP, disk, f"backup.{disk.name}"))

        return path

    def write_metadata(self, rows: list[dict[str, Any]]) -> None:
        """Write the metadata CSV at the workspace root (contract 3.10).

        Each row gets a ``path`` column (overwritten if present) pointing at
        the item's report: ``attempts/<folder>/<filename>`` for quiz_archiver,
        the PDF's member name for the local_archiving flavours.  Calling this
        again replaces the file.

        Args:
            rows: Moodle's metadata entries, in Moodle's order.

        Raises:
            ArchiveError: (stage ``metadata``) no rows, a row whose id was not
                added with :meth:`add_report`, or the file cannot be written.
        """
        id_key = f"{self._kind}id"
        if not rows:
            raise ArchiveError("Moodle returned no metadata", stage=Stage.METADATA)
        completed = [{**row, PATH_COLUMN: self._csv_path(row, id_key)} for row in rows]
        disk = PurePosixPath(self.metadata_filename)
        if self._metadata is None:
            self._paths.claim([disk], stage=Stage.METADATA, item_id=None)
            self._metadata = _Artifact(_Kind.METADATA, disk, disk.name)
        write_metadata_csv(self.root / disk, completed, id_key=id_key)

    def build(self, target_dir: Path, *, compression: str) -> BuiltArchive:
        """Pack every artifact that exists into ``<target_dir>/<archive_name>``.

        Members come in the order items were added (PDF, HTML, attachments),
        then the metadata CSV, then backups; each is followed by its sidecar
        when :attr:`sidecars` is on.  Files are streamed in chunks, so memory
        does not grow with their size.  The ZIP is written under a ``.part``
        name and renamed when complete.

        Args:
            target_dir: folder for the ZIP (created if missing).
            compression: ``STORED``, ``DEFLATED``, ``BZIP2`` or ``LZMA``.

        Raises:
            ArchiveError: (stage ``pack``) unknown compression, a report PDF
                was never written, or the ZIP cannot be written.
        """
        compress_type = COMPRESSION_METHODS.get(compression.upper())
        if compress_type is None:
            raise ArchiveError(
                f"unknown ZIP compression {compression!r}", stage=Stage.PACK
            )
        self._require_reports_written()
        entries = self._plan_members()
        target = target_dir / self.archive_name
        partial = target.with_name(f"{target.name}.part")
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            members = write_zip(
                partial, entries, compress_type=compress_type, sidecars=self._sidecars
            )
            partial.replace(target)
            digest, size = sha256_file(target), target.stat().st_size
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            raise ArchiveError(
                f"cannot write {target.name}: {exc}", stage=Stage.PACK
            ) from exc
        log.debug(
            "archive.written file=%s members=%d size=%d",
            target.name,
            len(members),
            size,
        )

        return BuiltArchive(target, digest, size, members)

    def _check_archive_name(self, name: str) -> None:
        def problem(name: str) -> str | None:
            if segment_too_long(f"{name}.zip.part"):
                return f"is longer than {MAX_SEGMENT_BYTES} bytes"
            return file_name_problem(name)

        self._require(problem, "archive file name", name, Stage.PACK, None)

    def _require(
        self, rule: _NameRule, what: str, name: str, stage: str, item_id: int | None
    ) -> None:
        problem = rule(name)
        if problem is None:
            return
        owner = "" if item_id is None else f"{self._kind} {item_id}: "
        raise MoodleBadResponse(
            f"{owner}{what} {name!r} {problem}", stage=stage, attempt=item_id
        )

    def _csv_path(self, row: dict[str, Any], id_key: str) -> str:
        raw = row.get(id_key)
        item_id = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        item = self._items.get(item_id) if item_id is not None else None
        if item is None:
            raise ArchiveError(
                f"metadata names {id_key} {raw!r}, which was not rendered",
                stage=Stage.METADATA,
                attempt=item_id,
            )
        if self._spec.flavour is Flavour.QUIZ_ARCHIVER:
            return f"{self._top}/{item.slot.folder}/{item.slot.filename}"
        return self._member_name(item.artifacts[0])

    def _member_name(self, artifact: _Artifact) -> str:
        return artifact.flat if self._flat else artifact.disk.as_posix()

    def _artifacts(self) -> Iterator[_Artifact]:
        for item in self._items.values():
            yield from item.artifacts
        if self._metadata is not None:
            yield self._metadata
        yield from self._backups

    def _require_reports_written(self) -> None:
        for item_id, item in self._items.items():
            if not item.slot.pdf.is_file():
                raise ArchiveError(
                    f"the report PDF of {self._kind} {item_id} was never written",
                    stage=Stage.PACK,
                    attempt=item_id,
                )

    def _plan_members(self) -> list[tuple[Path, str]]:
        """Pair each existing artifact with a unique member name.

        A name is free if neither it nor its sidecar name is used yet.  PDFs
        are named first: the CSV already holds their names, and no other PDF
        or sidecar can claim them, so they are never renamed.
        """
        present = [a for a in self._artifacts() if (self.root / a.disk).is_file()]
        taken: set[str] = set()
        names: dict[_Artifact, str] = {}

        def is_taken(name: str) -> bool:
            return name in taken or (self._sidecars and name + SIDECAR_SUFFIX in taken)

        for artifact in sorted(present, key=lambda a: a.kind is not _Kind.PDF):
            wanted = self._member_name(artifact)
            name = names[artifact] = first_free(wanted, is_taken)
            if name != wanted:
                log.warning(
                    "archive.member_renamed member=%s renamed=%s: name %s",
                    wanted,
                    name,
                    DUPLICATE_NOTE,
                )
            taken.update({name, name + SIDECAR_SUFFIX} if self._sidecars else {name})

        return [(self.root / a.disk, names[a]) for a in present]
