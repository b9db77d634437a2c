"""The job workspace, the metadata CSV and the ZIP built from them."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest

from archive_worker.errors import ArchiveError, MoodleBadResponse
from archive_worker.jobs import Flavour, JobSpec, MoodleEndpoint
from worker.archive import ReportSlot, Workspace
from worker.archive_names import numbered

QUIZ_ARCHIVER = Flavour.QUIZ_ARCHIVER
AQ = Flavour.ARCHIVINGMOD_QUIZ
AA = Flavour.ARCHIVINGMOD_ASSIGN


def _spec(
    flavour: Flavour = AQ,
    *,
    flatten: bool = False,
    filehashes: bool = True,
    archive_filename: str = "archive",
) -> JobSpec:
    return JobSpec(
        job_id="job-1",
        flavour=flavour,
        moodle=MoodleEndpoint(
            base_url="http://moodle",
            ws_url="http://moodle/webservice/rest/server.php",
            upload_url="http://moodle/webservice/upload.php",
            token="secret",
        ),
        archive_filename=archive_filename,
        archive_flatten=flatten,
        archive_filehashes=filehashes,
    )


def _workspace(tmp_path: Path, flavour: Flavour = AQ, **options: Any) -> Workspace:
    return Workspace(tmp_path / "work", _spec(flavour, **options))


def _report(
    ws: Workspace, item_id: int, folder: str, filename: str, *, html: bool = False
) -> ReportSlot:
    slot = ws.add_report(item_id, folder, filename)
    slot.pdf.write_bytes(b"%PDF " + str(item_id).encode())
    if html:
        slot.html.write_text(f"<p>{item_id}</p>", encoding="utf-8")
    return slot


def _attach(slot: ReportSlot, group: str, filename: str) -> Path:
    path = slot.attachment_path(group, filename)
    path.write_bytes(f"{group}/{filename}".encode())
    return path


def _build(ws: Workspace, tmp_path: Path, compression: str = "DEFLATED") -> Path:
    return ws.build(tmp_path / "out", compression=compression).path


def _members(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def _read(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _without_sidecars(members: list[str]) -> list[str]:
    return [m for m in members if not m.endswith(".sha256")]


def _quiz_rows(*ids: int) -> list[dict[str, Any]]:
    return [
        {"attemptid": i, "userid": i - 20, "username": f"anon{i}", "state": "finished"}
        for i in ids
    ]


def _files_below(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir())


class TestLayout:
    """Member names and order for every flavour and layout."""

    def _quiz_job(self, ws: Workspace) -> None:
        slot = _report(ws, 24, "anon2/24-2024", "attempt-24", html=True)
        _attach(slot, "3", "answer.png")
        _report(ws, 25, "anon3/25-2024", "attempt-25")
        ws.write_metadata(_quiz_rows(24, 25))

    def _assign_job(self, ws: Workspace) -> None:
        slot = _report(ws, 101, "student1", "submission-101", html=True)
        _attach(slot, "submission", "essay.docx")
        _attach(slot, "feedback", "notes.pdf")
        ws.write_metadata([{"submissionid": 101, "userid": 5, "status": "submitted"}])

    def test_quiz_hierarchical(self, tmp_path: Path) -> None:
        """Quiz items land under attempts/<folder>, each member with a sidecar."""
        ws = _workspace(tmp_path, AQ)
        self._quiz_job(ws)

        assert _members(_build(ws, tmp_path)) == [
            "attempts/anon2/24-2024/attempt-24.pdf",
            "attempts/anon2/24-2024/attempt-24.pdf.sha256",
            "attempts/anon2/24-2024/attempt-24.html",
            "attempts/anon2/24-2024/attempt-24.html.sha256",
            "attempts/anon2/24-2024/attachments/3/answer.png",
            "attempts/anon2/24-2024/attachments/3/answer.png.sha256",
            "attempts/anon3/25-2024/attempt-25.pdf",
            "attempts/anon3/25-2024/attempt-25.pdf.sha256",
            "attempts_metadata.csv",
            "attempts_metadata.csv.sha256",
        ]

    def test_quiz_flat_without_sidecars(self, tmp_path: Path) -> None:
        """A flat quiz archive puts everything at the root under item-prefixed names."""
        ws = _workspace(tmp_path, AQ, flatten=True, filehashes=False)
        self._quiz_job(ws)

        assert _members(_build(ws, tmp_path)) == [
            "attempt_24.attempt-24.pdf",
            "attempt_24.attempt-24.html",
            "attempt_24.attempt-24.attachment.3.answer.png",
            "attempt_25.attempt-25.pdf",
            "attempts_metadata.csv",
        ]

    def test_assign_hierarchical_without_sidecars(self, tmp_path: Path) -> None:
        """Assign items land under submissions/<folder>/<type>."""
        ws = _workspace(tmp_path, AA, filehashes=False)
        self._assign_job(ws)

        assert _members(_build(ws, tmp_path)) == [
            "submissions/student1/submission-101.pdf",
            "submissions/student1/submission-101.html",
            "submissions/student1/submission/essay.docx",
            "submissions/student1/feedback/notes.pdf",
            "submissions_metadata.csv",
        ]

    def test_assign_flat(self, tmp_path: Path) -> None:
        """Flat assign names carry the submission id, name and attachment type."""
        ws = _workspace(tmp_path, AA, flatten=True)
        self._assign_job(ws)

        assert _without_sidecars(_members(_build(ws, tmp_path))) == [
            "submission_101.submission-101.pdf",
            "submission_101.submission-101.html",
            "submission_101.submission-101.submission.essay.docx",
            "submission_101.submission-101.feedback.notes.pdf",
            "submissions_metadata.csv",
        ]

    @pytest.mark.parametrize("flatten", [False, True])
    def test_sidecar_follows_each_member(self, tmp_path: Path, flatten: bool) -> None:
        """With file hashes on, every member is directly followed by its sidecar."""
        ws = _workspace(tmp_path, AA, flatten=flatten)
        self._assign_job(ws)

        members = _members(_build(ws, tmp_path))

        assert members[1::2] == [m + ".sha256" for m in members[0::2]]

    def test_backups_hierarchical_and_flat(self, tmp_path: Path) -> None:
        """Backups go to backups/<file>, or backup.<file> when flat."""
        tree = _workspace(tmp_path / "a", AQ, filehashes=False)
        flat = _workspace(tmp_path / "b", AQ, flatten=True, filehashes=False)
        for ws in (tree, flat):
            ws.backup_path("course-9.mbz").write_bytes(b"backup")

        assert _members(_build(tree, tmp_path / "a")) == ["backups/course-9.mbz"]
        assert _members(_build(flat, tmp_path / "b")) == ["backup.course-9.mbz"]

    def test_quiz_archiver_is_always_hierarchical_with_sidecars(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """quiz_archiver ignores archive_flatten and archive_filehashes, with a warning."""
        ws = _workspace(tmp_path, QUIZ_ARCHIVER, flatten=True, filehashes=False)
        _report(ws, 24, "f", "a")
        ws.backup_path("activity-23.mbz").write_bytes(b"mbz")

        assert _members(_build(ws, tmp_path)) == [
            "attempts/f/a.pdf",
            "attempts/f/a.pdf.sha256",
            "backups/activity-23.mbz",
            "backups/activity-23.mbz.sha256",
        ]
        assert "workspace.options_ignored" in caplog.text

    def test_only_written_files_are_packed(self, tmp_path: Path) -> None:
        """Handed-out paths nobody wrote to, and stray files, stay out of the ZIP."""
        ws = _workspace(tmp_path, AQ, filehashes=False)
        slot = _report(ws, 24, "f", "a")
        slot.attachment_path("1", "never-downloaded.png")
        (ws.root / "attempts" / "f" / "stray.tmp").write_bytes(b"x")

        assert _members(_build(ws, tmp_path)) == ["attempts/f/a.pdf"]

    def test_missing_pdf_fails_the_build(self, tmp_path: Path) -> None:
        """A registered report whose PDF was never written is an ArchiveError."""
        ws = _workspace(tmp_path)
        ws.add_report(24, "f", "a")

        with pytest.raises(ArchiveError) as info:
            _build(ws, tmp_path)

        assert (info.value.stage, info.value.attempt) == ("pack", 24)

    def test_unicode_names_round_trip(self, tmp_path: Path) -> None:
        """Non-ASCII folder and file names come back unchanged from the ZIP."""
        ws = _workspace(tmp_path, AQ, filehashes=False)
        _report(ws, 7, "Zoë/名前", "Prüfung 7")

        assert _members(_build(ws, tmp_path)) == ["attempts/Zoë/名前/Prüfung 7.pdf"]

    def test_zip_has_file_entries_only(self, tmp_path: Path) -> None:
        """No directory entries are written."""
        ws = _workspace(tmp_path, AA)
        self._assign_job(ws)

        with zipfile.ZipFile(_build(ws, tmp_path)) as archive:
            assert not any(info.is_dir() for info in archive.infolist())
            assert archive.testzip() is None


class TestChecksums:
    """SHA-256 sidecars and the digest of the whole ZIP."""

    def test_sidecars_hold_the_member_sha256(self, tmp_path: Path) -> None:
        """Each sidecar is exactly the 64 lowercase hex digits of its member."""
        ws = _workspace(tmp_path, QUIZ_ARCHIVER)
        slot = _report(ws, 24, "f", "a", html=True)
        _attach(slot, "2", "x.bin")
        ws.write_metadata(_quiz_rows(24))

        contents = _read(_build(ws, tmp_path))
        sidecars = {n: d for n, d in contents.items() if n.endswith(".sha256")}

        assert len(sidecars) == len(contents) / 2
        for name, digest in sidecars.items():
            expected = hashlib.sha256(contents[name.removesuffix(".sha256")])
            assert digest == expected.hexdigest().encode("ascii")

    def test_built_archive_describes_the_zip(self, tmp_path: Path) -> None:
        """sha256, size, path and members of the result match the file on disk."""
        ws = _workspace(tmp_path, AA)
        _report(ws, 101, "s", "r")

        built = ws.build(tmp_path / "out", compression="DEFLATED")
        data = built.path.read_bytes()

        assert built.path == tmp_path / "out" / "archive.zip"
        assert built.sha256 == hashlib.sha256(data).hexdigest()
        assert built.size == len(data)
        assert built.members == _members(built.path)
        assert list((tmp_path / "out").iterdir()) == [built.path]


class TestMetadataCsv:
    """attempts_metadata.csv / submissions_metadata.csv, byte for byte."""

    def test_exact_bytes(self, tmp_path: Path) -> None:
        """Strings quoted, numbers bare, CRLF, UTF-8, path appended last."""
        ws = _workspace(tmp_path, QUIZ_ARCHIVER)
        _report(ws, 24, "anon2/24-2024-06-04_16-08-57", "attempt-24")
        _report(ws, 25, "anon3/25-2024-06-04_16-09-00", "attempt-25")
        row = {
            "attemptid": 24,
            "userid": 2,
            "username": "anon2",
            "firstname": 'Ann "A"',
            "lastname": "Öz",
            "idnumber": "",
            "timestart": 1701169729,
            "timefinish": 1701169823,
            "attempt": 1,
            "state": "finished",
        }
        rows = [row, {**row, "attemptid": 25, "userid": 3, "firstname": "Bo"}]

        ws.write_metadata(rows)

        assert (ws.root / "attempts_metadata.csv").read_bytes() == (
            b'"attemptid","userid","username","firstname","lastname","idnumber",'
            b'"timestart","timefinish","attempt","state","path"\r\n'
            b'24,2,"anon2","Ann ""A""","\xc3\x96z","",1701169729,1701169823,1,'
            b'"finished","attempts/anon2/24-2024-06-04_16-08-57/attempt-24"\r\n'
            b'25,3,"anon2","Bo","\xc3\x96z","",1701169729,1701169823,1,'
            b'"finished","attempts/anon3/25-2024-06-04_16-09-00/attempt-25"\r\n'
        )

    def test_value_types(self, tmp_path: Path) -> None:
        """Bools become 1/0, null an empty quoted field, nested values JSON."""
        ws = _workspace(tmp_path, AQ, flatten=True)
        _report(ws, 24, "f", "a")
        row = {"attemptid": 24, "ok": True, "no": False, "x": None, "f": 1.5}

        ws.write_metadata([{**row, "tags": ["a", 1], "extra": {"k": "v"}}])

        assert (ws.root / "attempts_metadata.csv").read_bytes() == (
            b'"attemptid","ok","no","x","f","tags","extra","path"\r\n'
            b'24,1,0,"",1.5,"[""a"",1]","{""k"":""v""}","attempt_24.a.pdf"\r\n'
        )

    @pytest.mark.parametrize(
        ("flavour", "flatten", "expected"),
        [
            (QUIZ_ARCHIVER, False, "attempts/u/24/attempt-24"),
            (AQ, False, "attempts/u/24/attempt-24.pdf"),
            (AQ, True, "attempt_24.attempt-24.pdf"),
            (AA, False, "submissions/u/24/attempt-24.pdf"),
            (AA, True, "submission_24.attempt-24.pdf"),
        ],
    )
    def test_path_column(
        self, tmp_path: Path, flavour: Flavour, flatten: bool, expected: str
    ) -> None:
        """The path column has each flavour's form and points into the ZIP."""
        ws = _workspace(tmp_path, flavour, flatten=flatten)
        _report(ws, 24, "u/24", "attempt-24")
        id_key = "submissionid" if flavour is AA else "attemptid"
        ws.write_metadata([{id_key: 24}])

        contents = _read(_build(ws, tmp_path))
        csv_text = contents[ws.metadata_filename].decode("utf-8")

        assert csv_text.endswith(f',"{expected}"\r\n')
        assert any(member.startswith(expected) for member in contents)

    def test_existing_path_column_keeps_its_position(self, tmp_path: Path) -> None:
        """A path key sent by Moodle is overwritten where it stands."""
        ws = _workspace(tmp_path, QUIZ_ARCHIVER)
        _report(ws, 24, "f", "a")

        ws.write_metadata([{"attemptid": 24, "path": "/old", "state": "finished"}])

        assert (ws.root / "attempts_metadata.csv").read_bytes() == (
            b'"attemptid","path","state"\r\n24,"attempts/f/a","finished"\r\n'
        )

    def test_empty_rows_fail(self, tmp_path: Path) -> None:
        """No metadata at all is an error of the metadata stage."""
        ws = _workspace(tmp_path)

        with pytest.raises(ArchiveError) as info:
            ws.write_metadata([])

        assert info.value.stage == "metadata"

    @pytest.mark.parametrize("attemptid", [99, "24", None, True])
    def test_unrendered_id_fails(self, tmp_path: Path, attemptid: object) -> None:
        """A row whose id was never added as a report is refused."""
        ws = _workspace(tmp_path)
        _report(ws, 24, "f", "a")

        with pytest.raises(ArchiveError) as info:
            ws.write_metadata([{"attemptid": attemptid}])

        assert info.value.stage == "metadata"
        assert info.value.attempt == (99 if attemptid == 99 else None)
        assert not (ws.root / "attempts_metadata.csv").exists()

    def test_row_with_unknown_column_fails(self, tmp_path: Path) -> None:
        """A later row with a key the header lacks names its attempt."""
        ws = _workspace(tmp_path)
        _report(ws, 24, "f", "a")
        _report(ws, 25, "g", "a")

        with pytest.raises(ArchiveError) as info:
            ws.write_metadata([{"attemptid": 24}, {"attemptid": 25, "new": 1}])

        assert (info.value.stage, info.value.attempt) == ("metadata", 25)


class TestCollisions:
    """Folder collisions and duplicate names."""

    def test_same_folder_and_file_get_distinct_folders(self, tmp_path: Path) -> None:
        """The second item's folder becomes <folder>_<id>, and the CSV follows."""
        ws = _workspace(tmp_path, QUIZ_ARCHIVER)
        first = _report(ws, 24, "anon/x", "attempt")
        second = _report(ws, 25, "anon/x", "attempt")
        ws.write_metadata(_quiz_rows(24, 25))

        contents = _read(_build(ws, tmp_path))

        assert (first.folder, second.folder) == ("anon/x", "anon/x_25")
        assert contents["attempts/anon/x/attempt.pdf"] == b"%PDF 24"
        assert contents["attempts/anon/x_25/attempt.pdf"] == b"%PDF 25"
        csv_lines = contents["attempts_metadata.csv"].split(b"\r\n")
        assert csv_lines[1].endswith(b',"attempts/anon/x/attempt"')
        assert csv_lines[2].endswith(b',"attempts/anon/x_25/attempt"')

    def test_collision_scheme_is_deterministic(self, tmp_path: Path) -> None:
        """Parents count as used, and a used <folder>_<id> gets a further _<n>."""
        ws = _workspace(tmp_path)

        folders = [
            ws.add_report(1, "a/b", "r").folder,
            ws.add_report(2, "a", "r").folder,
            ws.add_report(3, "f", "r").folder,
            ws.add_report(4, "f_5", "r").folder,
            ws.add_report(5, "f", "r").folder,
        ]

        assert folders == ["a/b", "a_2", "f", "f_5", "f_5_2"]

    def test_duplicate_attachment_names_are_numbered(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Attachments sharing a name in one slot get (1), (2) before the extension."""
        ws = _workspace(tmp_path, AQ, flatten=True, filehashes=False)
        slot = _report(ws, 24, "f", "a")
        paths = [_attach(slot, "1", "dup.txt") for _ in range(3)]

        members = _members(_build(ws, tmp_path))

        assert [p.name for p in paths] == ["dup.txt", "dup(1).txt", "dup(2).txt"]
        assert members[1:] == [
            "attempt_24.a.attachment.1.dup.txt",
            "attempt_24.a.attachment.1.dup(1).txt",
            "attempt_24.a.attachment.1.dup(2).txt",
        ]
        assert caplog.text.count("already used by another artifact") == 2

    def test_member_clashing_with_a_sidecar_is_numbered(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A flat name whose sidecar name is taken moves on to (1), then (2)."""
        ws = _workspace(tmp_path, AQ, flatten=True)
        slot = _report(ws, 24, "f", "a")
        for name in ("x.txt.sha256", "x(1).txt", "x.txt"):
            _attach(slot, "1", name)

        members = _members(_build(ws, tmp_path))

        assert members[2::2] == [
            "attempt_24.a.attachment.1.x.txt.sha256",
            "attempt_24.a.attachment.1.x(1).txt",
            "attempt_24.a.attachment.1.x(2).txt",
        ]
        assert members[3::2] == [m + ".sha256" for m in members[2::2]]
        assert "already used by another artifact" in caplog.text

    def test_duplicate_backup_names_are_numbered(self, tmp_path: Path) -> None:
        """Two backups with one file name both reach the archive."""
        ws = _workspace(tmp_path, QUIZ_ARCHIVER, filehashes=False)
        for _ in range(2):
            ws.backup_path("b.mbz").write_bytes(b"mbz")

        assert _without_sidecars(_members(_build(ws, tmp_path))) == [
            "backups/b.mbz",
            "backups/b(1).mbz",
        ]

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("duplicate.txt", "duplicate(2).txt"),
            ("noext", "noext(2)"),
            (".profile", ".profile(2)"),
            ("a.tar.gz", "a.tar(2).gz"),
            ("dir.x/file", "dir.x/file(2)"),
        ],
    )
    def test_numbered(self, name: str, expected: str) -> None:
        """The number goes before the last extension of the last segment."""
        assert numbered(name, 2) == expected


HOSTILE_NAMES = ["../x", "/etc", "a/../../b", "a\\b", "a\x00b", "a\nb", ".", ".."]


class TestHostileNames:
    """Names from Moodle that must never become paths."""

    @pytest.mark.parametrize(
        "name", [*HOSTILE_NAMES, "a:b", "a*b", "", "a/", "a//b", "x\x7f"]
    )
    def test_folder_name(self, tmp_path: Path, name: str) -> None:
        """A bad folder name is refused, naming the item, and nothing is written."""
        ws = _workspace(tmp_path)

        with pytest.raises(MoodleBadResponse) as info:
            ws.add_report(24, name, "report")

        assert (info.value.stage, info.value.attempt) == ("report", 24)
        assert "attempt 24" in str(info.value)
        assert _files_below(tmp_path) == []

    @pytest.mark.parametrize("name", [*HOSTILE_NAMES, "a:b", "a*b", "a/b", ""])
    def test_file_name(self, tmp_path: Path, name: str) -> None:
        """A bad report file name is refused, naming the item."""
        ws = _workspace(tmp_path, AA)

        with pytest.raises(MoodleBadResponse) as info:
            ws.add_report(101, "folder", name)

        assert (info.value.stage, info.value.attempt) == ("report", 101)
        assert _files_below(tmp_path) == []

    @pytest.mark.parametrize(
        ("group", "name"),
        [("1", n) for n in [*HOSTILE_NAMES, ""]] + [("..", "x"), ("a/b", "x")],
    )
    def test_attachment_names(self, tmp_path: Path, group: str, name: str) -> None:
        """Bad attachment groups and names are refused for the owning item."""
        ws = _workspace(tmp_path)
        slot = ws.add_report(24, "f", "r")

        with pytest.raises(MoodleBadResponse) as info:
            slot.attachment_path(group, name)

        assert (info.value.stage, info.value.attempt) == ("attachments", 24)
        assert _files_below(tmp_path) == []

    def test_attachment_name_may_contain_dots(self, tmp_path: Path) -> None:
        """The relaxed rules let ordinary file names with dots through."""
        ws = _workspace(tmp_path)
        slot = ws.add_report(24, "f", "r")

        path = slot.attachment_path("1", "my.answer..v2.png")

        assert path == ws.root / "attempts/f/attachments/1/my.answer..v2.png"

    @pytest.mark.parametrize("name", [*HOSTILE_NAMES, ""])
    def test_backup_name(self, tmp_path: Path, name: str) -> None:
        """A bad backup file name is refused in the backup stage."""
        ws = _workspace(tmp_path, QUIZ_ARCHIVER)

        with pytest.raises(MoodleBadResponse) as info:
            ws.backup_path(name)

        assert info.value.stage == "backup"
        assert _files_below(tmp_path) == []

    @pytest.mark.parametrize("name", ["../evil", "/tmp/x", "a.b", ""])
    def test_archive_name(self, tmp_path: Path, name: str) -> None:
        """A bad archive file name is refused before anything is created."""
        with pytest.raises(MoodleBadResponse):
            _workspace(tmp_path, archive_filename=name)

        assert list(tmp_path.iterdir()) == []

    def test_too_long_segment(self, tmp_path: Path) -> None:
        """A segment longer than the file system allows is refused."""
        ws = _workspace(tmp_path)

        with pytest.raises(MoodleBadResponse) as info:
            ws.add_report(24, "é" * 130, "r")

        assert info.value.attempt == 24

    def test_path_through_a_file(self, tmp_path: Path) -> None:
        """A folder that would run through another item's file is refused."""
        ws = _workspace(tmp_path)
        ws.add_report(1, "a", "r").attachment_path("1", "x")

        with pytest.raises(MoodleBadResponse) as info:
            ws.add_report(2, "a/attachments/1/x/y", "r")

        assert info.value.attempt == 2

    def test_symlink_out_of_the_workspace(self, tmp_path: Path) -> None:
        """A symlink planted in the workspace cannot lead a path outside it."""
        outside = tmp_path / "outside"
        outside.mkdir()
        ws = _workspace(tmp_path)
        (ws.root / "attempts").symlink_to(outside, target_is_directory=True)

        with pytest.raises(ArchiveError, match="leaves the workspace"):
            ws.add_report(24, "f", "r")

        assert list(outside.iterdir()) == []

    def test_item_added_twice(self, tmp_path: Path) -> None:
        """The same item id cannot be registered twice."""
        ws = _workspace(tmp_path)
        ws.add_report(24, "f", "r")

        with pytest.raises(ArchiveError) as info:
            ws.add_report(24, "g", "r")

        assert info.value.attempt == 24


class TestBuild:
    """Writing the ZIP."""

    def test_empty_job(self, tmp_path: Path) -> None:
        """A job with neither reports nor backups gives a valid, empty ZIP."""
        ws = _workspace(tmp_path, QUIZ_ARCHIVER)

        built = ws.build(tmp_path / "out", compression="DEFLATED")

        assert built.members == []
        assert zipfile.is_zipfile(built.path)
        with zipfile.ZipFile(built.path) as archive:
            assert archive.namelist() == []

    @pytest.mark.parametrize(
        ("setting", "method"),
        [
            ("STORED", zipfile.ZIP_STORED),
            ("DEFLATED", zipfile.ZIP_DEFLATED),
            ("BZIP2", zipfile.ZIP_BZIP2),
            ("LZMA", zipfile.ZIP_LZMA),
        ],
    )
    def test_compression(self, tmp_path: Path, setting: str, method: int) -> None:
        """Every member, sidecars too, uses the configured method and reads back."""
        ws = _workspace(tmp_path, QUIZ_ARCHIVER)
        _report(ws, 24, "f", "a")
        ws.backup_path("b.mbz").write_bytes(b"backup " * 1000)

        path = _build(ws, tmp_path, compression=setting)

        with zipfile.ZipFile(path) as archive:
            assert {info.compress_type for info in archive.infolist()} == {method}
            assert archive.read("backups/b.mbz") == b"backup " * 1000

    def test_unknown_compression(self, tmp_path: Path) -> None:
        """An unknown compression name is an ArchiveError of the pack stage."""
        ws = _workspace(tmp_path)

        with pytest.raises(ArchiveError) as info:
            ws.build(tmp_path / "out", compression="ZSTD")

        assert info.value.stage == "pack"

    def test_failed_write_leaves_no_partial_zip(self, tmp_path: Path) -> None:
        """When the finished ZIP cannot take its name, the partial file is removed."""
        ws = _workspace(tmp_path)
        _report(ws, 24, "f", "a")
        (tmp_path / "out" / "archive.zip" / "occupied").mkdir(parents=True)

        with pytest.raises(ArchiveError) as info:
            ws.build(tmp_path / "out", compression="STORED")

        assert info.value.stage == "pack"
        assert not (tmp_path / "out" / "archive.zip.part").exists()

    def test_memory_does_not_grow_with_file_size(self, tmp_path: Path) -> None:
        """Packing a 200 MB file allocates only a few MB of Python memory."""
        size = 200 * 1024 * 1024
        ws = _workspace(tmp_path, QUIZ_ARCHIVER)
        backup = ws.backup_path("big.mbz")
        with backup.open("wb") as stream:
            stream.truncate(size)  # sparse: cheap to create, read back as zeros

        tracemalloc.start()
        try:
            built = ws.build(tmp_path / "out", compression="STORED")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert peak < 16 * 1024 * 1024
        with zipfile.ZipFile(built.path) as archive:
            assert archive.getinfo("backups/big.mbz").file_size == size
            sidecar = archive.read("backups/big.mbz.sha256").decode()
        assert sidecar == _sha256_of_zeros(size)
        assert built.size > size


def _sha256_of_zeros(size: int) -> str:
    digest = hashlib.sha256()
    block = bytes(1024 * 1024)
    for _ in range(size // len(block)):
        digest.update(block)
    return digest.hexdigest()


def test_handed_out_paths_stay_in_root(tmp_path: Path) -> None:
    """Every path the workspace hands out resolves below its root."""
    ws = _workspace(tmp_path, AA)
    slot = ws.add_report(101, "x/y", "r")
    paths = [
        slot.pdf,
        slot.html,
        slot.attachment_path("submission", "a.txt"),
        ws.backup_path("b.mbz"),
    ]

    for path in paths:
        assert path.resolve().is_relative_to(ws.root)
        assert path.parent.is_dir()
    assert os.path.commonpath([*paths, ws.root]) == str(ws.root)
