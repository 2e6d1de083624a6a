"""OpenAI-compatible routes: chat completions (streaming, structured output, tools), completions, embeddings, models.

Request fields of the OpenAI API that Multilane does not implement (frequency_penalty, presence_penalty,
logit_bias, logprobs, user, ...) are accepted and ignored. `n` must be 1. `keep_alive` is an extension, and
`priority` is vLLM's (an integer, lower first; the X-Multilane-Priority header when the body has none).
`usage.prompt_tokens_details.cached_tokens` counts the prompt tokens taken from the engine's prefix cache.
"""

from __future__ import annotations

import base64
import uuid
from contextlib import aclosing
from typing import Annotated, Any, Literal, cast

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from multilane.engines.base import Completion, DecodingEmbeddingEngine, Message, SamplingOptions
from multilane.runtime import Runtime
from multilane.server.common import (
    SSE_HEADERS,
    ApiError,
    Emit,
    KeepAlive,
    LazyStreamResponse,
    abort_on_disconnect,
    call_priority,
    checked_schema,
    declared_model,
    gather,
    json_response,
    now,
    runtime_of,
    sampling,
    sse,
)
from multilane.server.errors import api_error, error_body
from multilane.server.tool_calls import (
    CallNames,
    Tool,
    ToolPlan,
    call_text,
    functions_of,
    plan_tools,
    result_text,
    with_instructions,
)

router = APIRouter(prefix="/v1", tags=["openai"])

DONE = "data: [DONE]\n\n"


class _Open(BaseModel):
    """A request part whose unknown fields are accepted and ignored, as other OpenAI servers do."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TextPart(_Open):
    """A text part of a message's content (images are not supported)."""

    type: Literal["text"]
    text: str


class FunctionCall(_Open):
    """A function call an assistant message made: its name and JSON-string arguments."""

    name: str
    arguments: str = "{}"


class ToolCall(_Open):
    """A tool call of an earlier assistant message."""

    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    """One message of a chat; `developer` is treated as `system`, `tool` results are passed as user turns."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class NamedFunction(_Open):
    """The function a named tool_choice forces."""

    name: str


class NamedToolChoice(_Open):
    """`{"type": "function", "function": {"name": ...}}`: the model must call this function."""

    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(_Open):
    """The schema a `json_schema` response_format constrains the output to."""

    name: str = "output"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    """`text`, `json_object` (any JSON object) or `json_schema` (output constrained to the schema)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Open):
    """With include_usage, a last chunk (empty choices) carries the token counts."""

    include_usage: bool = False


class _Sampled(_Open):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens
    priority: int | None = None  # vLLM's extension: lower first in the model's queue
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    keep_alive: KeepAlive = None


class ChatCompletionRequest(_Sampled):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class CompletionRequest(_Sampled):
    """The body of POST /v1/completions: prompts are tokenized as they are, without a chat template."""

    prompt: str | Annotated[list[str], Field(min_length=1)]
    echo: bool = False


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class EmbeddingRequest(_Open):
    """The body of POST /v1/embeddings; `dimensions` is ignored (a model has one dimension).

    `input` is a text, a list of texts, or token ids of the embedder's own tokenizer (one list, or a list of
    lists), which are decoded with that tokenizer and embedded as text.
    """

    model: str
    input: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    keep_alive: KeepAlive = None


# ---- chat messages and tool replies


def chat_messages(messages: list[ChatMessage]) -> list[Message]:
    """The messages as the chat template takes them; tool calls and results are written out as text."""
    names = CallNames()
    out: list[Message] = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        role = "system" if m.role == "developer" else m.role
        if m.role == "assistant" and m.tool_calls:
            for call in m.tool_calls:
                names.note(call.id, call.function.name)
            content = "\n".join(filter(None, [content, *(call_text(c.function.name, c.function.arguments)
                                                         for c in m.tool_calls)]))
        elif m.role == "tool":
            role = "user"
            content = result_text(names.name(m.tool_call_id), content)
        out.append({"role": role, "content": content})
    return out


def _tool_result(text: str, plan: ToolPlan, finish: str | None) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason of a constrained tool output."""
    reply = plan.read(text, finish)
    if reply.call is None:
        return {"role": "assistant", "content": reply.answer}, finish or "stop"
    call = {"id": reply.call.id, "type": "function",
            "function": {"name": reply.call.name, "arguments": reply.call.arguments_json}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse_error(exc: Exception) -> str:
    err = api_error(exc)
    return sse(error_body("/v1", err.message, type=err.type, code=err.code)) + DONE


def _response_schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None:
        raise ApiError(422, "response_format of type json_schema needs json_schema.schema", code="invalid_body")
    return checked_schema(fmt.json_schema.schema_, "body.response_format.json_schema.schema")


# ---- routes


@router.get("/models")
async def list_models(request: Request) -> Response:
    """The declared models."""
    rt = runtime_of(request)
    data = []
    for name, model in rt.spec.models.items():
        lane = rt.pool.loaded(name)
        data.append({"id": name, "object": "model", "created": int(lane.loaded_at) if lane else 0,
                     "owned_by": "multilane", "kind": model.kind, "source": model.source, "loaded": lane is not None})
    return json_response({"object": "list", "data": data})


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Complete a chat; `stream: true` answers with server-sent events ending with `data: [DONE]`."""
    rt = runtime_of(request)
    declared_model(rt, body.model, "generate")
    schema = _response_schema(body.response_format)
    plan = None
    if body.tools and body.tool_choice != "none":  # with a response format too, the answer follows its schema
        named = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
        plan = plan_tools(functions_of(body.tools), must_call=body.tool_choice == "required", only=named,
                          answer_schema=schema)
    messages = chat_messages(body.messages)
    if plan is not None:
        messages = with_instructions(messages, plan.instructions)
        schema = plan.schema
    options = sampling(request, max_tokens=body.max_completion_tokens or body.max_tokens,
                       temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed,
                       json_schema=schema, ignore_eos=body.ignore_eos)
    reply_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = now()
    priority = call_priority(request, body.priority)
    if body.stream:
        return _chat_stream(rt, body, messages, options, plan, reply_id, created, priority)
    done: Completion = await abort_on_disconnect(request, lambda: rt.generate(
        body.model, messages, options, keep_alive=body.keep_alive, priority=priority))
    if plan is not None:
        message, finish = _tool_result(done.text, plan, done.finish_reason)
    else:
        message, finish = {"role": "assistant", "content": done.text}, done.finish_reason or "stop"
    return json_response({
        "id": reply_id, "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": _usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)})


def _chat_stream(rt: Runtime, body: ChatCompletionRequest, messages: list[Message], options: SamplingOptions,
                 plan: ToolPlan | None, reply_id: str, created: int, priority: int) -> Response:
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return sse({"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    async def finish(emit: Emit, reason: str, prompt_tokens: int, tokens: int, cached: int) -> None:
        await emit(chunk({}, reason))
        if include_usage:
            await emit(sse({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                            "model": body.model, "choices": [], "usage": _usage(prompt_tokens, tokens, cached)}))
        await emit(DONE)

    async def produce(emit: Emit) -> None:
        if plan is not None:  # a tool call is only known once the whole JSON is in: generate, then send it
            done = await rt.generate(body.model, messages, options, keep_alive=body.keep_alive, priority=priority)
            message, reason = _tool_result(done.text, plan, done.finish_reason)
            await emit(chunk({"role": "assistant", "content": ""}))
            if message.get("tool_calls"):
                call = message["tool_calls"][0]
                await emit(chunk({"tool_calls": [{"index": 0, **call}]}))
            else:
                await emit(chunk({"content": message["content"]}))
            await finish(emit, reason, done.prompt_tokens, done.completion_tokens, done.cached_tokens)
            return
        prompt_tokens = tokens = cached = 0
        reason = "stop"
        async with aclosing(rt.generate_stream(body.model, messages, options, keep_alive=body.keep_alive,
                                               priority=priority)) as chunks:
            first = True
            async for piece in chunks:
                if first:
                    await emit(chunk({"role": "assistant", "content": ""}))
                    first = False
                prompt_tokens = piece.prompt_tokens or prompt_tokens
                cached = piece.cached_tokens or cached
                tokens += piece.tokens
                reason = piece.finish_reason or reason
                if piece.text:
                    await emit(chunk({"content": piece.text}))
        await finish(emit, reason, prompt_tokens, tokens, cached)

    return LazyStreamResponse(produce, media_type="text/event-stream", on_error=_sse_error, headers=SSE_HEADERS)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Complete raw prompts (no chat template); `stream: true` streams one prompt as server-sent events."""
    rt = runtime_of(request)
    declared_model(rt, body.model, "generate")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    options = sampling(request, max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                       stop=body.stop, seed=body.seed, ignore_eos=body.ignore_eos)
    reply_id = f"cmpl-{uuid.uuid4().hex}"
    created = now()
    priority = call_priority(request, body.priority)

    def envelope(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": reply_id, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, **extra}

    if body.stream:
        if len(prompts) != 1:
            raise ApiError(422, "body.prompt: streaming takes one prompt", code="invalid_body")
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def produce(emit: Emit) -> None:
            prompt_tokens = tokens = cached = 0
            reason = "stop"
            if body.echo:
                await emit(sse(envelope([{"index": 0, "text": prompts[0], "logprobs": None, "finish_reason": None}])))
            async with aclosing(rt.generate_stream(body.model, prompts[0], options, keep_alive=body.keep_alive,
                                                   raw=True, priority=priority)) as chunks:
                async for piece in chunks:
                    prompt_tokens = piece.prompt_tokens or prompt_tokens
                    cached = piece.cached_tokens or cached
                    tokens += piece.tokens
                    reason = piece.finish_reason or reason
                    if piece.text:
                        await emit(sse(envelope([{"index": 0, "text": piece.text, "logprobs": None,
                                                  "finish_reason": None}])))
            await emit(sse(envelope([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}])))
            if include_usage:
                await emit(sse(envelope([], usage=_usage(prompt_tokens, tokens, cached))))
            await emit(DONE)

        return LazyStreamResponse(produce, media_type="text/event-stream", on_error=_sse_error, headers=SSE_HEADERS)

    def call(prompt: str) -> Any:
        return lambda: rt.generate(body.model, prompt, options, keep_alive=body.keep_alive, raw=True,
                                   priority=priority)

    results: list[Completion] = await abort_on_disconnect(request, lambda: gather([call(p) for p in prompts]))
    choices = [{"index": i, "text": (prompts[i] if body.echo else "") + done.text, "logprobs": None,
                "finish_reason": done.finish_reason or "stop"} for i, done in enumerate(results)]
    return json_response(envelope(choices, usage=_usage(sum(d.prompt_tokens for d in results),
                                                        sum(d.completion_tokens for d in results),
                                                        sum(d.cached_tokens for d in results))))


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """Embed texts or token ids; `encoding_format: base64` gives little-endian float32 bytes."""
    rt = runtime_of(request)
    declared_model(rt, body.model, "embedding")
    ids = _token_ids(body.input)
    texts = await _decoded(rt, body.model, ids) if ids is not None else (
        [body.input] if isinstance(body.input, str) else cast(list[str], body.input))

    async def vectors_and_tokens() -> tuple[np.ndarray, int]:
        if ids is not None:  # the ids sent are the tokens
            return await rt.embed(body.model, texts, keep_alive=body.keep_alive), sum(len(row) for row in ids)
        # Counted beside the encode, in a worker thread: the tokenizer may wait for a whole encode batch.
        done: list[Any] = await gather([lambda: rt.embed(body.model, texts, keep_alive=body.keep_alive),
                                        lambda: rt.pool.count_tokens(body.model, texts)])
        return done[0], done[1]

    vectors, tokens = await abort_on_disconnect(request, vectors_and_tokens)
    data = []
    for i, row in enumerate(vectors):
        embedding: Any = (base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode()
                          if body.encoding_format == "base64" else [float(x) for x in row])
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return json_response({"object": "list", "data": data, "model": body.model,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _token_ids(given: Any) -> list[list[int]] | None:
    """The token-id rows of an embeddings input, or None when it is text."""
    if isinstance(given, list) and given and isinstance(given[0], int):
        return [given]
    if isinstance(given, list) and given and isinstance(given[0], list):
        return cast(list[list[int]], given)
    return None


async def _decoded(rt: Runtime, model: str, ids: list[list[int]]) -> list[str]:
    """Token ids turned back into text by the embedder's own tokenizer (the lane is loaded for it)."""
    engine = (await rt.load(model)).engine
    if not isinstance(engine, DecodingEmbeddingEngine):
        raise ApiError(400, f"model '{model}' cannot take token ids: its engine has no tokenizer here; send text",
                       code="token_ids_unsupported")
    return [engine.decode(row) for row in ids]
