"""`archive-worker demo`, as a newcomer runs it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from archive_worker.cli import app

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_demo_leaves_the_archive(tmp_path: Path) -> None:
    """The demo archives the assignment scenario and leaves its ZIP behind."""
    result = CliRunner().invoke(
        app,
        ["demo", "--flavour", "archivingmod_assign", "--output-dir", str(tmp_path)],
        env={"ARCHIVE_WORKER_PDFA_CONVERSION": "false"},
    )
    assert result.exit_code == 0, result.output
    (archive,) = tmp_path.glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
    assert "submissions_metadata.csv" in names
    assert "submissions/submission-101/submission-101.pdf" in names
    for stage in ("AWAITING_PROCESSING", "RUNNING", "FINALIZING", "FINISHED"):
        assert stage in result.output
    assert f"archive: {archive}" in result.output


def test_demo_rejects_unknown_flavour(tmp_path: Path) -> None:
    """An unknown flavour is refused before anything starts."""
    result = CliRunner().invoke(
        app, ["demo", "--flavour", "moodle_forum", "--output-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "moodle_forum" in result.output
