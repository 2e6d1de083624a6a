"""Retrieval: chunk documents, embed them into a FAISS index, persist it and search it."""

from __future__ import annotations

from multilane.retrieval.index import Hit, VectorIndex
from multilane.retrieval.ingest import (
    ChunkRecord,
    Document,
    chunk_document,
    collect_documents,
)
from multilane.retrieval.store import OpenedIndex, fingerprint, open_index

__all__ = [
    "ChunkRecord",
    "Document",
    "Hit",
    "OpenedIndex",
    "VectorIndex",
    "chunk_document",
    "collect_documents",
    "fingerprint",
    "open_index",
]
