"""Build, persist and reopen named indexes; a build is reused while its fingerprint matches.

Builds of one index take a file lock, so that processes building it at once (two `multilane index build`,
or several servers starting) make one build: the others wait, then reuse it. Reading an index takes no lock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import anyio
import anyio.to_thread
import filelock
import numpy as np
import structlog

from multilane.batching import MicroBatcher
from multilane.engines.base import EmbeddingEngine
from multilane.errors import IndexBuildError, InputError, MultilaneError
from multilane.retrieval import keyword
from multilane.retrieval.filters import DocumentFilter
from multilane.retrieval.fusion import fuse
from multilane.retrieval.index import Hit, VectorIndex
from multilane.retrieval.ingest import (
    ChunkRecord,
    Document,
    check_chunk_params,
    chunk_document,
    collect_documents,
    window_parents,
)
from multilane.retrieval.keyword import KeywordIndex

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
EMBED_BATCH = 64
STALE_PARTIAL_SECONDS = 3600  # a build folder without a manifest older than this is a crashed build
LOCK_FILE = ".build.lock"
LOCK_POLL_SECONDS = 0.1  # how often a process waiting for another's build tries the lock

KEYWORD_FOLDER = "keyword"
WINDOWS_INDEX = "windows.faiss"
WINDOWS_PARENTS = "windows.npy"
DEFAULT_CANDIDATES = 50  # how deep each ranking goes before fusion
DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)  # dense, keyword, windows

Status = Literal["built", "rebuilt", "reused"]
KeywordStatus = Literal["not loaded", "built", "loaded", "rebuilt in memory"]
SearchMode = Literal["dense", "keyword", "hybrid"]
SEARCH_MODES: tuple[str, ...] = get_args(SearchMode)
Progress = Callable[[int, int], None]


class OpenedIndex:
    """A loaded index with the embedder that built it; search it with text or with vectors.

    Its keyword (BM25) index over the same chunks is loaded on the first keyword or hybrid search. `windows`, when
    the index has them, holds the embeddings of small windows of the documents, row i standing for the chunk that
    holds window i.
    """

    def __init__(self, *, name: str, status: Status, fingerprint: str, documents: int,
                 path: Path, index: VectorIndex, embedder: EmbeddingEngine,
                 metadata: Mapping[str, Mapping[str, Any]] | None = None,
                 keyword_index: KeywordIndex | None = None,
                 bm25: tuple[float, float] = (keyword.DEFAULT_K1, keyword.DEFAULT_B),
                 windows: VectorIndex | None = None) -> None:
        self.name = name
        self.status: Status = status
        self.fingerprint = fingerprint
        self.documents = documents
        self.path = path
        self.index = index
        self.embedder = embedder
        self.metadata: Mapping[str, Mapping[str, Any]] = metadata or {}
        """Each document's front matter, by its path (a chunk's `source`)."""
        self._keyword = keyword_index
        self.bm25 = bm25
        """BM25's (k1, b) for the keyword index."""
        self.keyword_status: KeywordStatus = "built" if keyword_index is not None else "not loaded"
        self._keyword_lock = anyio.Lock()
        self._masks: dict[DocumentFilter, np.ndarray] = {}
        # Concurrent searches on this index coalesce into one multi-query FAISS search, and keyword searches
        # into one call of the keyword index.
        self.batcher: MicroBatcher[tuple[np.ndarray, int], list[Hit]] = MicroBatcher(
            self._search_batch, max_batch_size=256, max_wait=0.002, name=f"search:{name}", validate=_check_query)
        self.keyword_batcher: MicroBatcher[tuple[str, int], list[Hit]] = MicroBatcher(
            self._keyword_batch, max_batch_size=256, max_wait=0.002, name=f"keyword:{name}",
            validate=_check_query)
        self.windows = windows
        self.window_batcher: MicroBatcher[tuple[np.ndarray, int], list[Hit]] = MicroBatcher(
            self._window_batch, max_batch_size=256, max_wait=0.002, name=f"windows:{name}", validate=_check_query)

    @property
    def chunks(self) -> int:
        """Number of indexed chunks."""
        return self.index.ntotal

    @property
    def device(self) -> str:
        """Where searches run: "cuda" or "cpu"."""
        return self.index.device

    async def search(self, queries: Sequence[str], top_k: int, *, mode: SearchMode = "dense",
                     weights: Sequence[float] = DEFAULT_WEIGHTS, where: DocumentFilter | None = None,
                     per_source: int | None = None, candidates: int = DEFAULT_CANDIDATES) -> list[list[Hit]]:
        """Return each query's top_k hits, best first.

        `mode`: "dense" ranks by cosine similarity of embeddings (the score), "keyword" by BM25 (the score),
        "hybrid" fuses the two rankings, each `candidates` deep, by weighted reciprocal rank (the score is the
        fused one). On an index with windows, dense and hybrid searches also rank chunks by their best-matching
        window and fuse that ranking too. `weights` are dense's, keyword's and the windows' (a missing third is
        1). `where` keeps only the documents it matches and `per_source` caps the hits from one document; both
        apply before the cut to top_k.
        """
        if isinstance(queries, str):
            raise TypeError("search takes a sequence of query strings, not one string")
        if mode not in SEARCH_MODES:
            raise InputError(f"unknown search mode {mode!r} (modes: {', '.join(SEARCH_MODES)})")
        weights = _check_weights(weights)
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, got {top_k}")
        if per_source is not None and per_source < 1:
            raise InputError(f"per_source must be at least 1, got {per_source}")
        if candidates < 1:
            raise InputError(f"candidates must be at least 1, got {candidates}")
        if not queries:
            return []
        allowed = None if where is None else self._allowed(where)
        available = self._rankings_for(mode)
        if len(available) > 1 and not any(weights[RANKINGS.index(name)] > 0 for name in available):
            raise InputError(f"the weights of the rankings fused ({', '.join(available)}) are all 0; "
                             "give at least one a weight above 0")
        # A windows ranking weighted 0 is not searched, so the search is exactly the one without windows.
        rankings = [name for name in available if name != "windows" or weights[2] > 0]
        if len(rankings) == 1 and allowed is None and per_source is None:  # the plain case: exactly top_k deep
            if rankings == ["dense"]:
                vectors = await self.embedder.embed(list(queries))
                return await self.batcher.submit_many([(vector, top_k) for vector in vectors])
            if rankings == ["keyword"]:
                await self.keyword_index()
                return await self.keyword_batcher.submit_many([(query, top_k) for query in queries])
        return await self._search_refined(list(queries), top_k, rankings, weights, allowed, per_source,
                                          max(top_k, candidates) if len(rankings) > 1 else top_k)

    def _rankings_for(self, mode: SearchMode) -> list[str]:
        """The rankings a search in this mode fuses: dense, keyword and windows, as the mode and index have them."""
        if mode == "keyword":
            return ["keyword"]
        names = ["dense", "keyword"] if mode == "hybrid" else ["dense"]
        if self.windows is not None:
            names.append("windows")
        return names

    async def _search_refined(self, queries: list[str], top_k: int, names: list[str],
                              weights: tuple[float, float, float], allowed: np.ndarray | None,
                              per_source: int | None, depth: int) -> list[list[Hit]]:
        """Search ever deeper until filtering and the per-document cap leave top_k hits, or nothing is left."""
        vectors = await self.embedder.embed(queries) if names != ["keyword"] else None
        if "keyword" in names:
            await self.keyword_index()
        ranking_weights = [weights[RANKINGS.index(name)] for name in names]
        total = self.chunks
        while True:
            found = await self._rankings(queries, vectors, names, depth)
            results = []
            for i in range(len(queries)):
                rankings = [_keep(found[name][i], allowed) for name in names]
                ranked = _fused(rankings, ranking_weights) if len(rankings) > 1 else rankings[0]
                results.append(_cap(ranked, per_source, top_k))
            if depth >= total or all(len(hits) >= top_k for hits in results):
                return results
            depth = min(total, depth * 4)

    async def _rankings(self, queries: list[str], vectors: np.ndarray | None, names: list[str],
                        depth: int) -> dict[str, list[list[Hit]]]:
        """The named rankings (dense, keyword, windows) of each query, `depth` deep, searched at the same time."""
        found: dict[str, list[list[Hit]]] = {}

        async def dense() -> None:
            assert vectors is not None
            found["dense"] = await self.batcher.submit_many([(vector, depth) for vector in vectors])

        async def sparse() -> None:
            found["keyword"] = await self.keyword_batcher.submit_many([(query, depth) for query in queries])

        async def windows() -> None:
            assert vectors is not None
            found["windows"] = await self.window_batcher.submit_many([(vector, depth) for vector in vectors])

        searches = {"dense": dense, "keyword": sparse, "windows": windows}
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(searches[name])
        return found

    async def keyword_index(self) -> KeywordIndex:
        """The keyword index: loaded from the build folder once, or rebuilt in memory when that copy is unusable."""
        if self._keyword is not None:
            return self._keyword
        async with self._keyword_lock:
            if self._keyword is None:
                loaded, status = await anyio.to_thread.run_sync(
                    _load_keyword, self.name, self.path / KEYWORD_FOLDER, self.index.chunks, self.bm25)
                self._keyword, self.keyword_status = loaded, status
        return self._keyword

    async def _keyword_batch(self, items: list[tuple[str, int]]) -> list[list[Hit]]:
        """One keyword-index call for a batch of (query, top_k) searches, each cut to its own top_k."""
        index = await self.keyword_index()
        deepest = max(top_k for _, top_k in items)
        hits = await index.asearch([query for query, _ in items], deepest)
        return [found[:top_k] for found, (_, top_k) in zip(hits, items, strict=True)]

    def _allowed(self, where: DocumentFilter) -> np.ndarray:
        """Which chunks the filter keeps, as a boolean mask over chunk ids (worked out once per filter)."""
        mask = self._masks.get(where)
        if mask is None:
            verdicts: dict[str, bool] = {}
            for chunk in self.index.chunks:
                if chunk.source not in verdicts:
                    verdicts[chunk.source] = where.matches(chunk.source, self.metadata.get(chunk.source, {}))
            mask = np.fromiter((verdicts[chunk.source] for chunk in self.index.chunks), dtype=bool,
                               count=self.chunks)
            self._masks[where] = mask
        return mask

    async def _window_batch(self, items: list[tuple[np.ndarray, int]]) -> list[list[Hit]]:
        """One FAISS search of the windows for a batch of (vector, top_k) queries: each query's top_k chunks ranked
        by their best window (whose cosine is the score), searching deeper while windows of one chunk crowd out."""
        assert self.windows is not None
        total = self.windows.ntotal
        per_chunk = -(-total // max(self.chunks, 1))
        depth = min(total, max(top_k for _, top_k in items) * (per_chunk + 1))
        vectors = np.stack([vector for vector, _ in items])
        while True:
            hits = await self.windows.asearch(vectors, depth)
            results = [_distinct(found, top_k) for found, (_, top_k) in zip(hits, items, strict=True)]
            if depth >= total or all(len(found) >= top_k for found, (_, top_k) in zip(results, items, strict=True)):
                return results
            depth = min(total, depth * 4)

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


def _check_query(item: tuple[Any, int]) -> None:
    if item[1] < 1:
        raise InputError(f"top_k must be at least 1, got {item[1]}")


RANKINGS = ("dense", "keyword", "windows")  # the order of a search's weights


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    values = [float(w) for w in weights]
    if len(values) == 2:
        values.append(DEFAULT_WEIGHTS[2])
    if len(values) != 3:
        raise InputError(f"weights are (dense, keyword[, windows]), got {len(values)} values")
    if any(not np.isfinite(w) or w < 0 for w in values):
        raise InputError(f"weights must be finite and not negative, got {values}")
    return values[0], values[1], values[2]


def _distinct(hits: list[Hit], top_k: int) -> list[Hit]:
    """The first top_k hits of distinct chunks (a chunk's first hit is its best)."""
    seen: set[int] = set()
    kept: list[Hit] = []
    for hit in hits:
        if hit.chunk.id not in seen:
            seen.add(hit.chunk.id)
            kept.append(hit)
            if len(kept) == top_k:
                break
    return kept


def _keep(hits: list[Hit], allowed: np.ndarray | None) -> list[Hit]:
    return hits if allowed is None else [hit for hit in hits if allowed[hit.chunk.id]]


def _fused(rankings: Sequence[list[Hit]], weights: Sequence[float]) -> list[Hit]:
    """Rankings of hits (dense, keyword, windows) fused by weighted reciprocal rank; the score is the fused score."""
    chunks = {hit.chunk.id: hit.chunk for ranking in rankings for hit in ranking}
    fused = fuse([[hit.chunk.id for hit in ranking] for ranking in rankings], weights)
    return [Hit(chunks[item.key], item.score) for item in fused]


def _cap(hits: list[Hit], per_source: int | None, top_k: int) -> list[Hit]:
    """The first top_k hits, at most per_source of them from one document."""
    if per_source is None:
        return hits[:top_k]
    kept: list[Hit] = []
    seen: dict[str, int] = {}
    for hit in hits:
        if seen.get(hit.chunk.source, 0) < per_source:
            seen[hit.chunk.source] = seen.get(hit.chunk.source, 0) + 1
            kept.append(hit)
            if len(kept) == top_k:
                break
    return kept


def _load_keyword(name: str, folder: Path, chunks: Sequence[ChunkRecord],
                  bm25: tuple[float, float]) -> tuple[KeywordIndex, KeywordStatus]:
    """Load a build's keyword index; when it is missing or was made by other rules or BM25 parameters, rebuild it
    in memory only, since a committed build folder is never written again."""
    k1, b = bm25
    try:
        index = KeywordIndex.load(folder, chunks, k1=k1, b=b)
        log.info("index.keyword_loaded", index=name, path=str(folder), chunks=index.ntotal)
        return index, "loaded"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("index.keyword_rebuilt_in_memory", index=name, path=str(folder),
                    reason=f"{type(exc).__name__}: {exc}")
        return KeywordIndex.build(chunks, k1=k1, b=b), "rebuilt in memory"


def fingerprint(embedder: EmbeddingEngine, chunk_tokens: int, chunk_overlap: int,
                documents: Sequence[Document], *, headings: bool = False, window_tokens: int | None = None) -> str:
    """Hash everything the embeddings depend on: embedder, chunking, windows, format and document contents.

    The keyword index's rules are not in it: a build whose keyword index is outdated keeps its embeddings.
    """
    payload = {
        "format": FORMAT_VERSION,
        "embedder": embedder.identity,
        "dimension": embedder.dimension,
        "chunk_tokens": chunk_tokens,
        "chunk_overlap": chunk_overlap,
        "headings": headings,
        "documents": sorted((doc.path, doc.sha256) for doc in documents),
    }
    if window_tokens is not None:  # absent without windows, so builds made before windows existed are reused
        payload["windows"] = [window_tokens, window_overlap(window_tokens)]
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
    headings: bool = False,
    bm25: tuple[float, float] = (keyword.DEFAULT_K1, keyword.DEFAULT_B),
    window_tokens: int | None = None,
) -> OpenedIndex:
    """Load index `name` from root when its documents and settings are unchanged, else build it.

    With `headings`, each chunk is embedded and keyword-indexed under its markdown heading path. `bm25` is the
    keyword index's (k1, b); a build whose keyword index has others keeps its embeddings (see `_load_keyword`).
    With `window_tokens`, the documents are also embedded as windows of that many tokens (overlapping by a
    quarter), each standing for the chunk it overlaps most, for dense and hybrid searches to rank chunks by.
    """
    _check_name(name)
    check_chunk_params(chunk_tokens, chunk_overlap)
    if window_tokens is not None and not 1 <= window_tokens < chunk_tokens:
        raise IndexBuildError(f"index '{name}': window_tokens must be from 1 to chunk_tokens - 1 "
                              f"({chunk_tokens - 1}), got {window_tokens}")
    try:
        keyword.check_parameters(*bm25)
    except ValueError as exc:
        raise IndexBuildError(f"index '{name}': {exc}") from exc
    if chunk_tokens > embedder.max_tokens:
        raise IndexBuildError(
            f"index '{name}': chunk_tokens {chunk_tokens} exceeds embedder {embedder.identity} "
            f"max_tokens {embedder.max_tokens}; lower chunk_tokens so chunks are not truncated"
        )
    pattern_list = [patterns] if isinstance(patterns, str) else list(patterns)
    documents = await anyio.to_thread.run_sync(collect_documents, pattern_list, Path(base_dir))
    fp = fingerprint(embedder, chunk_tokens, chunk_overlap, documents, headings=headings, window_tokens=window_tokens)
    metadata = {doc.path: doc.meta for doc in documents}
    index_dir = Path(root) / name
    current = await anyio.to_thread.run_sync(_read_current, index_dir)
    if current is not None and not rebuild:
        loaded = await anyio.to_thread.run_sync(
            _try_load, index_dir, current, fp, embedder.dimension
        )
        if loaded is not None:
            log.info("index.reused", index=name, path=str(index_dir / current),
                     documents=len(documents), chunks=loaded[0].ntotal, device=loaded[0].device)
            return OpenedIndex(name=name, status="reused", fingerprint=fp, documents=len(documents),
                               path=index_dir / current, index=loaded[0], embedder=embedder, metadata=metadata,
                               bm25=bm25, windows=loaded[1])
    async with build_lock(index_dir, name):
        latest = await anyio.to_thread.run_sync(_read_current, index_dir)
        if latest is not None and latest != current:  # another process built it while we waited
            loaded = await anyio.to_thread.run_sync(_try_load, index_dir, latest, fp, embedder.dimension)
            if loaded is not None:
                log.info("index.reused", index=name, path=str(index_dir / latest), documents=len(documents),
                         chunks=loaded[0].ntotal, device=loaded[0].device, built_by="another process")
                return OpenedIndex(name=name, status="reused", fingerprint=fp, documents=len(documents),
                                   path=index_dir / latest, index=loaded[0], embedder=embedder, metadata=metadata,
                                   bm25=bm25, windows=loaded[1])
        status: Status = "rebuilt" if latest is not None else "built"
        folder, index, words, windows = await _build(
            name, index_dir, fp, documents, embedder, chunk_tokens, chunk_overlap, progress, headings, bm25,
            window_tokens)
    return OpenedIndex(name=name, status=status, fingerprint=fp, documents=len(documents),
                       path=folder, index=index, embedder=embedder, metadata=metadata, keyword_index=words,
                       bm25=bm25, windows=windows)


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
    chunk_tokens: int, chunk_overlap: int, progress: Progress | None, headings: bool, bm25: tuple[float, float],
    window_tokens: int | None,
) -> tuple[Path, VectorIndex, KeywordIndex, VectorIndex | None]:
    """Chunk, embed and index documents (FAISS, keyword, and windows if asked) into a new build folder, then make
    it CURRENT."""
    started = time.perf_counter()
    chunks, windows, parents = await anyio.to_thread.run_sync(
        _chunk_all, documents, embedder, chunk_tokens, chunk_overlap, headings, window_tokens
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
        vectors = await _embed_all(name, [*chunks, *windows], embedder, progress)
        index = await anyio.to_thread.run_sync(VectorIndex.build, vectors[: len(chunks)], chunks)
        window_index = None
        if window_tokens is not None:
            window_index = await anyio.to_thread.run_sync(
                VectorIndex.build, vectors[len(chunks):], [chunks[parent] for parent in parents])
        words = await anyio.to_thread.run_sync(functools.partial(KeywordIndex.build, chunks, k1=bm25[0], b=bm25[1]))
        manifest = _manifest(name, fp, embedder, chunk_tokens, chunk_overlap, documents, chunks, headings, words,
                             window_tokens, len(windows))
        await anyio.to_thread.run_sync(
            _write_and_commit, index_dir, folder, index, words, chunks, manifest, committed,
            None if window_index is None else (window_index, parents)
        )
    finally:
        if not committed:
            shutil.rmtree(folder, ignore_errors=True)
    log.info("index.built", index=name, path=str(folder), documents=len(documents),
             chunks=len(chunks), windows=len(windows), device=index.device,
             seconds=round(time.perf_counter() - started, 3))
    return folder, index, words, window_index


def window_overlap(window_tokens: int) -> int:
    """How many tokens consecutive windows share: a quarter of a window."""
    return window_tokens // 4


def _chunk_all(documents: Sequence[Document], embedder: EmbeddingEngine, chunk_tokens: int, chunk_overlap: int,
               headings: bool, window_tokens: int | None
               ) -> tuple[list[ChunkRecord], list[ChunkRecord], list[int]]:
    """The documents' chunks, and with window_tokens their windows and the id of the chunk each stands for."""
    chunks: list[ChunkRecord] = []
    windows: list[ChunkRecord] = []
    parents: list[int] = []
    for doc in documents:
        shift = doc.body_start  # the front matter is metadata, not text to search
        spans = [(start + shift, end + shift) for start, end in embedder.token_spans(doc.body)]
        own = chunk_document(doc, spans, chunk_tokens, chunk_overlap, first_id=len(chunks), headings=headings)
        chunks.extend(own)
        if window_tokens is not None and own:
            cut = chunk_document(doc, spans, window_tokens, window_overlap(window_tokens), first_id=len(windows),
                                 headings=headings)
            windows.extend(cut)
            parents.extend(window_parents(cut, own))
    return chunks, windows, parents


async def _embed_all(name: str, chunks: Sequence[ChunkRecord], embedder: EmbeddingEngine,
                     progress: Progress | None) -> np.ndarray:
    """Embed the chunks' (and windows') indexed texts in batches, reporting progress."""
    total = len(chunks)
    parts: list[np.ndarray] = []
    if progress is not None:
        progress(0, total)
    for first in range(0, total, EMBED_BATCH):
        batch = [chunk.indexed_text for chunk in chunks[first : first + EMBED_BATCH]]
        try:
            vectors = np.asarray(await embedder.embed(batch), dtype=np.float32)
        except MultilaneError:
            raise
        except Exception as exc:
            raise IndexBuildError(
                f"index '{name}': embedder {embedder.identity} failed on texts "
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
              documents: Sequence[Document], chunks: Sequence[ChunkRecord], headings: bool,
              words: KeywordIndex, window_tokens: int | None, windows: int) -> dict[str, Any]:
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
        "headings": headings,
        "keyword": {"folder": KEYWORD_FOLDER, "format": keyword.FORMAT_VERSION, "tokenizer": keyword.TOKENIZER,
                    "k1": words.k1, "b": words.b},
        "windows": None if window_tokens is None else {
            "tokens": window_tokens, "overlap": window_overlap(window_tokens), "count": windows,
            "index": WINDOWS_INDEX, "parents": WINDOWS_PARENTS},
        "documents": [
            {"path": d.path, "sha256": d.sha256, "chunks": per_doc.get(d.path, 0)}
            for d in documents
        ],
        "counts": {"documents": len(documents), "chunks": len(chunks)},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_and_commit(
    index_dir: Path, folder: Path, index: VectorIndex, words: KeywordIndex, chunks: Sequence[ChunkRecord],
    manifest: dict[str, Any], committed: list[bool], windows: tuple[VectorIndex, list[int]] | None = None,
) -> None:
    """Write the build folder (manifest last), point CURRENT at it, then drop older builds."""
    index.save(folder / "index.faiss")
    _fsync_file(folder / "index.faiss")
    words.save(folder / KEYWORD_FOLDER)
    if windows is not None:
        window_index, parents = windows
        window_index.save(folder / WINDOWS_INDEX)
        _fsync_file(folder / WINDOWS_INDEX)
        with (folder / WINDOWS_PARENTS).open("wb") as handle:
            np.save(handle, np.asarray(parents, dtype=np.int64))
            handle.flush()
            os.fsync(handle.fileno())
    lines = "".join(json.dumps(_chunk_json(c), ensure_ascii=False) + "\n" for c in chunks)
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


def _try_load(index_dir: Path, current: str, fp: str, dimension: int
              ) -> tuple[VectorIndex, VectorIndex | None] | None:
    """Load the build CURRENT names, and its windows if it has them, when its fingerprint is fp; None otherwise
    (warning if broken)."""
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
        return index, _load_windows(folder, manifest.get("windows"), chunks)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # missing or corrupt
        log.warning("index.corrupt_rebuilding", path=str(folder),
                    error=f"{type(exc).__name__}: {exc}")
        return None


def _load_windows(folder: Path, described: Any, chunks: Sequence[ChunkRecord]) -> VectorIndex | None:
    """The build's window index (row i standing for the chunk holding window i), or None if it has no windows."""
    if described is None:
        return None
    parents = np.load(folder / WINDOWS_PARENTS, allow_pickle=False)
    if parents.ndim != 1 or len(parents) != described["count"] or (
            len(parents) and not 0 <= int(parents.min()) <= int(parents.max()) < len(chunks)):
        raise ValueError(f"{WINDOWS_PARENTS} does not name a chunk for each of the {described['count']} windows")
    return VectorIndex.load(folder / WINDOWS_INDEX, [chunks[int(parent)] for parent in parents])


def _chunk_json(chunk: ChunkRecord) -> dict[str, Any]:
    data: dict[str, Any] = {"id": chunk.id, "source": chunk.source, "start": chunk.start, "end": chunk.end,
                            "text": chunk.text}
    if chunk.heading:
        data["heading"] = chunk.heading
    return data


def _chunk_from_json(line: str) -> ChunkRecord:
    data = json.loads(line)
    return ChunkRecord(id=int(data["id"]), source=str(data["source"]), text=str(data["text"]),
                       start=int(data["start"]), end=int(data["end"]), heading=str(data.get("heading", "")))


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
