"""Find documents on disk, read their front matter and headings, and cut them into token windows."""

from __future__ import annotations

import bisect
import glob
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

from multilane.errors import IndexBuildError

log = structlog.get_logger(__name__)

_TITLE = re.compile(r"^#[ \t]+\S.*$", re.MULTILINE)
# YAML front matter, as Jekyll, Hugo and Obsidian write it: a first line `---`, then YAML up to a `---` line.
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.DOTALL | re.MULTILINE)
HEADING_SEPARATOR = " > "


@dataclass(frozen=True)
class Document:
    """One source file: its display path (relative to the base folder), its text and its hash.

    `meta` is the file's YAML front matter (empty without one); the body, which is chunked, starts after it.
    """

    path: str
    text: str
    sha256: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    body_start: int = 0

    @property
    def body(self) -> str:
        """The text after the front matter."""
        return self.text[self.body_start:]


@dataclass(frozen=True)
class ChunkRecord:
    """A window of a document; `start`/`end` are character offsets into the document's text.

    `heading` is the path of markdown headings the window sits under ("Title > Section"), when the index
    asks for it; it is embedded and keyword-indexed with the text, so a passage is found by its section too.
    """

    id: int
    source: str
    text: str
    start: int
    end: int
    heading: str = ""

    @property
    def indexed_text(self) -> str:
        """What is embedded and keyword-indexed: the heading path, if any, then the text."""
        return f"{self.heading}\n\n{self.text}" if self.heading else self.text


def collect_documents(patterns: Sequence[str], base_dir: Path) -> list[Document]:
    """Read every file the glob patterns match under base_dir, sorted by path and de-duplicated."""
    if isinstance(patterns, str):
        patterns = [patterns]
    base = Path(base_dir).resolve()
    found: dict[Path, str] = {}
    for pattern in patterns:
        for match in glob.glob(os.path.join(base, pattern), recursive=True):
            path = Path(match).resolve()
            if path.is_file() and path not in found:
                found[path] = Path(os.path.relpath(path, base)).as_posix()
    if not found:
        raise IndexBuildError(
            f"no files match {list(patterns)} under {base}; check the index's documents patterns"
        )
    documents = [_read(path, display) for path, display in found.items()]
    documents.sort(key=lambda doc: doc.path)
    log.debug("documents.collected", patterns=list(patterns), base_dir=str(base),
              count=len(documents))
    return documents


def _read(path: Path, display: str) -> Document:
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IndexBuildError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except OSError as exc:
        raise IndexBuildError(f"cannot read {path}: {exc.strerror or exc}") from exc
    meta, body_start = read_front_matter(text, str(path))
    return Document(path=display, text=text, sha256=hashlib.sha256(data).hexdigest(), meta=meta,
                    body_start=body_start)


def read_front_matter(text: str, name: str = "<text>") -> tuple[dict[str, Any], int]:
    """The YAML front matter of a document as a mapping, and where its body starts (0 without one)."""
    found = _FRONT_MATTER.match(text)
    if found is None:
        return {}, 0
    try:
        data = yaml.safe_load(found.group(1))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 2}" if mark is not None else name
        problem = getattr(exc, "problem", None) or str(exc)
        raise IndexBuildError(f"{where}: the front matter is not valid YAML ({problem})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise IndexBuildError(f"{name}:2: the front matter must be a YAML mapping of names to values "
                              f"(key: value lines), got {type(data).__name__}")
    return data, found.end()


def heading_paths(text: str) -> tuple[list[int], list[str]]:
    """Where each markdown section starts (character offsets, ascending) and its heading path, "Title > Section".

    Headings are read with markdown-it (CommonMark) at the top level only, so a `#` line in a code block,
    a quote or a list (a `>>> # comment` in a doctest) is not one.
    """
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(text)
    line_starts = [0, *(i + 1 for i, char in enumerate(text) if char == "\n")]
    offsets: list[int] = []
    paths: list[str] = []
    stack: list[tuple[int, str]] = []
    for position, token in enumerate(tokens):
        if token.type != "heading_open" or token.map is None or token.level != 0:  # not in a quote or list
            continue
        level = int(token.tag[1:])
        title = " ".join(tokens[position + 1].content.split())
        stack = [(lvl, name) for lvl, name in stack if lvl < level]
        if title:
            stack.append((level, title))
        offsets.append(line_starts[token.map[0]])
        paths.append(HEADING_SEPARATOR.join(name for _, name in stack))
    return offsets, paths


def _heading_at(offsets: list[int], paths: list[str], position: int) -> str:
    """The heading path in force at a character position (the last section starting at or before it)."""
    at = bisect.bisect_right(offsets, position) - 1
    return paths[at] if at >= 0 else ""


def chunk_document(
    doc: Document,
    spans: Sequence[tuple[int, int]],
    chunk_tokens: int,
    overlap: int,
    *,
    first_id: int = 0,
    headings: bool = False,
) -> list[ChunkRecord]:
    """Cut doc into windows of chunk_tokens tokens that step by chunk_tokens - overlap.

    `spans` are token offsets into doc.text (its body: front matter is not chunked). Each chunk's text is
    sliced from the original text, so casing and whitespace survive. With `headings`, each chunk records the
    heading path at its start.
    """
    check_chunk_params(chunk_tokens, overlap)
    if not spans:
        return []
    offsets, paths = heading_paths(doc.body) if headings else ([], [])
    offsets = [offset + doc.body_start for offset in offsets]
    step = chunk_tokens - overlap
    starts = list(range(0, max(len(spans) - overlap, 1), step))
    chunks: list[ChunkRecord] = []
    for number, first in enumerate(starts):
        window = spans[first : first + chunk_tokens]
        start, end = window[0][0], window[-1][1]
        if number == 0:
            start = _title_start(doc.text, start, doc.body_start)
        chunks.append(
            ChunkRecord(id=first_id + number, source=doc.path, text=doc.text[start:end],
                        start=start, end=end, heading=_heading_at(offsets, paths, start))
        )
    return chunks


def window_parents(windows: Sequence[ChunkRecord], chunks: Sequence[ChunkRecord]) -> list[int]:
    """For each window of a document, the id of the chunk of that document that overlaps it most (the first
    such chunk on a tie): a search that matches the window returns that chunk."""
    if not chunks:
        raise ValueError("a document's windows need at least one of its chunks")
    parents = []
    for window in windows:
        best = max(chunks, key=lambda c: (min(c.end, window.end) - max(c.start, window.start), -c.id))
        parents.append(best.id)
    return parents


def check_chunk_params(chunk_tokens: int, overlap: int) -> None:
    """Raise IndexBuildError unless 0 <= overlap < chunk_tokens."""
    if chunk_tokens < 1:
        raise IndexBuildError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise IndexBuildError(
            f"chunk overlap must be from 0 to chunk_tokens - 1 ({chunk_tokens - 1}), got {overlap}"
        )


def _title_start(text: str, start: int, body_start: int = 0) -> int:
    """Pull the first chunk's start back to a `# Title` line the tokenizer skipped or split."""
    title = _TITLE.search(text, body_start, start + 1)
    if title is not None and title.start() < start and not text[body_start : title.start()].strip():
        return title.start()
    return start
