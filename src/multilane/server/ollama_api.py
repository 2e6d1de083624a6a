"""Ollama-compatible routes: chat, generate, embed, ps and tags, honouring `keep_alive` on every call.

`stream` defaults to true, as in Ollama (NDJSON lines). An empty prompt or message list loads the model, or
unloads it with `keep_alive: 0`. `options.num_ctx` is ignored: a lane's context is fixed by the pipeline
file. `tools`, `images`, `template`, `context` and `suffix` are not supported (tools and images are refused).
"""

from __future__ import annotations

import time
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from multilane.durations import parse_duration
from multilane.engines.base import Completion, Message, SamplingOptions
from multilane.runtime import Runtime
from multilane.server.common import (
    ApiError,
    Emit,
    KeepAlive,
    LazyStreamResponse,
    abort_on_disconnect,
    declared_model,
    dumps,
    json_response,
    runtime_of,
    sampling,
)
from multilane.server.errors import api_error

router = APIRouter(prefix="/api", tags=["ollama"])

NDJSON = "application/x-ndjson"
FOREVER = "2318-01-01T00:00:00Z"  # how Ollama shows a model kept loaded forever


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Options(_Open):
    """Sampling options; num_ctx is ignored (context is fixed per lane) and other Ollama options too."""

    num_predict: int | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    num_ctx: int | None = None


Format = Literal["", "json"] | dict[str, Any] | None


ModelName = Annotated[str, AfterValidator(lambda name: name.removesuffix(":latest"))]
"""A declared model's name; Ollama clients may add the default tag `:latest`."""


class _Call(_Open):
    model: ModelName
    stream: bool = True
    format: Format = None
    options: Options | None = None
    keep_alive: KeepAlive = None


class OllamaMessage(_Open):
    """A chat message; images are refused (the models are text-only)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class ChatRequest(_Call):
    """The body of POST /api/chat."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Call):
    """The body of POST /api/generate; `raw` skips the chat template, `system` adds a system message."""

    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedRequest(_Open):
    """The body of POST /api/embed; inputs longer than the model takes are truncated by the model."""

    model: ModelName
    input: str | Annotated[list[str], Field(min_length=1)]
    keep_alive: KeepAlive = None
    options: Options | None = None


def _iso(ts: float | None = None) -> str:
    moment = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _schema(fmt: Format) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "object"}
    return fmt  # type: ignore[return-value]


def _options(request: Request, call: _Call) -> SamplingOptions:
    opts = call.options or Options()
    num_predict = opts.num_predict if opts.num_predict is not None and opts.num_predict > 0 else None
    return sampling(request, max_tokens=num_predict, temperature=opts.temperature, top_p=opts.top_p,
                    stop=opts.stop, seed=opts.seed, json_schema=_schema(call.format))


def _ndjson_error(exc: Exception) -> str:
    return dumps({"error": api_error(exc).message}) + "\n"


async def _load_or_unload(rt: Runtime, name: str, keep_alive: str | float | None) -> str:
    """What an empty prompt does: load the model (done_reason "load"), or unload it with keep_alive 0."""
    seconds = parse_duration(keep_alive) if keep_alive is not None else -1.0
    if seconds == 0:
        await rt.unload(name)
        return "unload"
    await rt.load(name, keep_alive=keep_alive)
    return "load"


def _timings(rt: Runtime, name: str, was_loaded: bool, started: float, done: Completion,
             first_token: float | None = None) -> dict[str, Any]:
    lane = rt.pool.loaded(name)
    load = lane.load_seconds if lane is not None and not was_loaded else 0.0
    total = time.perf_counter() - started
    return {"total_duration": _ns(total), "load_duration": _ns(load), "prompt_eval_count": done.prompt_tokens,
            "eval_count": done.completion_tokens,
            "eval_duration": _ns(total - (first_token if first_token is not None else 0.0))}


async def _reply(request: Request, rt: Runtime, call: _Call, prompt: list[Message] | str, *, raw: bool,
                 shape: Any) -> Response:
    """Generate for /api/chat and /api/generate; `shape(text)` is the route's piece of a reply."""
    options = _options(request, call)
    was_loaded = rt.pool.loaded(call.model) is not None
    started = time.perf_counter()

    def head(done: bool) -> dict[str, Any]:
        return {"model": call.model, "created_at": _iso(), "done": done}

    if not call.stream:
        done: Completion = await abort_on_disconnect(request, lambda: rt.generate(
            call.model, prompt, options, keep_alive=call.keep_alive, raw=raw))
        return json_response({**head(True), **shape(done.text), "done_reason": done.finish_reason or "stop",
                              **_timings(rt, call.model, was_loaded, started, done)})

    async def produce(emit: Emit) -> None:
        prompt_tokens = tokens = 0
        reason = "stop"
        first: float | None = None
        async with aclosing(rt.generate_stream(call.model, prompt, options, keep_alive=call.keep_alive,
                                               raw=raw)) as chunks:
            async for piece in chunks:
                if first is None:
                    first = time.perf_counter() - started
                prompt_tokens = piece.prompt_tokens or prompt_tokens
                tokens += piece.tokens
                reason = piece.finish_reason or reason
                if piece.text:
                    await emit(dumps({**head(False), **shape(piece.text)}) + "\n")
        done = Completion("", prompt_tokens, tokens, reason)
        await emit(dumps({**head(True), **shape(""), "done_reason": reason,
                          **_timings(rt, call.model, was_loaded, started, done, first)}) + "\n")

    return LazyStreamResponse(produce, media_type=NDJSON, on_error=_ndjson_error)


@router.post("/chat")
async def chat(body: ChatRequest, request: Request) -> Response:
    """Complete a chat; streams NDJSON unless `stream: false`."""
    rt = runtime_of(request)
    declared_model(rt, body.model, "generate")
    if body.tools:
        raise ApiError(422, "body.tools: tools are not supported on /api/chat; use /v1/chat/completions")
    if any(m.images for m in body.messages):
        raise ApiError(422, "body.messages.images: images are not supported (the models are text-only)")

    def shape(text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    if not body.messages:
        reason = await _load_or_unload(rt, body.model, body.keep_alive)
        return json_response({"model": body.model, "created_at": _iso(), **shape(""), "done_reason": reason,
                              "done": True})
    messages: list[Message] = [{"role": m.role, "content": m.content} for m in body.messages]
    return await _reply(request, rt, body, messages, raw=False, shape=shape)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> Response:
    """Complete a prompt (with the chat template, unless `raw`); streams NDJSON unless `stream: false`."""
    rt = runtime_of(request)
    declared_model(rt, body.model, "generate")
    if body.images:
        raise ApiError(422, "body.images: images are not supported (the models are text-only)")

    def shape(text: str) -> dict[str, Any]:
        return {"response": text}

    if not body.prompt and not body.system:
        reason = await _load_or_unload(rt, body.model, body.keep_alive)
        return json_response({"model": body.model, "created_at": _iso(), "response": "", "done": True,
                              "done_reason": reason})
    if body.raw:
        return await _reply(request, rt, body, body.prompt, raw=True, shape=shape)
    messages: list[Message] = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": body.prompt})
    return await _reply(request, rt, body, messages, raw=False, shape=shape)


@router.post("/embed")
async def embed(body: EmbedRequest, request: Request) -> Response:
    """Embed one text or a list of texts."""
    rt = runtime_of(request)
    declared_model(rt, body.model, "embedding")
    texts = [body.input] if isinstance(body.input, str) else body.input
    was_loaded = rt.pool.loaded(body.model) is not None
    started = time.perf_counter()
    vectors: np.ndarray = await abort_on_disconnect(request, lambda: rt.embed(body.model, texts,
                                                                              keep_alive=body.keep_alive))
    lane = rt.pool.loaded(body.model)
    return json_response({"model": body.model, "embeddings": [[float(x) for x in row] for row in vectors],
                          "total_duration": _ns(time.perf_counter() - started),
                          "load_duration": _ns(lane.load_seconds if lane is not None and not was_loaded else 0.0)})


def _details(kind: str) -> dict[str, Any]:
    return {"parent_model": "", "format": "vllm" if kind == "generate" else "sentence-transformers",
            "family": kind, "families": [kind], "parameter_size": "", "quantization_level": ""}


@router.get("/ps")
async def ps(request: Request) -> Response:
    """The loaded lanes in Ollama's shape; `multilane` holds the row `multilane ps` shows, `usage` the budget."""
    rt = runtime_of(request)
    models = []
    for row in rt.ps():
        expires = row["expires_at"]
        if expires == "forever":
            until = FOREVER
        elif expires is None:  # busy: the clock starts when it goes idle
            keep = parse_duration(row["keep_alive"]) if row["keep_alive"] != "forever" else None
            until = FOREVER if keep is None else _iso(time.time() + keep)
        else:
            until = _iso(float(expires))
        size = row["weights_bytes"] + row["kv_bytes"]
        models.append({"name": row["name"], "model": row["name"], "size": size, "digest": "",
                       "details": _details(row["kind"]), "expires_at": until,
                       "size_vram": 0 if row["device"] == "cpu" else size, "context_length": row["context"],
                       "multilane": row})
    return json_response({"models": models, "usage": rt.pool.usage()})


@router.get("/tags")
async def tags(request: Request) -> Response:
    """The declared models, loaded or not."""
    rt = runtime_of(request)
    models = []
    for name, model in rt.spec.models.items():
        lane = rt.pool.loaded(name)
        models.append({"name": name, "model": name, "modified_at": _iso(lane.loaded_at if lane else None),
                       "size": lane.plan.cost if lane else 0, "digest": "", "details": _details(model.kind),
                       "source": model.source, "loaded": lane is not None})
    return json_response({"models": models})
