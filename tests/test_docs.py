"""The README stays true to the code it documents."""

from __future__ import annotations

from pathlib import Path

from archive_worker.config_doc import markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- config-table:start -->\n", "<!-- config-table:end -->"


def test_configuration_table_is_current() -> None:
    """The README's option table equals `archive-worker config --markdown`."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index(START) + len(START) : text.index(END)]
    assert table == markdown_table()


def test_readme_names_the_test_command() -> None:
    """The README opens with the two commands .ci/run relies on."""
    text = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci
    assert text.index("make demo") < text.index("make test") < text.index("## Running")
