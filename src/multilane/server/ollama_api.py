"""Ollama-compatible routes: chat (with tools), generate, embed, show, ps, tags and version, honouring
`keep_alive` on every call.

`stream` defaults to true, as in Ollama (NDJSON lines). An empty prompt or message list loads the model, or
unloads it with `keep_alive: 0`. `options.num_ctx` is ignored: a lane's context is fixed by the pipeline
file. Tools are the same schema-constrained calls as on /v1/chat/completions. `images`, `template`,
`context` and `suffix` are not supported (images are refused). A call's priority (an integer, lower first,
default 0) comes in the X-Multilane-Priority header; replies add `prompt_cached_count`, the prompt tokens taken
from the engine's prefix cache.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import numpy as np
import structlog
from fastapi import APIRouter, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from multilane import __version__
from multilane.durations import parse_duration
from multilane.engines.base import Completion, Message, SamplingOptions, collect
from multilane.errors import SourceError
from multilane.runtime import Runtime
from multilane.server.common import (
    ApiError,
    Emit,
    KeepAlive,
    LazyStreamResponse,
    abort_on_disconnect,
    call_priority,
    checked_schema,
    declared_model,
    dumps,
    gather,
    json_response,
    runtime_of,
    sampling,
)
from multilane.server.errors import api_error
from multilane.server.tool_calls import (
    CallNames,
    Tool,
    ToolCall,
    ToolPlan,
    call_text,
    functions_of,
    plan_tools,
    result_text,
    with_instructions,
)
from multilane.sources import resolve_source

log = structlog.get_logger(__name__)

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


class OllamaFunctionCall(_Open):
    """The function an earlier assistant message called, with its arguments (an object, or JSON text)."""

    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class OllamaToolCall(_Open):
    """A tool call of an earlier assistant message."""

    id: str | None = None
    function: OllamaFunctionCall


class OllamaMessage(_Open):
    """A chat message; a `tool` message is a function's result, named by `tool_name` or `tool_call_id`.

    Images are refused (the models are text-only).
    """

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ChatRequest(_Call):
    """The body of POST /api/chat."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Tool] | None = None


class GenerateRequest(_Call):
    """The body of POST /api/generate; `raw` skips the chat template, `system` adds a system message."""

    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class ShowRequest(_Open):
    """The body of POST /api/show: the model (older clients call the field `name`)."""

    model: ModelName | None = None
    name: ModelName | None = None
    verbose: bool = False


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
    if isinstance(fmt, dict):
        return checked_schema(fmt, "body.format")
    return {"type": "object"} if fmt == "json" else None


def _options(request: Request, call: _Call, schema: dict[str, Any] | None = None) -> SamplingOptions:
    opts = call.options or Options()
    num_predict = opts.num_predict if opts.num_predict is not None and opts.num_predict > 0 else None
    return sampling(request, max_tokens=num_predict, temperature=opts.temperature, top_p=opts.top_p,
                    stop=opts.stop, seed=opts.seed, json_schema=schema or _schema(call.format))


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
             first_token: float | None) -> dict[str, Any]:
    """Ollama's counts and durations (ns): the prompt's share runs to the first token, load time excluded."""
    lane = rt.pool.loaded(name)
    load = lane.load_seconds if lane is not None and not was_loaded else 0.0
    total = time.perf_counter() - started
    first = total if first_token is None else first_token - started
    return {"total_duration": _ns(total), "load_duration": _ns(load), "prompt_eval_count": done.prompt_tokens,
            "prompt_cached_count": done.cached_tokens,  # an extension: prompt tokens read from the prefix cache
            "prompt_eval_duration": _ns(max(first - load, 0.0)), "eval_count": done.completion_tokens,
            "eval_duration": _ns(total - first)}


def _ollama_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "function": {"index": 0, "name": call.name, "arguments": call.arguments}}


async def _reply(request: Request, rt: Runtime, call: _Call, prompt: list[Message] | str, *, raw: bool,
                 shape: Callable[[str], dict[str, Any]], plan: ToolPlan | None = None) -> Response:
    """Generate for /api/chat and /api/generate; `shape(text)` is the route's piece of a reply.

    With a tool plan the reply is only known once whole: it comes as one piece, a call in `message.tool_calls`.
    """
    options = _options(request, call, None if plan is None else plan.schema)
    priority = call_priority(request)
    was_loaded = rt.pool.loaded(call.model) is not None
    started = time.perf_counter()
    first: float | None = None

    def head(done: bool) -> dict[str, Any]:
        return {"model": call.model, "created_at": _iso(), "done": done}

    def whole(done: Completion) -> dict[str, Any]:
        if plan is None:
            return shape(done.text)
        reply = plan.read(done.text, done.finish_reason)
        if reply.call is None:
            return shape(reply.answer or "")
        return {"message": {"role": "assistant", "content": "", "tool_calls": [_ollama_call(reply.call)]}}

    async def generated(on_text: Callable[[str], Awaitable[None]] | None = None) -> Completion:
        async def seen(text: str) -> None:
            nonlocal first
            if first is None:
                first = time.perf_counter()
            if on_text is not None:
                await on_text(text)

        return await collect(rt.generate_stream(call.model, prompt, options, keep_alive=call.keep_alive, raw=raw,
                                                priority=priority), seen)

    if not call.stream:
        done: Completion = await abort_on_disconnect(request, generated)
        return json_response({**head(True), **whole(done), "done_reason": done.finish_reason or "stop",
                              **_timings(rt, call.model, was_loaded, started, done, first)})

    async def produce(emit: Emit) -> None:
        async def piece(text: str) -> None:
            await emit(dumps({**head(False), **shape(text)}) + "\n")

        done = await generated(piece if plan is None else None)
        if plan is not None:
            await emit(dumps({**head(False), **whole(done)}) + "\n")
        await emit(dumps({**head(True), **shape(""), "done_reason": done.finish_reason or "stop",
                          **_timings(rt, call.model, was_loaded, started, done, first)}) + "\n")

    return LazyStreamResponse(produce, media_type=NDJSON, on_error=_ndjson_error)


def _chat_messages(messages: list[OllamaMessage]) -> list[Message]:
    """The chat as the template takes it; earlier tool calls and their results are written out as text."""
    names = CallNames()
    out: list[Message] = []
    for m in messages:
        content = m.content or ""
        if m.role == "assistant" and m.tool_calls:
            for tool_call in m.tool_calls:
                names.note(tool_call.id, tool_call.function.name)
            content = "\n".join(filter(None, [content, *(call_text(c.function.name, c.function.arguments)
                                                         for c in m.tool_calls)]))
            out.append({"role": "assistant", "content": content})
        elif m.role == "tool":
            out.append({"role": "user", "content": result_text(m.tool_name or names.name(m.tool_call_id), content)})
        else:
            out.append({"role": m.role, "content": content})
    return out


@router.post("/chat")
async def chat(body: ChatRequest, request: Request) -> Response:
    """Complete a chat; streams NDJSON unless `stream: false`."""
    rt = runtime_of(request)
    declared_model(rt, body.model, "generate")
    plan = None
    if body.tools:  # Ollama has no tool_choice: the model calls a function or answers (in `format`, if given)
        plan = plan_tools(functions_of(body.tools), answer_schema=_schema(body.format))
    if any(m.images for m in body.messages):
        raise ApiError(422, "body.messages.images: images are not supported (the models are text-only)")

    def shape(text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    if not body.messages:
        reason = await _load_or_unload(rt, body.model, body.keep_alive)
        return json_response({"model": body.model, "created_at": _iso(), **shape(""), "done_reason": reason,
                              "done": True})
    messages = _chat_messages(body.messages)
    if plan is not None:
        messages = with_instructions(messages, plan.instructions)
    return await _reply(request, rt, body, messages, raw=False, shape=shape, plan=plan)


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

    async def vectors_and_tokens() -> tuple[np.ndarray, int]:
        # Counted beside the encode, in a worker thread: the tokenizer may wait for a whole encode batch.
        done: list[Any] = await gather([lambda: rt.embed(body.model, texts, keep_alive=body.keep_alive),
                                        lambda: rt.pool.count_tokens(body.model, texts)])
        return done[0], done[1]

    vectors, tokens = await abort_on_disconnect(request, vectors_and_tokens)
    lane = rt.pool.loaded(body.model)
    return json_response({"model": body.model, "embeddings": [[float(x) for x in row] for row in vectors],
                          "total_duration": _ns(time.perf_counter() - started),
                          "load_duration": _ns(lane.load_seconds if lane is not None and not was_loaded else 0.0),
                          "prompt_eval_count": tokens})


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


OLLAMA_VERSION = "0.12.0"
"""The Ollama release whose API these routes follow, for clients that check the server's version."""


@router.get("/version")
async def version() -> Response:
    """The Ollama API version these routes follow, and Multilane's own version."""
    return json_response({"version": OLLAMA_VERSION, "multilane": __version__})


@dataclass(frozen=True)
class _Checkpoint:
    """What a local model's files say: its config, chat template and parameter count."""

    config: dict[str, Any]
    template: str
    parameters: int
    dtype: str


def _read_checkpoint(folder: Path) -> _Checkpoint:
    """Read config.json, the chat template and the safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    def read_json(name: str) -> dict[str, Any]:
        try:
            value = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    config = read_json("config.json")
    template_file = folder / "chat_template.jinja"
    template: Any = (template_file.read_text() if template_file.is_file()
                     else read_json("tokenizer_config.json").get("chat_template", ""))
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template", "") for t in template if t.get("name") == "default"), "")
    count = 0
    dtypes: Counter[str] = Counter()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "numpy") as tensors:
            for key in tensors.keys():
                piece = tensors.get_slice(key)
                size = math.prod(piece.get_shape())
                count += size
                dtypes[piece.get_dtype()] += size
    dtype = dtypes.most_common(1)[0][0] if dtypes else ""
    return _Checkpoint(config.get("text_config", config), template if isinstance(template, str) else "", count,
                       dtype)


async def _checkpoint(rt: Runtime, name: str) -> _Checkpoint | None:
    """The files of a local model, or None for a remote one or one whose source cannot be read now."""
    model = rt.spec.model(name)
    if model.source is None or model.engine.get("kind") == "remote":
        return None
    source = model.source
    try:
        prepared = await anyio.to_thread.run_sync(lambda: resolve_source(source, base_dir=rt.spec.base_dir))
        return await anyio.to_thread.run_sync(_read_checkpoint, prepared.path)
    except (SourceError, OSError) as exc:
        log.info("show: the model's files cannot be read; showing what the pipeline file says", model=name,
                 error=str(exc))
        return None


def _parameter_size(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count else ""


@router.post("/show")
async def show(body: ShowRequest, request: Request) -> Response:
    """A declared model's details, parameters, chat template, capabilities and architecture facts."""
    rt = runtime_of(request)
    name = body.model or body.name
    if not name:
        raise ApiError(422, "body.model: field required")
    model = rt.spec.model(name)
    found = await _checkpoint(rt, name)
    config = found.config if found is not None else {}
    family = str(config.get("model_type") or model.kind)
    default_max: int = request.app.state.default_max_tokens
    parameters = ({"num_ctx": model.context or 2048, "num_predict": default_max, "temperature": 0, "top_p": 1}
                  if model.kind == "generate" else {})
    info: dict[str, Any] = {"general.architecture": family, "general.basename": name}
    if found is not None and found.parameters:
        info["general.parameter_count"] = found.parameters
    facts = {"context_length": model.context if model.kind == "generate" else config.get("max_position_embeddings"),
             "embedding_length": config.get("hidden_size"), "block_count": config.get("num_hidden_layers"),
             "attention.head_count": config.get("num_attention_heads"),
             "attention.head_count_kv": config.get("num_key_value_heads") or config.get("num_attention_heads"),
             "vocab_size": config.get("vocab_size")}
    info.update({f"{family}.{key}": value for key, value in facts.items() if value is not None})
    lines = [f"{key} {value}" for key, value in parameters.items()]
    modelfile = "\n".join([f"# Multilane model '{name}' ({model.kind})", f"FROM {model.source or 'remote'}",
                           *(f"PARAMETER {line}" for line in lines)])
    details = {**_details(model.kind), "family": family, "families": [family],
               "parameter_size": _parameter_size(found.parameters) if found is not None else "",
               "quantization_level": found.dtype if found is not None else ""}
    lane = rt.pool.loaded(name)
    return json_response({
        "modelfile": modelfile, "parameters": "\n".join(lines), "template": found.template if found else "",
        "details": details, "model_info": info, "license": "",
        "capabilities": ["completion", "tools"] if model.kind == "generate" else ["embedding"],
        "modified_at": _iso(lane.loaded_at if lane else None)})
