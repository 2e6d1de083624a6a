"""OpenAI's Responses API: POST /v1/responses, whole or as its typed server-sent events.

`input` is a text or a list of items: messages, `function_call` items (earlier calls) and
`function_call_output` items (their results). Function tools are the same schema-constrained calls as on
/v1/chat/completions; `text.format` constrains the answer to a JSON schema. Nothing is stored: every response
behaves as with `store: false`, so `previous_response_id` (and `conversation`) are refused with a 400 that says
to send the whole conversation in `input`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from multilane.engines.base import Chunk, Completion, Message, SamplingOptions
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
    dumps,
    json_response,
    now,
    runtime_of,
    sampling,
)
from multilane.server.errors import api_error
from multilane.server.tool_calls import (
    FUNCTION_NAME,
    CallNames,
    Function,
    ToolPlan,
    ToolReply,
    call_text,
    plan_tools,
    result_text,
    with_instructions,
)

router = APIRouter(prefix="/v1", tags=["openai"])

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


class _Open(BaseModel):
    """A request part whose unknown fields are accepted and ignored, as other OpenAI servers do."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ContentPart(_Open):
    """A part of a message's content: text (`input_text`, `output_text`) or a refusal; others are refused."""

    type: str
    text: str | None = None
    refusal: str | None = None


class MessageItem(_Open):
    """A message; `developer` is treated as `system`."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Open):
    """A function call the model made earlier, sent back as part of the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = "{}"


class FunctionCallOutputItem(_Open):
    """The result of an earlier function call, matched to it by `call_id`."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class ReasoningItem(_Open):
    """A reasoning item of an earlier response: the models here do not reason apart, so it is skipped."""

    type: Literal["reasoning"]


class ItemReference(_Open):
    """A reference to a stored item: refused, since nothing is stored."""

    type: Literal["item_reference"]
    id: str


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "message"))  # an "easy" input message has no type
    return str(getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")],
    Discriminator(_item_type)]


class FunctionTool(_Open):
    """A function the model may call (the Responses API's flat shape); other tool types are not supported."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Open):
    """`{"type": "function", "name": ...}`: the model must call this function."""

    type: Literal["function"]
    name: str


class TextFormat(_Open):
    """`text` (default), `json_object` (any JSON object) or `json_schema` (output constrained to `schema`)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Open):
    """The answer's format."""

    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(_Open):
    """The body of POST /v1/responses; unsupported fields (include, reasoning, truncation, ...) are ignored."""

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice = "auto"
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = None  # extensions, as vLLM's server takes them
    stop: str | list[str] | None = None
    priority: int | None = None  # lower first; the X-Multilane-Priority header when not given
    keep_alive: KeepAlive = None


def _part_text(part: ContentPart, where: str) -> str:
    if part.type in _TEXT_PARTS:
        return part.text or ""
    if part.type == "refusal":
        return part.refusal or ""
    raise ApiError(422, f"{where}: content of type '{part.type}' is not supported (the models are text-only; "
                        f"send input_text)", code="unsupported_content")


def _content_text(content: str | list[ContentPart], where: str) -> str:
    if isinstance(content, str):
        return content
    return "".join(_part_text(part, f"{where}[{j}]") for j, part in enumerate(content))


def input_messages(body: ResponsesRequest) -> list[Message]:
    """The conversation as the chat template takes it: instructions first, calls and results written as text."""
    system = [body.instructions] if body.instructions else []
    out: list[Message] = []
    if isinstance(body.input, str):
        out.append({"role": "user", "content": body.input})
        items: list[Any] = []
    else:
        items = body.input
    names = CallNames()
    for i, item in enumerate(items):
        where = f"body.input[{i}]"
        if isinstance(item, MessageItem):
            text = _content_text(item.content, f"{where}.content")
            if item.role in ("system", "developer") and not out:
                system.append(text)  # leading system turns join the instructions: templates want one
            else:
                out.append({"role": "system" if item.role == "developer" else item.role, "content": text})
        elif isinstance(item, FunctionCallItem):
            names.note(item.call_id, item.name)
            text = call_text(item.name, item.arguments)
            if out and out[-1]["role"] == "assistant":  # a call after the model's own text is one turn
                out[-1] = {"role": "assistant", "content": f"{out[-1]['content']}\n{text}".lstrip("\n")}
            else:
                out.append({"role": "assistant", "content": text})
        elif isinstance(item, FunctionCallOutputItem):
            output = _content_text(item.output, f"{where}.output")
            out.append({"role": "user", "content": result_text(names.name(item.call_id), output)})
        elif isinstance(item, ItemReference):
            raise ApiError(400, f"{where}: item_reference '{item.id}' names a stored item, and Multilane stores "
                                "no responses (every response is store: false); send the item itself",
                           param="input", code="stored_items_unsupported")
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return out


def _format_schema(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.schema_ is None:
        raise ApiError(422, "body.text.format: a json_schema format needs `schema`", code="invalid_body")
    return checked_schema(fmt.schema_, "body.text.format.schema")


def _plan(body: ResponsesRequest, answer_schema: dict[str, Any] | None) -> ToolPlan | None:
    if not body.tools or body.tool_choice == "none":
        if isinstance(body.tool_choice, NamedFunctionChoice) or body.tool_choice == "required":
            raise ApiError(422, "body.tool_choice: a function must be called, but no tools are given",
                           code="invalid_tool_choice")
        return None
    functions = [Function(t.name, t.description or "", t.parameters or {"type": "object", "properties": {}},
                          f"body.tools[{i}].parameters") for i, t in enumerate(body.tools)]
    named = body.tool_choice.name if isinstance(body.tool_choice, NamedFunctionChoice) else None
    return plan_tools(functions, must_call=body.tool_choice == "required", only=named, answer_schema=answer_schema)


class _Reply:
    """One response under construction: its id, echo of the request, output items and usage."""

    def __init__(self, body: ResponsesRequest, options: SamplingOptions) -> None:
        self.body = body
        self.options = options
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = now()
        self.message_id = f"msg_{uuid.uuid4().hex}"

    def envelope(self, status: str, output: list[dict[str, Any]], done: Completion | None = None,
                 error: dict[str, str] | None = None) -> dict[str, Any]:
        """The Response object in a state: in_progress, completed, incomplete or failed."""
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text else {"type": "text"}
        usage = None
        if done is not None:
            usage = {"input_tokens": done.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": done.cached_tokens, "cache_write_tokens": 0},
                     "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": done.prompt_tokens + done.completion_tokens}
        tool_choice = (body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunctionChoice)
                       else body.tool_choice)
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": now() if status == "completed" else None, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": self.options.max_tokens, "model": body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": self.options.temperature, "text": {"format": fmt}, "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in body.tools], "top_p": self.options.top_p,
            "truncation": "disabled", "usage": usage, "user": body.user, "metadata": body.metadata or {}}

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        """An assistant message output item holding `text`."""
        content = [self.text_part(text)] if status != "in_progress" else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": content}

    @staticmethod
    def text_part(text: str) -> dict[str, Any]:
        """An output_text content part."""
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def output(self, reply: ToolReply | None, text: str, status: str) -> list[dict[str, Any]]:
        """The output items: the call or answer of a tool reply, else a message holding `text`."""
        if reply is not None and reply.call is not None:
            call = reply.call
            return [{"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id,
                     "name": call.name, "arguments": call.arguments_json, "status": "completed"}]
        return [self.message((reply.answer or "") if reply is not None else text, status)]


def _status(finish: str | None) -> str:
    return "incomplete" if finish == "length" else "completed"


@router.post("/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """Create a model response; `stream: true` sends the Responses API's events as server-sent events."""
    rt = runtime_of(request)
    declared_model(rt, body.model, "generate")
    if body.previous_response_id is not None or body.conversation is not None:
        field = "previous_response_id" if body.previous_response_id is not None else "conversation"
        raise ApiError(400, f"body.{field}: continuing a stored response needs the run journal, which this "
                            "server does not have; every response here is store: false, so send the whole "
                            "conversation in `input` (earlier output items included)",
                       param=field, code="previous_response_unsupported")
    answer_schema = _format_schema(body.text)
    plan = _plan(body, answer_schema)
    messages = input_messages(body)
    if not messages:
        raise ApiError(422, "body.input: the conversation is empty", code="invalid_body")
    schema = plan.schema if plan is not None else answer_schema
    if plan is not None:
        messages = with_instructions(messages, plan.instructions)
    options = sampling(request, max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p,
                       stop=body.stop, seed=body.seed, json_schema=schema)
    reply = _Reply(body, options)
    priority = call_priority(request, body.priority)
    if body.stream:
        return _stream(rt, body, messages, options, plan, reply, priority)
    done: Completion = await abort_on_disconnect(request, lambda: rt.generate(
        body.model, messages, options, keep_alive=body.keep_alive, priority=priority))
    read = plan.read(done.text, done.finish_reason) if plan is not None else None
    status = _status(done.finish_reason)
    return json_response(reply.envelope(status, reply.output(read, done.text, status), done))


def _stream(rt: Runtime, body: ResponsesRequest, messages: list[Message], options: SamplingOptions,
            plan: ToolPlan | None, reply: _Reply, priority: int) -> Response:
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        data = dumps({"type": kind, "sequence_number": sequence, **fields})
        sequence += 1
        return f"event: {kind}\ndata: {data}\n\n"

    async def text_events(emit: Emit, pieces: AsyncIterator[Chunk]) -> Completion:
        """Open a message, stream its text, close it; returns the completion the pieces made."""
        await emit(event("response.output_item.added", output_index=0, item=reply.message("", "in_progress")))
        await emit(event("response.content_part.added", item_id=reply.message_id, output_index=0, content_index=0,
                         part=reply.text_part("")))
        parts: list[str] = []
        prompt_tokens = tokens = cached = 0
        finish: str | None = None
        async for piece in pieces:
            prompt_tokens = piece.prompt_tokens or prompt_tokens
            cached = piece.cached_tokens or cached
            tokens += piece.tokens
            finish = piece.finish_reason or finish
            if piece.text:
                parts.append(piece.text)
                await emit(event("response.output_text.delta", item_id=reply.message_id, output_index=0,
                                 content_index=0, delta=piece.text, logprobs=[]))
        text = "".join(parts)
        status = _status(finish)
        await emit(event("response.output_text.done", item_id=reply.message_id, output_index=0, content_index=0,
                         text=text, logprobs=[]))
        await emit(event("response.content_part.done", item_id=reply.message_id, output_index=0, content_index=0,
                         part=reply.text_part(text)))
        await emit(event("response.output_item.done", output_index=0, item=reply.message(text, status)))
        return Completion(text, prompt_tokens, tokens, finish, cached_tokens=cached)

    async def produce(emit: Emit) -> None:
        await emit(event("response.created", response=reply.envelope("in_progress", [])))
        await emit(event("response.in_progress", response=reply.envelope("in_progress", [])))
        if plan is None:
            async with aclosing(rt.generate_stream(body.model, messages, options, keep_alive=body.keep_alive,
                                                   priority=priority)) as chunks:
                done = await text_events(emit, chunks)
            output = [reply.message(done.text, _status(done.finish_reason))]
        else:  # a call is only known once its whole JSON is in: generate, then send it
            done = await rt.generate(body.model, messages, options, keep_alive=body.keep_alive, priority=priority)
            read = plan.read(done.text, done.finish_reason)
            output = reply.output(read, done.text, _status(done.finish_reason))
            if read.call is None:
                await text_events(emit, _one_piece(read.answer or "", done))
            else:
                item = output[0]
                await emit(event("response.output_item.added", output_index=0,
                                 item={**item, "arguments": "", "status": "in_progress"}))
                await emit(event("response.function_call_arguments.delta", item_id=item["id"], output_index=0,
                                 delta=item["arguments"]))
                await emit(event("response.function_call_arguments.done", item_id=item["id"], output_index=0,
                                 name=item["name"], arguments=item["arguments"]))
                await emit(event("response.output_item.done", output_index=0, item=item))
        status = _status(done.finish_reason)
        await emit(event(f"response.{status}", response=reply.envelope(status, output, done)))

    def on_error(exc: Exception) -> str:
        err = api_error(exc)
        code = "rate_limit_exceeded" if err.status == 503 else "server_error"
        return (event("error", code=err.code or code, message=err.message, param=None)
                + event("response.failed", response=reply.envelope("failed", [], error={
                    "code": code, "message": err.message})))

    return LazyStreamResponse(produce, media_type="text/event-stream", on_error=on_error, headers=SSE_HEADERS)


async def _one_piece(text: str, done: Completion) -> AsyncIterator[Chunk]:
    """A finished completion as one streamed piece."""
    yield Chunk(text, done.completion_tokens, done.finish_reason, done.prompt_tokens, done.cached_tokens)


@router.get("/responses/{response_id}")
async def get_response(response_id: str) -> Response:
    """Stored responses cannot be read back: nothing is stored."""
    raise ApiError(404, f"response '{response_id}' was not stored: Multilane stores no responses (every response "
                        "is store: false)", type="not_found_error", code="not_found")
