"""The small protocols every engine backend implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample one completion."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = None  # constrain the output to this JSON schema
    ignore_eos: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output: the new text and how many new tokens it holds."""

    text: str
    tokens: int
    finish_reason: str | None = None  # set on the last chunk
    prompt_tokens: int = 0  # set by the lane on every chunk it passes on
    cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache; set once the prompt is read


@dataclass(frozen=True)
class Completion:
    """A finished generation; `cached_tokens` of its prompt tokens came from the engine's prefix cache."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    cached_tokens: int = 0


Message = dict[str, str]  # {"role": ..., "content": ...}


async def collect(chunks: AsyncGenerator[Chunk, None],
                  on_text: Callable[[str], Awaitable[None]] | None = None) -> Completion:
    """Gather a stream of chunks into a Completion, passing each piece of text to `on_text` as it comes."""
    parts: list[str] = []
    tokens = prompt_tokens = cached_tokens = 0
    finish: str | None = None
    async with aclosing(chunks):  # leaving early (an error in on_text, a cancel) aborts the request at once
        async for chunk in chunks:
            parts.append(chunk.text)
            tokens += chunk.tokens
            finish = chunk.finish_reason or finish
            prompt_tokens = chunk.prompt_tokens or prompt_tokens
            cached_tokens = chunk.cached_tokens or cached_tokens
            if on_text is not None and chunk.text:
                await on_text(chunk.text)
    return Completion("".join(parts), prompt_tokens, tokens, finish, cached_tokens=cached_tokens)


@runtime_checkable
class GenerateEngine(Protocol):
    """A loaded text-generation model; concurrent calls are batched by the engine itself.

    A local engine also has `render` and `encode` (see `TokenizingEngine`): the lane then counts, checks and
    cuts prompts itself and streams token ids. An engine without them (a remote one) has an async `prepare`
    (see `PreparingEngine`) and streams whatever that returned.
    """

    identity: str
    context: int
    device: str

    def stream(self, prompt: Any, options: SamplingOptions, request_id: str, *,
               priority: int = 0) -> AsyncIterator[Chunk]:
        """Stream a completion of a prepared prompt; closing the iterator early aborts the request.

        `priority` (lower first) orders the request among those waiting inside the engine, where it has a queue.
        """
        ...

    def unfinished_requests(self) -> int:
        """How many requests the engine holds now (running or waiting inside it)."""
        ...

    async def close(self) -> None:
        """Stop the engine and free its memory; idempotent."""
        ...


@runtime_checkable
class TokenizingEngine(GenerateEngine, Protocol):
    """A generate engine with its tokenizer at hand: its prompts are token ids."""

    def render(self, messages: Sequence[Message]) -> str:
        """Apply the model's chat template to messages, ready for generation."""
        ...

    def encode(self, prompt: str) -> list[int]:
        """Tokenize a rendered prompt with the model's own tokenizer (the template adds special tokens)."""
        ...


class PreparedPrompt(Protocol):
    """A prompt an engine prepared itself, with its token count when the engine could count it."""

    @property
    def tokens(self) -> int | None: ...


@runtime_checkable
class PreparingEngine(GenerateEngine, Protocol):
    """A generate engine that prepares (and checks) prompts itself, such as a remote one."""

    async def prepare(self, prompt: Sequence[Message] | str, max_tokens: int, *, truncate: bool,
                      model: str) -> PreparedPrompt:
        """Make a prompt ready to stream; raises ContextLengthError when it cannot fit."""
        ...


@runtime_checkable
class EmbeddingEngine(Protocol):
    """A loaded embedding model."""

    identity: str  # stable across runs for the same weights: part of an index's fingerprint
    device: str
    dimension: int
    max_tokens: int  # longest input the model embeds without truncation

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts as an (n, dimension) float32 array of L2-normalised rows."""
        ...

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character (start, end) offsets of each token of text, special tokens excluded."""
        ...

    async def close(self) -> None:
        """Free the model; idempotent."""
        ...


@runtime_checkable
class DecodingEmbeddingEngine(EmbeddingEngine, Protocol):
    """An embedding engine with its tokenizer at hand, which can turn token ids back into text."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids of the model's own vocabulary; InputError for an id outside it."""
        ...
