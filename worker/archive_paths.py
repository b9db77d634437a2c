"""Which paths of a job's working folder are handed out already.

The names in these paths come from Moodle.  Before a path is handed out it is
checked once more as a whole, after the per-name rules of
:mod:`worker.archive_names`: every segment must fit on the file system, the
path must not run through a file handed out earlier, and, resolved, it must
stay inside the workspace.  The registry also answers "is this folder in
use?", which drives the old worker's folder collision scheme.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from archive_worker.errors import ArchiveError, MoodleBadResponse
from worker.archive_names import MAX_SEGMENT_BYTES, first_free, segment_too_long

log = logging.getLogger(__name__)

#: Phrase in every warning about a renamed file or member (contract 3.13.2).
DUPLICATE_NOTE = "already used by another artifact"


class PathRegistry:
    """The files handed out below one root, and the folders that hold them.

    Paths are relative :class:`PurePosixPath` objects; a folder counts as in
    use once any handed-out file lies below it, just as it would exist on
    disk after a write.
    """

    def __init__(self, root: Path) -> None:
        """Track paths below ``root``, which must exist."""
        self.root = root.resolve()
        self._files: set[PurePosixPath] = set()
        self._dirs: set[PurePosixPath] = set()

    def is_taken(self, path: PurePosixPath) -> bool:
        """True if ``path`` is a handed-out file or a folder holding one."""
        return path in self._files or path in self._dirs

    def free_folder(self, top: str, foldername: str, item_id: int) -> str:
        """Resolve a folder collision the way the old worker did.

        Returns ``foldername`` if ``<top>/<foldername>`` is free, else
        ``<foldername>_<item_id>``, else ``<foldername>_<item_id>_2``, ...
        """
        folder = foldername
        number = 1
        while self.is_taken(PurePosixPath(top, folder)):
            suffix = f"_{item_id}" if number == 1 else f"_{item_id}_{number}"
            folder = f"{foldername}{suffix}"
            number += 1
        if folder != foldername:
            log.warning(
                "workspace.folder_renamed item=%d folder=%s renamed=%s",
                item_id,
                foldername,
                folder,
            )
        return folder

    def free_file(self, directory: PurePosixPath, filename: str) -> PurePosixPath:
        """``directory/filename``, numbered ``(1)``, ``(2)``, ... if taken."""
        name = first_free(
            filename, lambda candidate: self.is_taken(directory / candidate)
        )
        if name != filename:
            log.warning(
                "workspace.file_renamed file=%s renamed=%s: name %s",
                directory / filename,
                name,
                DUPLICATE_NOTE,
            )
        return directory / name

    def claim(
        self, paths: Sequence[PurePosixPath], *, stage: str, item_id: int | None
    ) -> list[Path]:
        """Check ``paths``, then register them and create their folders.

        Either every path is claimed or none is.

        Returns:
            The absolute paths, in the order given.

        Raises:
            MoodleBadResponse: a segment is too long, or a path runs through
                a file handed out earlier.
            ArchiveError: a path leaves the root, or a folder cannot be made.
        """
        for path in paths:
            self._check(path, stage, item_id)
        for path in paths:
            self._register(path, stage, item_id)

        return [self.root / path for path in paths]

    def _check(self, path: PurePosixPath, stage: str, item_id: int | None) -> None:
        for part in path.parts:
            if segment_too_long(part):
                raise MoodleBadResponse(
                    f"name {part!r} is longer than {MAX_SEGMENT_BYTES} bytes",
                    stage=stage,
                    attempt=item_id,
                )
        for parent in path.parents:
            if parent in self._files:
                raise MoodleBadResponse(
                    f"path {str(path)!r} would lie inside the file {str(parent)!r}",
                    stage=stage,
                    attempt=item_id,
                )
        # Defence in depth: the name rules already exclude '..' and absolute
        # paths, but a symlink planted in the workspace would slip through.
        if not (self.root / path).resolve().is_relative_to(self.root):
            raise ArchiveError(
                f"path {str(path)!r} leaves the workspace", stage=stage, attempt=item_id
            )

    def _register(self, path: PurePosixPath, stage: str, item_id: int | None) -> None:
        try:
            (self.root / path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArchiveError(
                f"cannot create the folder of {str(path)!r}: {exc}",
                stage=stage,
                attempt=item_id,
            ) from exc
        self._files.add(path)
        self._dirs.update(parent for parent in path.parents if parent.parts)
