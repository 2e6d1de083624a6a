"""The Python reference corpus: exported once per Python version, atomically, one markdown file per topic."""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics

import pytest

from multilane import corpora
from multilane.corpora import export_python_reference, render_topic
from multilane.errors import CorpusError


def test_export_writes_one_markdown_file_per_topic_with_a_title(tmp_path: Path) -> None:
    folder = export_python_reference(tmp_path)

    assert folder == tmp_path / "corpora" / "python-reference"
    files = sorted(path.name for path in folder.glob("*.md"))
    assert files == sorted(f"{key}.md" for key in pydoc_topics)
    assert "assert.md" in files and "typesseq-mutable.md" in files
    for path in folder.glob("*.md"):
        first_line = path.read_text(encoding="utf-8").split("\n", 1)[0]
        assert first_line.startswith("# ") and len(first_line) > 3, path.name
    assert (folder / "assert.md").read_text(encoding="utf-8").startswith('# The "assert" statement\n\n')
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["topics"] == len(pydoc_topics)


def test_export_keeps_every_word_of_every_topic(tmp_path: Path) -> None:
    folder = export_python_reference(tmp_path)
    for key, original in pydoc_topics.items():
        exported = (folder / f"{key}.md").read_text(encoding="utf-8")
        assert _words(exported) == _words(original), key
    assert '"\'!r\'" which calls "repr()"' in (folder / "formatstrings.md").read_text(encoding="utf-8")


def _words(text: str) -> list[str]:
    """The words of a text, without heading marks and underlines."""
    return [word for word in text.split() if set(word) not in ({"#"}, {"*"}, {"="}, {"-"}, {"~"})]


def test_a_second_export_reuses_the_first(tmp_path: Path) -> None:
    first = export_python_reference(tmp_path).resolve()
    marker = first / "assert.md"
    written = marker.stat().st_mtime_ns

    again = export_python_reference(tmp_path)

    assert again.resolve() == first
    assert marker.stat().st_mtime_ns == written
    assert [p.name for p in (tmp_path / "corpora").iterdir() if not p.is_symlink()] == [first.name]


def test_changed_topics_are_exported_anew_and_swapped_in(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    old = export_python_reference(tmp_path).resolve()
    changed = dict(pydoc_topics)
    changed["assert"] = "The assert statement\n********************\n\nRewritten for a newer Python.\n"
    monkeypatch.setattr(corpora, "python_reference_topics", lambda: changed)

    folder = export_python_reference(tmp_path)

    assert folder.resolve() != old
    assert not old.exists()  # the replaced export is removed
    assert (folder / "assert.md").read_text(encoding="utf-8") == (
        "# The assert statement\n\nRewritten for a newer Python.\n")


def test_an_unfinished_export_left_by_a_crash_is_replaced(tmp_path: Path) -> None:
    folder = export_python_reference(tmp_path)
    target = folder.resolve()
    (target / "manifest.json").unlink()  # as if the process died before the manifest was written
    (target / "assert.md").write_text("half written", encoding="utf-8")

    export_python_reference(tmp_path)

    assert (folder / "assert.md").read_text(encoding="utf-8").startswith("# The \"assert\" statement")


def test_a_folder_in_the_links_place_is_not_deleted(tmp_path: Path) -> None:
    own = tmp_path / "corpora" / "python-reference"
    own.mkdir(parents=True)
    (own / "notes.md").write_text("mine", encoding="utf-8")

    with pytest.raises(CorpusError, match="is not the link an export makes"):
        export_python_reference(tmp_path)
    assert (own / "notes.md").read_text(encoding="utf-8") == "mine"


def test_export_defaults_to_multilane_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTILANE_HOME", str(tmp_path / "home"))
    assert export_python_reference() == tmp_path / "home" / "corpora" / "python-reference"


def test_render_topic_turns_underlined_headings_into_markdown() -> None:
    text = ("Execution model\n***************\n\n\nNaming and binding\n==================\n\n"
            "Binding of names\n----------------\n\nText with a    table\n===== =====\n")
    assert render_topic(text) == (
        "# Execution model\n\n\n## Naming and binding\n\n### Binding of names\n\n"
        "Text with a    table\n===== =====\n")
