"""A BM25 keyword index over the same chunks as the vector index (bm25s), for names, numbers and rare words.

Text is tokenized for code as much as for prose: lowercased, split into words (`\\w+`), format
conversions such as `!r`, and runs of operator characters (`:=`, `**`, `//`, `->`); words are stemmed
with the Snowball English stemmer, and a word with underscores also counts as its parts, so
`__slots__` matches both "__slots__" and "slots". No stopwords are dropped: Python's keywords (`if`,
`in`, `is`, `not`) are English stopwords, and BM25's inverse document frequency already discounts
common words.

BM25's defaults are k1 = 0.9 and b = 0.4 (Anserini's, tuned for passages), not the 1.2-1.5 and 0.75 meant
for whole documents: chunks are passages of nearly one length, and a chunk is short mostly because it is a
document's last one, which b = 0.75 rewards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
import Stemmer
import structlog

from multilane.retrieval.index import Hit
from multilane.retrieval.ingest import ChunkRecord

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
TOKENIZER = "multilane-code-en-v1"  # names the tokenization rules; change it when they change
META_FILE = "keyword.json"
_MAX_OPERATOR = 3  # the longest operators are three characters: **=, //=, >>=, <<=, ...
_STEM_CACHE = 100_000
DEFAULT_K1 = 0.9  # term-frequency saturation
DEFAULT_B = 0.4  # length normalisation: 0 none, 1 full

_TOKEN = re.compile(r"![a-z]\b|\w+|[-+*/%@&|^~<>=!:.]{2,}|[-+*/%@&|^~<>=]")


class Tokenizer:
    """Turns text into BM25 terms; safe to share between threads."""

    def __init__(self) -> None:
        self._stemmer = Stemmer.Stemmer("english")
        self._cache: dict[str, str] = {}

    def tokenize(self, text: str) -> list[str]:
        """The terms of text, in order, repeats kept."""
        terms: list[str] = []
        for token in _TOKEN.findall(text.lower()):
            if not (token[0].isalnum() or token[0] == "_"):
                if len(token) <= _MAX_OPERATOR:  # longer runs are rules and table borders, not operators
                    terms.append(token)  # an operator, or a conversion such as !r
                continue
            terms.append(self._stem(token))
            if "_" in token.strip("_"):
                terms.extend(self._stem(part) for part in token.split("_") if part)
            elif token.strip("_") and token.strip("_") != token:
                terms.append(self._stem(token.strip("_")))
        return terms

    def _stem(self, word: str) -> str:
        stem = self._cache.get(word)
        if stem is None:
            stem = str(self._stemmer.stemWord(word))
            if len(self._cache) < _STEM_CACHE:
                self._cache[word] = stem
        return stem


class KeywordIndex:
    """BM25 over chunk texts; document i of the index is chunks[i]."""

    def __init__(self, retriever: Any | None, chunks: Sequence[ChunkRecord], *,
                 tokenizer: Tokenizer | None = None, k1: float = DEFAULT_K1, b: float = DEFAULT_B) -> None:
        self.chunks: tuple[ChunkRecord, ...] = tuple(chunks)
        documents = 0 if retriever is None else int(retriever.scores["num_docs"])
        if documents != len(self.chunks):
            raise ValueError(f"keyword index holds {documents} documents but {len(self.chunks)} chunks were given")
        self._retriever = retriever
        self._tokenizer = tokenizer or Tokenizer()
        self._k1, self._b = (k1, b) if retriever is None else (float(retriever.k1), float(retriever.b))

    @classmethod
    def build(cls, chunks: Sequence[ChunkRecord], *, k1: float = DEFAULT_K1, b: float = DEFAULT_B) -> KeywordIndex:
        """Tokenize and index the chunks' texts (with their heading paths, when they have them); blocks."""
        check_parameters(k1, b)
        bm25s = _bm25s()
        tokenizer = Tokenizer()
        if not chunks:
            return cls(None, chunks, tokenizer=tokenizer, k1=k1, b=b)
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index([tokenizer.tokenize(chunk.indexed_text) for chunk in chunks], show_progress=False)
        return cls(retriever, chunks, tokenizer=tokenizer)

    @classmethod
    def load(cls, folder: Path, chunks: Sequence[ChunkRecord], *, k1: float | None = None,
             b: float | None = None) -> KeywordIndex:
        """Read an index written by `save`; raises ValueError when it was made by other rules, for other chunks,
        or with another k1 or b than those given (its scores are computed when it is built)."""
        meta = json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION or meta.get("tokenizer") != TOKENIZER:
            raise ValueError(f"keyword index in {folder} has format {meta.get('format')} and tokenizer "
                             f"{meta.get('tokenizer')!r}; this version needs {FORMAT_VERSION} and {TOKENIZER!r}")
        if meta.get("documents") != len(chunks):
            raise ValueError(f"keyword index in {folder} holds {meta.get('documents')} documents, "
                             f"not the {len(chunks)} chunks given")
        if (k1 is not None and meta.get("k1") != k1) or (b is not None and meta.get("b") != b):
            raise ValueError(f"keyword index in {folder} was built with k1 {meta.get('k1')} and b {meta.get('b')}, "
                             f"not the k1 {k1} and b {b} asked for")
        if not chunks:
            return cls(None, chunks, k1=float(meta.get("k1", DEFAULT_K1)), b=float(meta.get("b", DEFAULT_B)))
        retriever = _bm25s().BM25.load(str(folder), load_corpus=False, show_progress=False)
        return cls(retriever, chunks)

    def save(self, folder: Path) -> None:
        """Write the index to folder (which must not exist yet), via a scratch folder renamed at the end."""
        target = Path(folder)
        if target.exists():
            raise FileExistsError(f"{target} already exists; a keyword index is written to a new folder")
        scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        scratch.mkdir(parents=True)
        bm25s = _bm25s()
        try:
            if self._retriever is not None:
                self._retriever.save(str(scratch), show_progress=False)
            meta = {"format": FORMAT_VERSION, "tokenizer": TOKENIZER, "documents": self.ntotal,
                    "k1": self.k1, "b": self.b, "bm25s": bm25s.__version__}
            (scratch / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            for path in scratch.iterdir():
                _fsync(path)
            os.rename(scratch, target)
            _fsync(target.parent, directory=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @property
    def ntotal(self) -> int:
        """Number of indexed chunks."""
        return len(self.chunks)

    @property
    def k1(self) -> float:
        """BM25's term-frequency saturation."""
        return self._k1

    @property
    def b(self) -> float:
        """BM25's document-length normalisation."""
        return self._b

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        """Return each query's top_k chunks by BM25 score, best first; blocks.

        Only chunks that share a term with the query are returned, so a list may be shorter than top_k;
        equal scores are ordered by chunk id. A term repeated in a query counts once.
        """
        if isinstance(queries, str):
            raise TypeError("search takes a sequence of query strings, not one string")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        return [self._search_one(query, top_k) for query in queries]

    async def asearch(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        """Like `search`, in a worker thread so the event loop keeps running."""
        return await anyio.to_thread.run_sync(self.search, queries, top_k)

    def _search_one(self, query: str, top_k: int) -> list[Hit]:
        if self._retriever is None:
            return []
        vocabulary: dict[str, int] = self._retriever.vocab_dict
        ids = list(dict.fromkeys(vocabulary[term] for term in self._tokenizer.tokenize(query)
                                 if term and term in vocabulary))
        if not ids:
            return []
        scores = np.asarray(self._retriever.get_scores_from_ids(ids), dtype=np.float64)
        matched = np.flatnonzero(scores > 0)
        if len(matched) > top_k:  # keep every chunk tied with the k-th best, then order exactly
            cutoff = np.partition(scores[matched], len(matched) - top_k)[len(matched) - top_k]
            matched = matched[scores[matched] >= cutoff]
        order = matched[np.lexsort((matched, -scores[matched]))][:top_k]
        return [Hit(self.chunks[int(row)], float(scores[row])) for row in order]


def check_parameters(k1: float, b: float) -> None:
    """Raise ValueError unless k1 is finite and not negative and b is from 0 to 1."""
    if not math.isfinite(k1) or k1 < 0:
        raise ValueError(f"BM25's k1 must be finite and not negative, got {k1}")
    if not 0 <= b <= 1:
        raise ValueError(f"BM25's b must be from 0 to 1, got {b}")


def _bm25s() -> Any:
    """The bm25s module, imported when first needed (it takes most of a second to import)."""
    import bm25s

    # bm25s sets its own logger to DEBUG, which would print its progress through any handler the application
    # installed; let the application's levels decide, as for any other library.
    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


def _fsync(path: Path, *, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk; some platforms cannot sync folders, which is fine."""
    if path.is_dir() and not directory:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
