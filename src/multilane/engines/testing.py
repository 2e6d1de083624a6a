"""Deterministic fake engines for fast tests of pipelines and agents, with no model at all."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from multilane.engines.base import Chunk, Message, SamplingOptions
from multilane.errors import EngineDeadError, InputError

Reply = str | Callable[[str, SamplingOptions], str]
_WORD = re.compile(r"\S+")


@dataclass
class CallRecord:
    """One request a fake engine served: what it was asked, when it ran, how it ended."""

    request_id: str
    prompt: str
    options: SamplingOptions
    started: float
    finished: float | None = None
    aborted: bool = False
    priority: int = 0  # the priority the lane passed on
    cached_tokens: int = 0  # prompt tokens the fake's prefix cache held (see `cache_block_size`)


def example_for_schema(schema: dict[str, Any]) -> Any:
    """A small value valid against a simple JSON schema (objects, arrays, enums, scalars)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return example_for_schema(schema[key][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object":
        props = schema.get("properties", {})
        return {name: example_for_schema(props[name]) for name in schema.get("required", list(props))}
    if kind == "array":
        return [example_for_schema(schema.get("items", {"type": "string"}))] * schema.get("minItems", 1)
    return {"string": "text", "integer": 0, "number": 0.0, "boolean": True, "null": None}.get(kind, "text")


Pace = Callable[[], Awaitable[None]]
"""Awaited before each token (or each embed): a test's own clock, so that no fake sleeps in real time."""


class FakeGenerateEngine:
    """A generate engine that answers with a fixed or computed reply, one word per token, at a set pace.

    With a JSON schema in the options it answers with a value valid against the schema, as vLLM's
    structured outputs would. Every call is recorded in `calls`, with start and end times. Tokens come
    every `token_delay` seconds, or whenever `pace()` returns; `kill()` makes the engine die.

    With `cache_block_size`, the fake keeps a prefix cache as vLLM does: the full blocks of that many prompt
    tokens of every call are remembered, and a later prompt that starts with the same blocks reports them as
    its `cached_tokens` (never its last token, which an engine always computes). Generated tokens are not cached.
    """

    def __init__(self, reply: Reply = "fake reply", *, context: int = 2048, token_delay: float = 0.0,
                 identity: str = "fake-generate", device: str = "cpu", pace: Pace | None = None,
                 cache_block_size: int | None = None) -> None:
        if cache_block_size is not None and cache_block_size < 1:
            raise ValueError(f"cache_block_size must be 1 or more, got {cache_block_size}")
        self.reply = reply
        self.context = context
        self.token_delay = token_delay
        self.pace = pace
        self.identity = identity
        self.device = device
        self.cache_block_size = cache_block_size
        self.calls: list[CallRecord] = []
        self.closed = False
        self._running = 0
        self._texts: dict[tuple[int, ...], str] = {}
        self._blocks: set[tuple[int, ...]] = set()  # every cached prefix, a whole number of blocks long
        self.dead = False

    def render(self, messages: Sequence[Message]) -> str:
        """Join the turns as `role: content` lines."""
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def encode(self, prompt: str) -> list[int]:
        """One token per whitespace-separated word; the fake remembers the text behind the ids."""
        ids = [int(hashlib.blake2b(w.encode(), digest_size=2).hexdigest(), 16) for w in _WORD.findall(prompt)]
        self._texts[tuple(ids)] = prompt
        return ids

    def unfinished_requests(self) -> int:
        """Requests streaming now."""
        return self._running

    def kill(self) -> None:
        """Make the engine die as a killed vLLM process would: every call, running or new, fails."""
        self.dead = True

    def _cached_prefix(self, prompt_ids: Sequence[int]) -> int:
        """How many leading prompt tokens the prefix cache holds, in whole blocks; remembers this prompt's blocks."""
        size = self.cache_block_size
        if size is None:
            return 0
        ids = tuple(prompt_ids)
        cached = 0
        while cached + size <= len(ids) - 1 and ids[:cached + size] in self._blocks:
            cached += size
        self._blocks.update(ids[:end] for end in range(size, len(ids) + 1, size))
        return cached

    def _answer(self, prompt: str, options: SamplingOptions) -> str:
        if callable(self.reply):
            return self.reply(prompt, options)
        if options.json_schema is not None:
            return json.dumps(example_for_schema(options.json_schema))
        return self.reply

    async def stream(self, prompt_ids: Sequence[int], options: SamplingOptions, request_id: str, *,
                     priority: int = 0) -> AsyncIterator[Chunk]:
        """Yield the reply word by word, sleeping `token_delay` before each; each chunk says its cached tokens."""
        if self.dead:
            raise EngineDeadError("the fake engine is dead")
        prompt = self._texts.get(tuple(prompt_ids), "")
        cached = self._cached_prefix(prompt_ids)
        record = CallRecord(request_id, prompt, options, time.perf_counter(), aborted=True, priority=priority,
                            cached_tokens=cached)
        self.calls.append(record)
        self._running += 1
        every = re.findall(r"\S+\s*", self._answer(prompt, options))
        words = every[: options.max_tokens] or [""]
        finish = "length" if len(every) > options.max_tokens else "stop"  # cut at max_tokens, as vLLM says
        try:
            for i, word in enumerate(words):
                if self.pace is not None:
                    await self.pace()
                else:
                    await anyio.sleep(self.token_delay)
                if self.dead:
                    raise EngineDeadError("the fake engine died mid-stream")
                last = i == len(words) - 1
                if last:
                    record.aborted = False
                yield Chunk(word, 1 if word else 0, finish_reason=finish if last else None, cached_tokens=cached)
        finally:
            record.finished = time.perf_counter()
            self._running -= 1

    async def close(self) -> None:
        """Mark the engine closed."""
        self.closed = True


class FakeEmbeddingEngine:
    """An embedding engine that hashes words into a normalised bag-of-words vector.

    Each embed waits for `pace()` when given; `kill()` makes the engine die.
    """

    def __init__(self, dimension: int = 64, *, identity: str = "fake-embedding", device: str = "cpu",
                 max_tokens: int = 256, vocabulary: int = 1000, pace: Pace | None = None) -> None:
        self.dimension = dimension
        self.vocabulary = vocabulary
        self.identity = identity
        self.device = device
        self.max_tokens = max_tokens
        self.pace = pace
        self.calls: list[list[str]] = []
        self.closed = False
        self.dead = False

    def kill(self) -> None:
        """Make the engine die as a crashed model process would: every embed, running or new, fails."""
        self.dead = True

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed each text as its normalised hashed word counts."""
        if self.dead:
            raise EngineDeadError("the fake engine is dead")
        self.calls.append(list(texts))
        if self.pace is not None:
            await self.pace()
            if self.dead:
                raise EngineDeadError("the fake engine died mid-embed")
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                word = word.strip(".,;:!?()[]\"'")
                if word:
                    out[row, int(hashlib.blake2b(word.encode(), digest_size=4).hexdigest(), 16)
                        % self.dimension] += 1.0
            norm = float(np.linalg.norm(out[row]))
            if norm:
                out[row] /= norm
        return out

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """One token per whitespace-separated word."""
        return [m.span() for m in _WORD.finditer(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Token id n is the word `tn`, for n below `vocabulary`; InputError for others."""
        outside = next((i for i in ids if not 0 <= i < self.vocabulary), None)
        if outside is not None:
            raise InputError(f"token id {outside} is outside the fake vocabulary ({self.vocabulary} tokens)")
        return " ".join(f"t{i}" for i in ids)

    async def close(self) -> None:
        """Mark the engine closed."""
        self.closed = True
