"""Tools as constrained output, shared by the chat completions, Responses and Ollama chat routes.

A reply is generated under one JSON schema that allows exactly a call of one offered function, written
`{"<function name>": {<arguments>}}`, or (when the model may answer) `{"answer": <answer>}`. The function's
name is the wrapper's only key and its arguments are that key's value, so a function parameter called
`name` (or `arguments`) can never mix with the wrapper.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from multilane.engines.base import Message
from multilane.json_schemas import embed_at
from multilane.pipeline.executor import parse_json_output
from multilane.server.common import ApiError, checked_schema, dumps

FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionDef(BaseModel):
    """A function the model may call: its name, what it does, and a JSON schema of its arguments."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    """A tool as chat completions and Ollama take it: `{"type": "function", "function": {...}}`."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionDef


@dataclass(frozen=True)
class Function:
    """A function offered to the model, whatever the API that described it."""

    name: str
    description: str
    parameters: dict[str, Any]
    field: str  # where the request gave its parameters, for errors: "body.tools[1].function.parameters"


def functions_of(tools: Sequence[Tool]) -> list[Function]:
    """The functions of chat-style tools."""
    return [Function(t.function.name, t.function.description or "", t.function.parameters or _NO_PARAMETERS,
                     f"body.tools[{i}].function.parameters") for i, t in enumerate(tools)]


_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: an id for the client to answer to, the function's name and its arguments."""

    id: str
    name: str
    arguments: Any

    @property
    def arguments_json(self) -> str:
        """The arguments as a JSON string, as the OpenAI APIs carry them."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ToolReply:
    """What a constrained tool step produced: a call, or an answer (JSON text when the answer has a schema)."""

    call: ToolCall | None
    answer: str | None


@dataclass(frozen=True)
class ToolPlan:
    """How a request's tools become constrained output: the schema, and the instructions the model reads."""

    schema: dict[str, Any]
    instructions: str
    answer_key: str | None  # None: the model must call a function
    answer_is_json: bool = False  # the answer follows a response format's schema

    def read(self, text: str, finish_reason: str | None) -> ToolReply:
        """Parse and validate a reply generated under the schema (OutputValidationError if it breaks it)."""
        value = parse_json_output(text, self.schema, finish_reason=finish_reason)
        ((key, inner),) = value.items()  # the schema allows exactly one key
        if key == self.answer_key:
            return ToolReply(None, dumps(inner) if self.answer_is_json or not isinstance(inner, str) else inner)
        return ToolReply(ToolCall(f"call_{uuid.uuid4().hex[:24]}", key, inner), None)


def _pointer_token(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def plan_tools(functions: Sequence[Function], *, must_call: bool = False, only: str | None = None,
               answer_schema: dict[str, Any] | None = None, choice_field: str = "body.tool_choice") -> ToolPlan:
    """The constrained output for offered functions: a call of one of them or, unless `must_call`, an answer.

    `only` names the one function the model must call. `answer_schema` (a response format's schema) shapes
    the answer; without it the answer is text. Schemas are checked first: a bad one is a 422 naming its field.
    """
    for function in functions:
        checked_schema(function.parameters, function.field)
    offered = list(functions)
    if only is not None:
        offered = [f for f in functions if f.name == only]
        if not offered:
            raise ApiError(422, f"{choice_field} names function '{only}', which is not among the tools "
                                f"({', '.join(f.name for f in functions)})", code="invalid_tool_choice")
        must_call = True
    answer_key = None
    if not must_call:
        answer_key = "answer"
        while any(f.name == answer_key for f in offered):  # a function called "answer" keeps its name
            answer_key = f"_{answer_key}"
    branches: list[tuple[str, dict[str, Any]]] = [(f.name, f.parameters) for f in offered]
    if answer_key is not None:
        branches.append((answer_key, answer_schema or {"type": "string"}))

    def branch(i: int, key: str, inner: dict[str, Any]) -> dict[str, Any]:
        at = ("" if len(branches) == 1 else f"/anyOf/{i}") + f"/properties/{_pointer_token(key)}"
        return {"type": "object", "properties": {key: embed_at(inner, at)}, "required": [key],
                "additionalProperties": False}

    options = [branch(i, key, inner) for i, (key, inner) in enumerate(branches)]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    listing = "\n".join(dumps({"name": f.name, "description": f.description, "parameters": f.parameters})
                        for f in offered)
    example = offered[0].name
    text = (f"You can call these functions:\n{listing}\n"
            f'To call a function, reply with JSON whose only key is the function\'s name and whose value holds '
            f'its arguments: {{"{example}": {{<arguments>}}}}.')
    if answer_key is not None:
        shape = "<your answer as JSON>" if answer_schema is not None else "<your answer>"
        text += f' To answer without calling a function, reply with JSON: {{"{answer_key}": {shape}}}.'
    return ToolPlan(schema, text, answer_key, answer_is_json=answer_schema is not None)


def with_instructions(messages: list[Message], text: str) -> list[Message]:
    """Add instructions to the chat's system message, or start the chat with one."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def call_text(name: str, arguments: Any) -> str:
    """An earlier call as the model wrote it, for the transcript; string arguments are parsed when they are JSON."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return dumps({name: arguments})


def result_text(name: str | None, content: str) -> str:
    """A function's result as the model reads it (a user turn: chat templates know no tool role)."""
    return f"Result of the function call{f' {name}' if name else ''}: {content}"


class CallNames:
    """Remembers the function each call id named, so that a result given only by its call id can say which."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    def note(self, call_id: str | None, name: str) -> None:
        """Remember an earlier call."""
        if call_id:
            self._names[call_id] = name

    def name(self, call_id: str | None) -> str | None:
        """The function an earlier call of this id named, if known."""
        return self._names.get(call_id or "")
