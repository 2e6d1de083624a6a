"""Remote engines: a lane whose model is served by an OpenAI-compatible server (vLLM, Ray Serve LLM, Multilane).

Slots and the queue still apply on our side. The remote applies the chat template; where it offers vLLM's
`/tokenize`, prompts are counted there so that a context overflow is refused before it is sent. A 429 or
503 is retried with bounded backoff, then surfaces as `QueueFullError`; a connection lost mid-stream fails
the call with `EngineDeadError`, which drops the lane so that the next call reconnects.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import numpy as np
import structlog

from multilane.engines.base import Chunk, Message, SamplingOptions
from multilane.errors import ContextLengthError, EngineDeadError, EngineError, QueueFullError

log = structlog.get_logger(__name__)

_RETRY_STATUS = frozenset({429, 503})


@dataclass(frozen=True)
class RemoteSettings:
    """Where a remote engine is and how to talk to it (a model's `engine: {kind: remote, ...}`)."""

    url: str
    served_model: str
    api_key_env: str | None = None
    retries: int = 3
    backoff: float = 0.5  # seconds before the first retry; doubles each time
    timeout: float = 300.0
    connect_timeout: float = 5.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, default_model: str) -> RemoteSettings:
        """Read `engine:` options; unknown keys are an error naming them."""
        known = {"kind", "url", "served_model", "api_key_env", "retries", "backoff", "timeout", "connect_timeout"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise EngineError(f"unknown remote engine option(s) {', '.join(unknown)} "
                              f"(options: {', '.join(sorted(known))})")
        if not options.get("url"):
            raise EngineError("a remote engine needs `url`, e.g. http://127.0.0.1:8000")
        return cls(url=str(options["url"]).rstrip("/"), served_model=str(options.get("served_model") or default_model),
                   api_key_env=options.get("api_key_env"), retries=int(options.get("retries", 3)),
                   backoff=float(options.get("backoff", 0.5)), timeout=float(options.get("timeout", 300.0)),
                   connect_timeout=float(options.get("connect_timeout", 5.0)))

    def headers(self) -> dict[str, str]:
        """The Authorization header, from the environment variable the spec names."""
        if not self.api_key_env:
            return {}
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EngineError(f"remote engine at {self.url}: environment variable {self.api_key_env} is not set")
        return {"Authorization": f"Bearer {key}"}


@dataclass(frozen=True)
class RemotePrompt:
    """A prompt for a remote engine: the messages (or raw text) and, when the remote counts them, its tokens."""

    messages: list[Message] | None
    text: str | None
    tokens: int | None


class _Remote:
    """What remote generate and embedding engines share: the HTTP client, retries and error mapping."""

    def __init__(self, client: httpx.AsyncClient, settings: RemoteSettings, *, identity: str) -> None:
        self._client = client
        self.settings = settings
        self.identity = identity
        self.device = f"remote:{settings.url}"
        self._running = 0

    @staticmethod
    async def _connect(settings: RemoteSettings) -> tuple[httpx.AsyncClient, dict[str, Any]]:
        """Open a client and find the served model in the remote's /v1/models."""
        client = httpx.AsyncClient(base_url=settings.url, headers=settings.headers(),
                                   timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout))
        try:
            response = await client.get("/v1/models")
        except httpx.HTTPError as exc:
            await client.aclose()
            raise EngineError(f"cannot reach the remote engine at {settings.url}: {_describe(exc)}") from exc
        if response.status_code in (401, 403):
            await client.aclose()
            raise EngineError(f"the remote engine at {settings.url} refused our credentials "
                              f"({response.status_code}); check {settings.api_key_env or 'api_key_env'}")
        if response.status_code != 200:
            await client.aclose()
            raise EngineError(f"the remote engine at {settings.url} answered /v1/models with "
                              f"{response.status_code}: {response.text[:200]}")
        models = {m.get("id"): m for m in response.json().get("data", [])}
        if settings.served_model not in models:
            await client.aclose()
            raise EngineError(f"the remote engine at {settings.url} does not serve '{settings.served_model}' "
                              f"(it serves: {', '.join(map(str, models)) or 'nothing'}); set served_model")
        return client, models[settings.served_model]

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST with bounded retries on 429/503; other failures become Multilane errors."""
        delay = self.settings.backoff
        for attempt in range(self.settings.retries + 1):
            try:
                request = self._client.build_request("POST", path, json=body)
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise EngineDeadError(f"lost the remote engine at {self.settings.url}: {_describe(exc)}") from exc
            if response.status_code == 200:
                return response
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            if response.status_code in _RETRY_STATUS and attempt < self.settings.retries:
                log.info("remote busy, retrying", url=self.settings.url, status=response.status_code, delay=delay)
                await anyio.sleep(delay)
                delay *= 2
                continue
            raise _status_error(self.settings, response.status_code, text, attempts=attempt + 1)
        raise AssertionError("unreachable")  # pragma: no cover

    def unfinished_requests(self) -> int:
        """Requests this lane has in flight at the remote."""
        return self._running

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


class RemoteGenerateEngine(_Remote):
    """A generate lane served by an OpenAI-compatible server's /v1/chat/completions and /v1/completions."""

    def __init__(self, client: httpx.AsyncClient, settings: RemoteSettings, *, identity: str, context: int,
                 can_tokenize: bool) -> None:
        super().__init__(client, settings, identity=identity)
        self.context = context
        self._can_tokenize = can_tokenize

    @classmethod
    async def load(cls, settings: RemoteSettings, *, context: int | None) -> RemoteGenerateEngine:
        """Connect, check that the model is served, and learn its context and whether it counts tokens."""
        client, model = await cls._connect(settings)
        served_context = model.get("max_model_len")
        if context and served_context and context > served_context:
            await client.aclose()
            raise EngineError(f"model context {context} is larger than the remote's max_model_len "
                              f"{served_context} for '{settings.served_model}'; lower context")
        probe = await client.post("/tokenize", json={"model": settings.served_model, "prompt": "hi"})
        engine = cls(client, settings, identity=f"remote:{settings.url}#{settings.served_model}",
                     context=int(context or served_context or 2048), can_tokenize=probe.status_code == 200)
        log.info("remote engine connected", url=settings.url, model=settings.served_model,
                 context=engine.context, counts_tokens=engine._can_tokenize)
        return engine

    async def prepare(self, prompt: Sequence[Message] | str, max_tokens: int, *, truncate: bool,
                      model: str) -> RemotePrompt:
        """Count the prompt at the remote when it can, and refuse one that does not fit the context."""
        messages = None if isinstance(prompt, str) else list(prompt)
        text = prompt if isinstance(prompt, str) else None
        tokens: int | None = None
        if self._can_tokenize and not truncate:
            body: dict[str, Any] = {"model": self.settings.served_model}
            body.update({"prompt": text} if text is not None else {"messages": messages, "add_generation_prompt": True})
            response = await self._post("/tokenize", body)
            tokens = int(json.loads(await response.aread())["count"])
            if tokens + max_tokens > self.context:
                raise ContextLengthError(
                    f"model '{model}': prompt of {tokens} tokens + max_tokens {max_tokens} = {tokens + max_tokens} "
                    f"tokens, more than its context of {self.context} tokens; shorten the prompt, lower max_tokens, "
                    "or set truncate: true")
        return RemotePrompt(messages, text, tokens)

    async def stream(self, prompt: RemotePrompt, options: SamplingOptions, request_id: str) -> AsyncIterator[Chunk]:
        """Stream the remote's completion; closing the stream early closes the connection, which aborts it."""
        body: dict[str, Any] = {
            "model": self.settings.served_model, "stream": True, "max_tokens": options.max_tokens,
            "temperature": options.temperature, "top_p": options.top_p,
            "stream_options": {"include_usage": True},
        }
        if options.stop:
            body["stop"] = list(options.stop)
        if options.seed is not None:
            body["seed"] = options.seed
        if options.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extension; other servers ignore it
        if options.json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": options.json_schema}}
        if prompt.messages is not None:
            path = "/v1/chat/completions"
            body["messages"] = prompt.messages
        else:
            path = "/v1/completions"
            body["prompt"] = prompt.text
        self._running += 1
        try:
            response = await self._post(path, body)
            try:
                async for event in _sse(response, self.settings.url):
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                        finish = choice.get("finish_reason")
                        if piece or finish:
                            yield Chunk(piece or "", 1 if piece else 0, finish_reason=finish)
            finally:
                await response.aclose()
        finally:
            self._running -= 1


class RemoteEmbeddingEngine(_Remote):
    """An embedding lane served by an OpenAI-compatible server's /v1/embeddings."""

    def __init__(self, client: httpx.AsyncClient, settings: RemoteSettings, *, identity: str, dimension: int,
                 max_tokens: int) -> None:
        super().__init__(client, settings, identity=identity)
        self.dimension = dimension
        self.max_tokens = max_tokens

    @classmethod
    async def load(cls, settings: RemoteSettings) -> RemoteEmbeddingEngine:
        """Connect, and learn the embedding size from one probe."""
        client, model = await cls._connect(settings)
        engine = cls(client, settings, identity=f"remote:{settings.url}#{settings.served_model}", dimension=0,
                     max_tokens=int(model.get("max_model_len") or 512))
        engine.dimension = int((await engine.embed(["probe"])).shape[1])
        return engine

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts remotely, as L2-normalised float32 rows."""
        self._running += 1
        try:
            response = await self._post("/v1/embeddings", {"model": self.settings.served_model, "input": list(texts)})
            data = json.loads(await response.aread())["data"]
        finally:
            self._running -= 1
        rows = np.asarray([item["embedding"] for item in sorted(data, key=lambda d: d["index"])], dtype=np.float32)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        normalised: np.ndarray = rows / np.where(norms == 0, 1, norms)
        return normalised

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Approximate tokens by words: the remote does not expose its tokenizer's offsets."""
        import re

        return [m.span() for m in re.finditer(r"\S+", text)]


async def _sse(response: httpx.Response, url: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent-events response, until [DONE]."""
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise EngineError(f"the remote engine at {url} failed mid-stream: {event['error']}")
            yield event
    except httpx.HTTPError as exc:
        raise EngineDeadError(f"lost the remote engine at {url} mid-stream: {_describe(exc)}") from exc


def _status_error(settings: RemoteSettings, status: int, text: str, *, attempts: int) -> Exception:
    message = _error_message(text)
    if status in _RETRY_STATUS:
        return QueueFullError(f"the remote engine at {settings.url} is busy ({status}) after {attempts} tries; "
                              "retry later or raise its capacity")
    if status == 400 and ("context" in message.lower() or "max_model_len" in message.lower()
                          or "maximum" in message.lower()):
        return ContextLengthError(f"the remote engine at {settings.url} refused the prompt: {message}")
    if status in (401, 403):
        return EngineError(f"the remote engine at {settings.url} refused our credentials ({status})")
    return EngineError(f"the remote engine at {settings.url} answered {status}: {message}")


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
