"""Find documents on disk and cut them into token windows."""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from multilane.errors import IndexBuildError

log = structlog.get_logger(__name__)

_TITLE = re.compile(r"^#[ \t]+\S.*$", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    """One source file: its display path (relative to the base folder), its text and its hash."""

    path: str
    text: str
    sha256: str


@dataclass(frozen=True)
class ChunkRecord:
    """A window of a document; `start`/`end` are character offsets into the document's text."""

    id: int
    source: str
    text: str
    start: int
    end: int


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
    return Document(path=display, text=text, sha256=hashlib.sha256(data).hexdigest())


def chunk_document(
    doc: Document,
    spans: Sequence[tuple[int, int]],
    chunk_tokens: int,
    overlap: int,
    *,
    first_id: int = 0,
) -> list[ChunkRecord]:
    """Cut doc into windows of chunk_tokens tokens that step by chunk_tokens - overlap.

    Each chunk's text is sliced from the original text, so casing and whitespace survive.
    """
    check_chunk_params(chunk_tokens, overlap)
    if not spans:
        return []
    step = chunk_tokens - overlap
    starts = list(range(0, max(len(spans) - overlap, 1), step))
    chunks: list[ChunkRecord] = []
    for number, first in enumerate(starts):
        window = spans[first : first + chunk_tokens]
        start, end = window[0][0], window[-1][1]
        if number == 0:
            start = _title_start(doc.text, start)
        chunks.append(
            ChunkRecord(id=first_id + number, source=doc.path, text=doc.text[start:end],
                        start=start, end=end)
        )
    return chunks


def check_chunk_params(chunk_tokens: int, overlap: int) -> None:
    """Raise IndexBuildError unless 0 <= overlap < chunk_tokens."""
    if chunk_tokens < 1:
        raise IndexBuildError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise IndexBuildError(
            f"chunk overlap must be from 0 to chunk_tokens - 1 ({chunk_tokens - 1}), got {overlap}"
        )


def _title_start(text: str, start: int) -> int:
    """Pull the first chunk's start back to a `# Title` line the tokenizer skipped or split."""
    title = _TITLE.search(text, 0, start + 1)
    if title is not None and title.start() < start and not text[: title.start()].strip():
        return title.start()
    return start
