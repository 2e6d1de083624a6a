"""Lanes and the pool: resident models, loaded on first use, one load at a time, shared when identical."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import structlog

from multilane.engines.base import Chunk, Completion, EmbeddingEngine, GenerateEngine, Message, SamplingOptions
from multilane.errors import ContextLengthError, EngineError, UnknownNameError

log = structlog.get_logger(__name__)

Engine = GenerateEngine | EmbeddingEngine
EngineLoader = Callable[[str], Awaitable[Engine]]
"""Loads the engine of a declared model, given its name."""

_request_ids = itertools.count(1)


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt rendered and tokenized for one lane, checked against its context."""

    text: str
    ids: list[int]


class Lane:
    """One resident model: its engine and the names it is declared under."""

    def __init__(self, name: str, engine: Engine, *, kind: str, load_seconds: float) -> None:
        self.name = name
        self.engine = engine
        self.kind = kind
        self.loaded_at = time.time()
        self.load_seconds = load_seconds
        self.in_flight = 0

    def _generate_engine(self) -> GenerateEngine:
        if not isinstance(self.engine, GenerateEngine) or self.kind != "generate":
            raise EngineError(f"model '{self.name}' is an embedding model; it cannot generate text")
        return self.engine

    def prepare(self, messages: Sequence[Message], max_tokens: int, *, truncate: bool = False) -> PreparedPrompt:
        """Render and tokenize messages; refuse a prompt that does not fit the context, or cut it if asked."""
        engine = self._generate_engine()
        text = engine.render(messages)
        ids = engine.encode(text)
        room = engine.context - max_tokens
        if len(ids) > room:
            if not truncate or room <= 0:
                raise ContextLengthError(
                    f"model '{self.name}': prompt of {len(ids)} tokens + max_tokens {max_tokens} = "
                    f"{len(ids) + max_tokens} exceeds its context of {engine.context} tokens; shorten the "
                    "prompt, lower max_tokens, raise the model's context, or set truncate: true")
            log.warning("prompt truncated", model=self.name, tokens=len(ids), kept=room)
            ids = ids[len(ids) - room:]  # keep the end: the question and the generation prompt
        return PreparedPrompt(text, ids)

    async def stream(self, messages: Sequence[Message], options: SamplingOptions, *,
                     truncate: bool = False) -> AsyncIterator[Chunk]:
        """Stream a completion of a chat; cancelling the consumer aborts the engine request."""
        prompt = self.prepare(messages, options.max_tokens, truncate=truncate)
        request_id = f"{self.name}-{next(_request_ids)}"
        self.in_flight += 1
        try:
            async for chunk in self._generate_engine().stream(prompt.ids, options, request_id):
                yield chunk
        finally:
            self.in_flight -= 1

    async def generate(self, messages: Sequence[Message], options: SamplingOptions, *,
                       truncate: bool = False) -> Completion:
        """Generate a whole completion of a chat."""
        prompt = self.prepare(messages, options.max_tokens, truncate=truncate)
        request_id = f"{self.name}-{next(_request_ids)}"
        parts: list[str] = []
        tokens = 0
        finish: str | None = None
        self.in_flight += 1
        try:
            async for chunk in self._generate_engine().stream(prompt.ids, options, request_id):
                parts.append(chunk.text)
                tokens += chunk.tokens
                finish = chunk.finish_reason or finish
        finally:
            self.in_flight -= 1
        return Completion("".join(parts), len(prompt.ids), tokens, finish)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts with this lane's embedding model."""
        if not isinstance(self.engine, EmbeddingEngine) or self.kind != "embedding":
            raise EngineError(f"model '{self.name}' is a generate model; it cannot embed text")
        self.in_flight += 1
        try:
            return await self.engine.embed(texts)
        finally:
            self.in_flight -= 1

    def describe(self) -> dict[str, Any]:
        """What `ps` shows of this lane."""
        return {"name": self.name, "kind": self.kind, "identity": self.engine.identity,
                "device": self.engine.device, "loaded_at": self.loaded_at,
                "load_seconds": round(self.load_seconds, 3), "in_flight": self.in_flight}


class Pool:
    """The lanes loaded now; loads on demand, one at a time, and closes them all at the end."""

    def __init__(self, kinds: dict[str, str], loader: EngineLoader) -> None:
        self._kinds = kinds  # declared model name -> "generate" | "embedding"
        self._loader = loader
        self._lanes: dict[str, Lane] = {}
        self._load_lock = anyio.Lock()

    async def lane(self, name: str) -> Lane:
        """The lane of a declared model, loading it first if needed."""
        lane = self._lanes.get(name)
        if lane is not None:
            return lane
        if name not in self._kinds:
            raise UnknownNameError(f"unknown model '{name}' (declared: {', '.join(self._kinds)})")
        async with self._load_lock:  # one load at a time: loads compete for the same memory and cores
            lane = self._lanes.get(name)
            if lane is None:
                started = time.perf_counter()
                engine = await self._loader(name)
                lane = Lane(name, engine, kind=self._kinds[name], load_seconds=time.perf_counter() - started)
                self._lanes[name] = lane
                log.info("lane loaded", model=name, seconds=round(lane.load_seconds, 2))
        return lane

    def ps(self) -> list[dict[str, Any]]:
        """The loaded lanes."""
        return [lane.describe() for lane in self._lanes.values()]

    async def close(self) -> None:
        """Close every engine, even if the caller is being cancelled."""
        lanes, self._lanes = list(self._lanes.values()), {}
        with anyio.CancelScope(shield=True):
            for lane in lanes:
                try:
                    await lane.engine.close()
                except Exception as exc:  # one engine failing to stop must not leave the others running
                    log.error("engine close failed", model=lane.name, error=str(exc))
