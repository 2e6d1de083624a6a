"""Remote engines: a lane whose model is served by an OpenAI-compatible server (vLLM, Ray Serve LLM, Multilane).

Slots and the queue still apply on our side. The remote applies the chat template; where it offers vLLM's
`/tokenize`, prompts are counted there so that a context overflow is refused before it is sent. Completion
tokens are the remote's own count (its `usage`). A 429 or 503 is retried after the remote's `Retry-After`,
or with bounded backoff, then surfaces as `QueueFullError`; a connection lost mid-stream fails the call with
`EngineDeadError`, which drops the lane so that the next call reconnects.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import numpy as np
import structlog
import tenacity
from httpx_sse import EventSource, SSEError

from multilane.engines.base import Chunk, Message, SamplingOptions
from multilane.errors import ContextLengthError, EngineDeadError, EngineError, QueueFullError

log = structlog.get_logger(__name__)

_RETRY_STATUS = frozenset({429, 503})
_OPTIONS = ("kind", "url", "served_model", "api_key_env", "retries", "backoff", "max_retry_wait", "timeout",
            "connect_timeout")

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RemoteSettings:
    """Where a remote engine is and how to talk to it (a model's `engine: {kind: remote, ...}`)."""

    url: str  # the server's root: vLLM's /tokenize lives there, beside /v1
    served_model: str
    api_key_env: str | None = None
    retries: int = 3
    backoff: float = 0.5  # seconds before the first retry (plus up to as much again of jitter); doubles each time
    max_retry_wait: float = 30.0  # the longest wait before a retry; a longer Retry-After gives up at once
    timeout: float = 300.0
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", server_root(self.url))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, default_model: str) -> RemoteSettings:
        """Read `engine:` options; unknown keys are an error naming them."""
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise EngineError(f"unknown remote engine option(s) {', '.join(unknown)} "
                              f"(options: {', '.join(sorted(_OPTIONS))})")
        if not options.get("url"):
            raise EngineError("a remote engine needs `url`, e.g. http://127.0.0.1:8000")
        settings = cls(url=str(options["url"]),
                       served_model=str(options.get("served_model") or default_model),
                       api_key_env=options.get("api_key_env"), retries=int(options.get("retries", 3)),
                       backoff=float(options.get("backoff", 0.5)),
                       max_retry_wait=float(options.get("max_retry_wait", 30.0)),
                       timeout=float(options.get("timeout", 300.0)),
                       connect_timeout=float(options.get("connect_timeout", 5.0)))
        if settings.retries < 0 or not settings.backoff >= 0 or not settings.max_retry_wait >= 0:
            raise EngineError("remote engine `retries`, `backoff` and `max_retry_wait` must be 0 or more "
                              f"(got {settings.retries}, {settings.backoff}, {settings.max_retry_wait})")
        return settings

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


def server_root(url: str) -> str:
    """The server's root URL; an OpenAI-SDK style base URL ending in `/v1` names the same server."""
    return url.rstrip("/").removesuffix("/v1")


class _Busy(Exception):
    """A 429 or 503: the remote asks us to come back later, after `retry_after` seconds when it says so."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


class _BusyWait(tenacity.wait.wait_base):
    """Wait what the remote's Retry-After asks, else exponential backoff with jitter (bounded either way)."""

    def __init__(self, settings: RemoteSettings) -> None:
        self._backoff = (tenacity.wait_exponential(multiplier=settings.backoff)
                         + tenacity.wait_random(0, settings.backoff))
        self._max = settings.max_retry_wait

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        busy = _busy(retry_state)
        if busy is not None and busy.retry_after is not None:
            return busy.retry_after
        return min(self._backoff(retry_state), self._max)


class _AsksTooLong(tenacity.stop.stop_base):
    """Give up at once when the remote asks for a longer wait than `max_retry_wait`."""

    def __init__(self, limit: float) -> None:
        self._limit = limit

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        busy = _busy(retry_state)
        return busy is not None and busy.retry_after is not None and busy.retry_after > self._limit


def _busy(retry_state: tenacity.RetryCallState) -> _Busy | None:
    error = retry_state.outcome.exception() if retry_state.outcome is not None else None
    return error if isinstance(error, _Busy) else None


class _Remote:
    """What remote generate and embedding engines share: the HTTP client, retries and error mapping."""

    def __init__(self, client: httpx.AsyncClient, settings: RemoteSettings, *, identity: str,
                 sleep: Sleep = anyio.sleep) -> None:
        self._client = client
        self.settings = settings
        self.identity = identity
        self.device = f"remote:{settings.url}"
        self._running = 0
        self._sleep = sleep  # how retries wait; tests pass a fake that records the waits

    @staticmethod
    async def _connect(settings: RemoteSettings, transport: httpx.AsyncBaseTransport | None = None,
                       ) -> tuple[httpx.AsyncClient, dict[str, Any]]:
        """Open a client and find the served model in the remote's /v1/models."""
        client = httpx.AsyncClient(base_url=settings.url, headers=settings.headers(),
                                   timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
                                   transport=transport)
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
        """POST (streaming the answer), retrying a busy remote; other failures become Multilane errors."""
        settings = self.settings
        attempts = 0

        async def once() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return await self._post_once(path, body)

        def retrying(state: tenacity.RetryCallState) -> None:
            busy = _busy(state)
            log.info("remote busy, retrying", url=settings.url, status=busy.status if busy else None,
                     retry_after=busy.retry_after if busy else None, delay=state.upcoming_sleep)

        retry = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(_Busy), wait=_BusyWait(settings), sleep=self._sleep,
            stop=tenacity.stop_after_attempt(settings.retries + 1) | _AsksTooLong(settings.max_retry_wait),
            before_sleep=retrying, reraise=True)
        try:
            return await retry(once)
        except _Busy as busy:
            if busy.retry_after is not None and busy.retry_after > settings.max_retry_wait:
                raise QueueFullError(
                    f"the remote engine at {settings.url} is busy ({busy.status}) and asks to retry after "
                    f"{busy.retry_after:g} s, longer than max_retry_wait {settings.max_retry_wait:g} s; "
                    "retry later or raise max_retry_wait") from None
            raise QueueFullError(f"the remote engine at {settings.url} is busy ({busy.status}) after {attempts} "
                                 "tries; retry later or raise its capacity") from None

    async def _post_once(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            request = self._client.build_request("POST", path, json=body)
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise EngineDeadError(f"lost the remote engine at {self.settings.url}: {_describe(exc)}") from exc
        if response.status_code == 200:
            return response
        text = (await response.aread()).decode(errors="replace")
        await response.aclose()
        if response.status_code in _RETRY_STATUS:
            raise _Busy(response.status_code, retry_after_seconds(response.headers.get("retry-after")))
        raise _status_error(self.settings, response.status_code, text)

    def unfinished_requests(self) -> int:
        """Requests this lane has in flight at the remote."""
        return self._running

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


class RemoteGenerateEngine(_Remote):
    """A generate lane served by an OpenAI-compatible server's /v1/chat/completions and /v1/completions."""

    def __init__(self, client: httpx.AsyncClient, settings: RemoteSettings, *, identity: str, context: int,
                 can_tokenize: bool, sleep: Sleep = anyio.sleep) -> None:
        super().__init__(client, settings, identity=identity, sleep=sleep)
        self.context = context
        self._can_tokenize = can_tokenize
        self._said_no_usage = False

    @classmethod
    async def load(cls, settings: RemoteSettings, *, context: int | None,
                   transport: httpx.AsyncBaseTransport | None = None) -> RemoteGenerateEngine:
        """Connect, check that the model is served, and learn its context and whether it counts tokens."""
        client, model = await cls._connect(settings, transport)
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

    async def stream(self, prompt: RemotePrompt, options: SamplingOptions, request_id: str, *,
                     priority: int = 0) -> AsyncIterator[Chunk]:
        """Stream the remote's completion; closing the stream early closes the connection, which aborts it.

        A priority other than 0 is sent as vLLM's server takes it (`priority` in the body); the cached prompt
        tokens come from the remote's `usage.prompt_tokens_details`, when it sends them.
        """
        body: dict[str, Any] = {
            "model": self.settings.served_model, "stream": True, "max_tokens": options.max_tokens,
            "temperature": options.temperature, "top_p": options.top_p,
            "stream_options": {"include_usage": True},
        }
        if priority:
            body["priority"] = priority  # a vLLM extension, honoured by a server run with the priority policy
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
            # Each event with text counts one token while it streams (the lane times the first token by it);
            # the remote's `usage`, sent after the finish, corrects the sum on the last chunk, which carries
            # the finish reason and so is held back until the stream ends.
            counted = cached = 0
            usage: int | None = None
            finish: str | None = None
            try:
                async for event in _events(response, self.settings.url):
                    if isinstance(event.get("usage"), dict) and event["usage"].get("completion_tokens") is not None:
                        usage = int(event["usage"]["completion_tokens"])
                        cached = _cached_tokens(event["usage"])
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                        finish = choice.get("finish_reason") or finish
                        if piece:
                            counted += 1
                            yield Chunk(piece, 1)
            finally:
                await response.aclose()
            if usage is None and counted and not self._said_no_usage:
                self._said_no_usage = True
                log.info("remote sends no usage; completion tokens are counted one per streamed event",
                         url=self.settings.url, model=self.settings.served_model)
            # Never a negative count: a remote whose usage is below its events with text (none known) keeps ours.
            rest = max(usage - counted, 0) if usage is not None else 0
            if finish or rest or cached:
                yield Chunk("", rest, finish_reason=finish, cached_tokens=cached)
        finally:
            self._running -= 1


def _cached_tokens(usage: dict[str, Any]) -> int:
    """The prompt tokens a remote's `usage` says it took from its prefix cache (0 when it does not say)."""
    details = usage.get("prompt_tokens_details")
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) and value > 0 else 0


class RemoteEmbeddingEngine(_Remote):
    """An embedding lane served by an OpenAI-compatible server's /v1/embeddings."""

    def __init__(self, client: httpx.AsyncClient, settings: RemoteSettings, *, identity: str, dimension: int,
                 max_tokens: int, sleep: Sleep = anyio.sleep) -> None:
        super().__init__(client, settings, identity=identity, sleep=sleep)
        self.dimension = dimension
        self.max_tokens = max_tokens

    @classmethod
    async def load(cls, settings: RemoteSettings,
                   transport: httpx.AsyncBaseTransport | None = None) -> RemoteEmbeddingEngine:
        """Connect, and learn the embedding size from one probe."""
        client, model = await cls._connect(settings, transport)
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


async def _events(response: httpx.Response, url: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent-events response, until [DONE] (httpx-sse joins multi-line `data:`).

    A stream that ends without [DONE] lost its remote: the answer would be cut short, not finished.
    """
    try:
        async for sse in EventSource(response).aiter_sse():
            if sse.data == "[DONE]":
                return
            if not sse.data:
                continue
            try:
                event = json.loads(sse.data)
            except ValueError as exc:
                raise EngineError(f"the remote engine at {url} sent an event that is not JSON: "
                                  f"{sse.data[:200]!r}") from exc
            if not isinstance(event, dict):
                raise EngineError(f"the remote engine at {url} sent an event that is not a JSON object: "
                                  f"{sse.data[:200]!r}")
            if "error" in event:
                raise EngineError(f"the remote engine at {url} failed mid-stream: {event['error']}")
            yield event
    except SSEError as exc:  # before HTTPError, its base: the remote answered, but not with an event stream
        raise EngineError(f"the remote engine at {url} did not answer with an event stream: {exc}") from exc
    except httpx.HTTPError as exc:
        raise EngineDeadError(f"lost the remote engine at {url} mid-stream: {_describe(exc)}") from exc
    raise EngineDeadError(f"lost the remote engine at {url} mid-stream: its stream ended without [DONE]")


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """The wait a Retry-After header asks for (seconds or an HTTP date), or None when absent or unreadable."""
    # Hand-written: neither tenacity nor httpx reads the header, and the standard library parses its date form.
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _status_error(settings: RemoteSettings, status: int, text: str) -> Exception:
    message = _error_message(text)
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
