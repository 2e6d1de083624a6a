"""Corpora that ship with Python itself, exported at run time as markdown files for indexing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from multilane.errors import CorpusError
from multilane.sources import multilane_home

log = structlog.get_logger(__name__)

PYTHON_REFERENCE = "python-reference"
CORPUS_NAMES: tuple[str, ...] = (PYTHON_REFERENCE,)
"""The corpora an index can name with `corpus:` instead of `documents:`."""
CORPUS_PATTERNS: tuple[str, ...] = ("**/*.md",)
FORMAT_VERSION = 1  # bump when the rendering of a topic changes, so old exports are replaced
STALE_SCRATCH_SECONDS = 3600  # a scratch folder older than this was left by a crashed export

_UNDERLINE_LEVELS = {"*": 1, "=": 2, "-": 3, "~": 4}


def python_reference_topics() -> dict[str, str]:
    """The language reference topics of the running CPython (`pydoc_data.topics`), keyed by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise CorpusError(
            f"this Python ({sys.version.split()[0]}) has no pydoc_data module, which holds the language "
            "reference; install the full CPython standard library (e.g. Debian's python3-full)"
        ) from exc
    return dict(topics)


def render_topic(text: str) -> str:
    """Turn a topic's reStructuredText-style headings into markdown ones (`# Title` first)."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        underline = lines[index + 1] if index + 1 < len(lines) else ""
        level = _heading_level(line, underline)
        if level:
            out.append("#" * level + " " + line.strip())
            index += 2
            continue
        out.append(line)
        index += 1
    return "\n".join(out).strip("\n") + "\n"


def _heading_level(line: str, underline: str) -> int:
    if not line.strip() or len(underline) != len(line) or len(set(underline)) != 1:
        return 0
    return _UNDERLINE_LEVELS.get(underline[0], 0)


def export_python_reference(home: Path | None = None) -> Path:
    """Export the running Python's language reference as one `<topic>.md` file per topic; return the folder.

    The folder is `MULTILANE_HOME/corpora/python-reference`, a link to a folder named after the topics'
    hash: an export with the same topics is reused, and a new one is written beside it and swapped in
    with one atomic rename, so a reader never sees a half-written corpus.
    """
    topics = python_reference_topics()
    digest = _digest(topics)
    root = (home or multilane_home()) / "corpora"
    link = root / PYTHON_REFERENCE
    target = root / f"{PYTHON_REFERENCE}-{digest[:16]}"
    if _manifest_digest(link) == digest:
        return link
    try:
        root.mkdir(parents=True, exist_ok=True)
        if _manifest_digest(target) != digest:
            _write_export(root, target, topics, digest)
        _point(link, target)
    except OSError as exc:
        raise CorpusError(f"cannot export the Python reference under {root}: {exc}; "
                          "check that MULTILANE_HOME is writable") from exc
    _remove_old_exports(root, keep=target.name)
    log.info("corpus.exported", corpus=PYTHON_REFERENCE, path=str(link), topics=len(topics),
             python=sys.version.split()[0])
    return link


def corpus_folder(name: str, home: Path | None = None) -> Path:
    """Export a named corpus (once) and return its folder, whose `*.md` files are its documents."""
    if name == PYTHON_REFERENCE:
        return export_python_reference(home)
    raise CorpusError(f"unknown corpus '{name}' (corpora: {', '.join(CORPUS_NAMES)})")


def _digest(topics: dict[str, str]) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, "topics": topics}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _manifest_digest(folder: Path) -> str | None:
    """The topics hash a finished export records, or None when the folder is missing or unfinished."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        return str(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_export(root: Path, target: Path, topics: dict[str, str], digest: str) -> None:
    """Write every topic into a scratch folder (manifest last), then rename it to target."""
    scratch = root / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        for key, text in sorted(topics.items()):
            _check_topic_key(key)
            (scratch / f"{key}.md").write_text(render_topic(text), encoding="utf-8")
        manifest: dict[str, Any] = {
            "corpus": PYTHON_REFERENCE,
            "format": FORMAT_VERSION,
            "python": sys.version.split()[0],
            "topics": len(topics),
            "sha256": digest,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(scratch, target)
        except OSError:
            if _manifest_digest(target) == digest:  # another process finished the same export first
                return
            shutil.rmtree(target, ignore_errors=True)  # an unfinished export left by a crash
            os.rename(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_topic_key(key: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", key):
        raise CorpusError(f"pydoc topic {key!r} is not a safe file name")


def _point(link: Path, target: Path) -> None:
    """Make link a symlink to target's name, replacing what was there in one rename."""
    if link.exists() and not link.is_symlink():
        raise CorpusError(f"{link} exists and is not the link an export makes; move it away and retry")
    temporary = link.with_name(f".{link.name}.link-{os.getpid()}-{secrets.token_hex(4)}")
    os.symlink(target.name, temporary, target_is_directory=True)
    try:
        os.replace(temporary, link)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def _remove_old_exports(root: Path, keep: str) -> None:
    """Delete exports other than keep, and scratch folders that crashed exports left behind."""
    now = time.time()
    for entry in [*root.glob(f"{PYTHON_REFERENCE}-*"), *root.glob(f".{PYTHON_REFERENCE}-*.tmp-*")]:
        if entry.name == keep or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if not entry.name.startswith(".") or now - entry.stat().st_mtime > STALE_SCRATCH_SECONDS:
                shutil.rmtree(entry)
                log.debug("corpus.old_export_removed", path=str(entry))
        except OSError as exc:
            log.warning("corpus.old_export_not_removed", path=str(entry), error=str(exc))
