"""Build, persist and reopen named indexes; a build is reused while its fingerprint matches.

Builds of one index take a file lock, so that processes building it at once (two `multilane index build`,
or several servers starting) make one build: the others wait, then reuse it. Reading an index takes no lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread
import filelock
import numpy as np
import structlog

from multilane.batching import MicroBatcher
from multilane.engines.base import EmbeddingEngine
from multilane.errors import IndexBuildError, InputError, MultilaneError
from multilane.retrieval.index import Hit, VectorIndex
from multilane.retrieval.ingest import (
    ChunkRecord,
    Document,
    check_chunk_params,
    chunk_document,
    collect_documents,
)

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
EMBED_BATCH = 64
STALE_PARTIAL_SECONDS = 3600  # a build folder without a manifest older than this is a crashed build
LOCK_FILE = ".build.lock"
LOCK_POLL_SECONDS = 0.1  # how often a process waiting for another's build tries the lock

Status = Literal["built", "rebuilt", "reused"]
Progress = Callable[[int, int], None]


class OpenedIndex:
    """A loaded index with the embedder that built it; search it with text or with vectors."""

    def __init__(self, *, name: str, status: Status, fingerprint: str, documents: int,
                 path: Path, index: VectorIndex, embedder: EmbeddingEngine) -> None:
        self.name = name
        self.status: Status = status
        self.fingerprint = fingerprint
        self.documents = documents
        self.path = path
        self.index = index
        self.embedder = embedder
        # Concurrent searches on this index coalesce into one multi-query FAISS search.
        self.batcher: MicroBatcher[tuple[np.ndarray, int], list[Hit]] = MicroBatcher(
            self._search_batch, max_batch_size=256, max_wait=0.002, name=f"search:{name}", validate=_check_query)

    @property
    def chunks(self) -> int:
        """Number of indexed chunks."""
        return self.index.ntotal

    @property
    def device(self) -> str:
        """Where searches run: "cuda" or "cpu"."""
        return self.index.device

    async def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        """Embed queries in one call and return each query's top_k hits, best first."""
        if isinstance(queries, str):
            raise TypeError("search takes a sequence of query strings, not one string")
        if not queries:
            return []
        vectors = await self.embedder.embed(list(queries))
        return await self.batcher.submit_many([(vector, top_k) for vector in vectors])

    async def _search_batch(self, items: list[tuple[np.ndarray, int]]) -> list[list[Hit]]:
        """One FAISS search for a batch of (vector, top_k) queries, each cut to its own top_k."""
        deepest = max(top_k for _, top_k in items)
        hits = await self.index.asearch(np.stack([vector for vector, _ in items]), deepest)
        return [found[:top_k] for found, (_, top_k) in zip(hits, items, strict=True)]

    def search_vectors(self, vectors: np.ndarray, top_k: int) -> list[list[Hit]]:
        """Return each query vector's top_k hits; blocks, so call it from a worker thread."""
        return self.index.search(vectors, top_k)

    def __repr__(self) -> str:
        return (f"OpenedIndex(name={self.name!r}, status={self.status!r}, "
                f"documents={self.documents}, chunks={self.chunks}, device={self.device!r})")


def _check_query(item: tuple[np.ndarray, int]) -> None:
    if item[1] < 1:
        raise InputError(f"top_k must be at least 1, got {item[1]}")


def fingerprint(embedder: EmbeddingEngine, chunk_tokens: int, chunk_overlap: int,
                documents: Sequence[Document]) -> str:
    """Hash everything a build depends on: embedder, chunking, format and document contents."""
    payload = {
        "format": FORMAT_VERSION,
        "embedder": embedder.identity,
        "dimension": embedder.dimension,
        "chunk_tokens": chunk_tokens,
        "chunk_overlap": chunk_overlap,
        "documents": sorted((doc.path, doc.sha256) for doc in documents),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


async def open_index(
    name: str,
    *,
    patterns: Sequence[str],
    base_dir: Path,
    embedder: EmbeddingEngine,
    chunk_tokens: int,
    chunk_overlap: int,
    root: Path,
    rebuild: bool = False,
    progress: Progress | None = None,
) -> OpenedIndex:
    """Load index `name` from root when its documents and settings are unchanged, else build it."""
    _check_name(name)
    check_chunk_params(chunk_tokens, chunk_overlap)
    if chunk_tokens > embedder.max_tokens:
        raise IndexBuildError(
            f"index '{name}': chunk_tokens {chunk_tokens} exceeds embedder {embedder.identity} "
            f"max_tokens {embedder.max_tokens}; lower chunk_tokens so chunks are not truncated"
        )
    pattern_list = [patterns] if isinstance(patterns, str) else list(patterns)
    documents = await anyio.to_thread.run_sync(collect_documents, pattern_list, Path(base_dir))
    fp = fingerprint(embedder, chunk_tokens, chunk_overlap, documents)
    index_dir = Path(root) / name
    current = await anyio.to_thread.run_sync(_read_current, index_dir)
    if current is not None and not rebuild:
        loaded = await anyio.to_thread.run_sync(
            _try_load, index_dir, current, fp, embedder.dimension
        )
        if loaded is not None:
            log.info("index.reused", index=name, path=str(index_dir / current),
                     documents=len(documents), chunks=loaded.ntotal, device=loaded.device)
            return OpenedIndex(name=name, status="reused", fingerprint=fp, documents=len(documents),
                               path=index_dir / current, index=loaded, embedder=embedder)
    async with build_lock(index_dir, name):
        latest = await anyio.to_thread.run_sync(_read_current, index_dir)
        if latest is not None and latest != current:  # another process built it while we waited
            loaded = await anyio.to_thread.run_sync(_try_load, index_dir, latest, fp, embedder.dimension)
            if loaded is not None:
                log.info("index.reused", index=name, path=str(index_dir / latest), documents=len(documents),
                         chunks=loaded.ntotal, device=loaded.device, built_by="another process")
                return OpenedIndex(name=name, status="reused", fingerprint=fp, documents=len(documents),
                                   path=index_dir / latest, index=loaded, embedder=embedder)
        status: Status = "rebuilt" if latest is not None else "built"
        folder, index = await _build(
            name, index_dir, fp, documents, embedder, chunk_tokens, chunk_overlap, progress
        )
    return OpenedIndex(name=name, status=status, fingerprint=fp, documents=len(documents),
                       path=folder, index=index, embedder=embedder)


@contextlib.asynccontextmanager
async def build_lock(index_dir: Path, name: str) -> AsyncIterator[None]:
    """Hold index `name`'s build lock, across processes; waiting for it can be cancelled."""
    index_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - one metadata call, not worth a thread
    lock = filelock.FileLock(index_dir / LOCK_FILE)
    waiting = False
    while True:
        # A non-blocking try is one flock call, quick enough for the event loop; between tries we sleep on the
        # loop, so a cancelled caller stops waiting at once (a blocking acquire in a thread could not).
        try:
            lock.acquire(blocking=False)
            break
        except filelock.Timeout:
            if not waiting:
                waiting = True
                log.info("index.waiting_for_build", index=name, lock=str(index_dir / LOCK_FILE),
                         reason="another process is building this index")
            await anyio.sleep(LOCK_POLL_SECONDS)
    try:
        yield
    finally:
        lock.release()


async def _build(
    name: str, index_dir: Path, fp: str, documents: list[Document], embedder: EmbeddingEngine,
    chunk_tokens: int, chunk_overlap: int, progress: Progress | None,
) -> tuple[Path, VectorIndex]:
    """Chunk, embed and index documents into a new build folder, then make it CURRENT."""
    started = time.perf_counter()
    chunks = await anyio.to_thread.run_sync(
        _chunk_all, documents, embedder, chunk_tokens, chunk_overlap
    )
    if not chunks:
        raise IndexBuildError(
            f"index '{name}': the {len(documents)} matched documents contain no text"
        )
    index_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - one metadata call, not worth a thread
    folder = index_dir / f"build-{fp[:16]}-{secrets.token_hex(4)}"
    committed: list[bool] = []
    try:
        folder.mkdir()
        vectors = await _embed_all(name, chunks, embedder, progress)
        index = await anyio.to_thread.run_sync(VectorIndex.build, vectors, chunks)
        manifest = _manifest(name, fp, embedder, chunk_tokens, chunk_overlap, documents, chunks)
        await anyio.to_thread.run_sync(
            _write_and_commit, index_dir, folder, index, chunks, manifest, committed
        )
    finally:
        if not committed:
            shutil.rmtree(folder, ignore_errors=True)
    log.info("index.built", index=name, path=str(folder), documents=len(documents),
             chunks=len(chunks), device=index.device,
             seconds=round(time.perf_counter() - started, 3))
    return folder, index


def _chunk_all(documents: Sequence[Document], embedder: EmbeddingEngine, chunk_tokens: int,
               chunk_overlap: int) -> list[ChunkRecord]:
    chunks: list[ChunkRecord] = []
    for doc in documents:
        spans = embedder.token_spans(doc.text)
        chunks.extend(chunk_document(doc, spans, chunk_tokens, chunk_overlap, first_id=len(chunks)))
    return chunks


async def _embed_all(name: str, chunks: Sequence[ChunkRecord], embedder: EmbeddingEngine,
                     progress: Progress | None) -> np.ndarray:
    total = len(chunks)
    parts: list[np.ndarray] = []
    if progress is not None:
        progress(0, total)
    for first in range(0, total, EMBED_BATCH):
        batch = [chunk.text for chunk in chunks[first : first + EMBED_BATCH]]
        try:
            vectors = np.asarray(await embedder.embed(batch), dtype=np.float32)
        except MultilaneError:
            raise
        except Exception as exc:
            raise IndexBuildError(
                f"index '{name}': embedder {embedder.identity} failed on chunks "
                f"{first}-{first + len(batch) - 1} of {total}: {exc}"
            ) from exc
        if vectors.shape != (len(batch), embedder.dimension):
            raise IndexBuildError(
                f"index '{name}': embedder {embedder.identity} returned shape {vectors.shape} "
                f"for {len(batch)} texts, expected ({len(batch)}, {embedder.dimension})"
            )
        parts.append(vectors)
        if progress is not None:
            progress(first + len(batch), total)
    return np.concatenate(parts)


def _manifest(name: str, fp: str, embedder: EmbeddingEngine, chunk_tokens: int, chunk_overlap: int,
              documents: Sequence[Document], chunks: Sequence[ChunkRecord]) -> dict[str, Any]:
    per_doc: dict[str, int] = {}
    for chunk in chunks:
        per_doc[chunk.source] = per_doc.get(chunk.source, 0) + 1
    return {
        "format": FORMAT_VERSION,
        "name": name,
        "fingerprint": fp,
        "embedder": embedder.identity,
        "dimension": embedder.dimension,
        "chunk_tokens": chunk_tokens,
        "chunk_overlap": chunk_overlap,
        "documents": [
            {"path": d.path, "sha256": d.sha256, "chunks": per_doc.get(d.path, 0)}
            for d in documents
        ],
        "counts": {"documents": len(documents), "chunks": len(chunks)},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_and_commit(
    index_dir: Path, folder: Path, index: VectorIndex, chunks: Sequence[ChunkRecord],
    manifest: dict[str, Any], committed: list[bool],
) -> None:
    """Write the build folder (manifest last), point CURRENT at it, then drop older builds."""
    index.save(folder / "index.faiss")
    _fsync_file(folder / "index.faiss")
    lines = "".join(
        json.dumps({"id": c.id, "source": c.source, "start": c.start, "end": c.end, "text": c.text},
                   ensure_ascii=False) + "\n"
        for c in chunks
    )
    _write_durably(folder / "chunks.jsonl", lines)
    manifest_text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    _write_durably(folder / "manifest.json", manifest_text)
    _fsync_dir(folder)
    _write_durably(index_dir / "CURRENT.tmp", folder.name + "\n")
    os.replace(index_dir / "CURRENT.tmp", index_dir / "CURRENT")
    _fsync_dir(index_dir)
    committed.append(True)
    _remove_old_builds(index_dir, keep=folder.name)


def _remove_old_builds(index_dir: Path, keep: str) -> None:
    """Delete finished builds other than keep, and partial ones old enough to be crashed builds."""
    now = time.time()
    for entry in index_dir.glob("build-*"):
        if entry.name == keep or not entry.is_dir():
            continue
        try:
            finished = (entry / "manifest.json").exists()
            if finished or now - entry.stat().st_mtime > STALE_PARTIAL_SECONDS:
                shutil.rmtree(entry)
                log.debug("index.old_build_removed", path=str(entry))
        except OSError as exc:
            log.warning("index.old_build_not_removed", path=str(entry), error=str(exc))


def _read_current(index_dir: Path) -> str | None:
    """The build folder name CURRENT points at, or None when there is no CURRENT file."""
    try:
        return (index_dir / "CURRENT").read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("index.current_unreadable", path=str(index_dir / "CURRENT"), error=str(exc))
        return ""


def _try_load(index_dir: Path, current: str, fp: str, dimension: int) -> VectorIndex | None:
    """Load the build CURRENT names if its fingerprint is fp; None otherwise (warning if broken)."""
    folder = index_dir / current
    try:
        if not current.startswith("build-") or Path(current).name != current:
            raise ValueError(f"CURRENT names {current!r}, not a build folder")
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("fingerprint") != fp:
            log.info("index.stale", path=str(folder), reason="documents or settings changed")
            return None
        with (folder / "chunks.jsonl").open(encoding="utf-8") as lines:
            chunks = [_chunk_from_json(line) for line in lines if line.strip()]
        if any(chunk.id != row for row, chunk in enumerate(chunks)):
            raise ValueError("chunk ids are not 0..n-1 in order")
        index = VectorIndex.load(folder / "index.faiss", chunks)
        if index.dimension != dimension:
            raise ValueError(
                f"index dimension {index.dimension} differs from the embedder's {dimension}"
            )
        return index
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # missing or corrupt
        log.warning("index.corrupt_rebuilding", path=str(folder),
                    error=f"{type(exc).__name__}: {exc}")
        return None


def _chunk_from_json(line: str) -> ChunkRecord:
    data = json.loads(line)
    return ChunkRecord(id=int(data["id"]), source=str(data["source"]), text=str(data["text"]),
                       start=int(data["start"]), end=int(data["end"]))


def _check_name(name: str) -> None:
    if not name or name in {".", ".."} or "/" in name or "\\" in name or name != name.strip():
        raise IndexBuildError(f"index name {name!r} must be a plain folder name (no slashes)")


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some platforms cannot fsync a directory; the data files are already synced
        pass
