"""A FAISS inner-product index over normalised embeddings (cosine similarity), GPU when present."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import faiss
import numpy as np
import structlog

from multilane.retrieval.ingest import ChunkRecord

log = structlog.get_logger(__name__)

_GPU_MAX_K = 2048  # FAISS GPU indexes refuse larger k


@dataclass(frozen=True)
class Hit:
    """A chunk that matched a query, with its cosine similarity."""

    chunk: ChunkRecord
    score: float


def gpu_count() -> int:
    """Number of GPUs FAISS can use; 0 with faiss-cpu."""
    if not hasattr(faiss, "get_num_gpus") or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:  # a broken CUDA setup must not stop CPU search
        return 0


class VectorIndex:
    """Exact cosine search over chunk embeddings; row i of the index is chunks[i]."""

    def __init__(
        self, cpu_index: Any, chunks: Sequence[ChunkRecord], *, use_gpu: bool = True
    ) -> None:
        if cpu_index.ntotal != len(chunks):
            raise ValueError(
                f"index holds {cpu_index.ntotal} vectors but {len(chunks)} chunks were given"
            )
        self.chunks: tuple[ChunkRecord, ...] = tuple(chunks)
        self.dimension: int = int(cpu_index.d)
        self._cpu = cpu_index
        self._search_index = cpu_index
        self._lock: threading.Lock | None = None
        self.device = "cpu"
        if use_gpu and gpu_count() > 0:
            self._search_index = faiss.index_cpu_to_all_gpus(cpu_index)
            self._lock = threading.Lock()  # GPU indexes are not safe to search from many threads
            self.device = "cuda"
        log.debug("index.ready", vectors=self.ntotal, dimension=self.dimension, device=self.device)

    @classmethod
    def build(
        cls, vectors: np.ndarray, chunks: Sequence[ChunkRecord], *, use_gpu: bool = True
    ) -> VectorIndex:
        """Index the (n, dim) embeddings of chunks, one row per chunk."""
        matrix = _as_matrix(vectors)
        cpu_index = faiss.IndexFlatIP(matrix.shape[1])
        if len(matrix):
            cpu_index.add(matrix)
        return cls(cpu_index, chunks, use_gpu=use_gpu)

    @classmethod
    def load(
        cls, path: Path, chunks: Sequence[ChunkRecord], *, use_gpu: bool = True
    ) -> VectorIndex:
        """Read an index written by `save`; chunks must match its rows."""
        return cls(faiss.read_index(str(path)), chunks, use_gpu=use_gpu)

    def save(self, path: Path) -> None:
        """Write the CPU copy of the index to path."""
        faiss.write_index(self._cpu, str(path))

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self._cpu.ntotal)

    def search(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        """Return the top_k hits of each query row, best first, in one FAISS call; blocks."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        matrix = _as_matrix(queries)
        if matrix.shape[1] != self.dimension:
            raise ValueError(
                f"queries have dimension {matrix.shape[1]}, the index has {self.dimension}"
            )
        if len(matrix) == 0:
            return []
        k = min(top_k, self.ntotal)
        if k == 0:
            return [[] for _ in range(len(matrix))]
        if self._lock is None:
            scores, ids = self._search_index.search(matrix, k)
        else:
            with self._lock:
                scores, ids = self._search_index.search(matrix, min(k, _GPU_MAX_K))
        return [
            [Hit(self.chunks[i], float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]

    async def asearch(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        """Like `search`, in a worker thread so the event loop keeps running."""
        return await anyio.to_thread.run_sync(self.search, queries, top_k)


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    """Return a contiguous float32 (n, d) copy with L2-normalised rows."""
    matrix = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if matrix.ndim != 2:
        raise ValueError(f"expected an (n, dimension) array, got shape {matrix.shape}")
    if len(matrix):
        faiss.normalize_L2(matrix)
    return matrix
