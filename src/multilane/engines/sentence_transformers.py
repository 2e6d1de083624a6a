"""Embedding engine on sentence-transformers, encoding in a worker thread off the event loop."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np
import structlog

from multilane.batching import MicroBatcher
from multilane.errors import EngineError, InputError

log = structlog.get_logger(__name__)


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise EngineError(f"embed takes strings; got {type(text).__name__}")


def pick_device() -> str:
    """CUDA when torch sees a GPU, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceTransformerEngine:
    """A loaded sentence-transformers model; concurrent embed calls are micro-batched into one encode."""

    def __init__(self, model: Any, *, identity: str, device: str, batch_size: int = 32,
                 batch_wait: float = 0.002) -> None:
        self._model = model
        self.identity = identity
        self.device = device
        self.batch_size = batch_size
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        self.max_tokens = int(model.max_seq_length)
        # torch already uses every core for one encode; two at once would only fight for them.
        self._limiter = anyio.CapacityLimiter(1)
        # A fast tokenizer raises "Already borrowed" when two threads use it at once.
        self._tokenizer_lock = threading.Lock()
        self.batcher: MicroBatcher[str, np.ndarray] = MicroBatcher(
            self._encode_batch, max_batch_size=batch_size, max_wait=batch_wait, name=f"embed:{identity}",
            validate=_check_text)

    @classmethod
    async def load(cls, path: str, *, identity: str, batch_size: int = 32, batch_wait: float = 0.002,
                   device: str | None = None) -> SentenceTransformerEngine:
        """Load a sentence-transformers folder onto the best device."""

        def _load() -> SentenceTransformerEngine:
            from sentence_transformers import SentenceTransformer

            chosen = device or pick_device()
            model = SentenceTransformer(path, device=chosen, local_files_only=True)
            return cls(model, identity=identity, device=chosen, batch_size=batch_size, batch_wait=batch_wait)

        log.info("loading embedding model", path=path)
        try:
            return await anyio.to_thread.run_sync(_load)
        except Exception as exc:
            raise EngineError(f"sentence-transformers could not load {path}: {exc}") from exc

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts as L2-normalised float32 rows; concurrent calls share one encode."""
        if isinstance(texts, str):
            raise EngineError("embed takes a list of texts, not one string")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        rows = await self.batcher.submit_many(list(texts))
        return np.stack(rows)

    async def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts in one encode of their own, bypassing the micro-batcher."""
        return np.stack(await self._encode_batch(list(texts)))

    async def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self._model is None:
            raise EngineError("embedding engine is closed")
        model = self._model

        def _encode() -> np.ndarray:
            with self._tokenizer_lock:
                vectors = model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False)
            return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)

        return list(await anyio.to_thread.run_sync(_encode, limiter=self._limiter))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of each word-piece of text."""
        with self._tokenizer_lock:
            encoded = self._model.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False,
                                            truncation=False, verbose=False)
        return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids of this model's vocabulary; special tokens are left out."""
        with self._tokenizer_lock:
            tokenizer = self._model.tokenizer
            size = len(tokenizer)
            outside = next((i for i in ids if not 0 <= i < size), None)
            if outside is not None:
                raise InputError(f"token id {outside} is outside the vocabulary of embedding model "
                                 f"{self.identity} ({size} tokens); send ids of its own tokenizer, or text")
            text: str = tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    async def close(self) -> None:
        """Drop the model so its memory can be freed."""
        self._model = None
