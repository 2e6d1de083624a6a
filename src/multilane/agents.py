"""Agents: typed tools, the schema-constrained tool-call loop, and agents as tools of agents."""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol, get_type_hints, overload

import anyio
import docstring_parser
import jsonschema
import structlog
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model
from pydantic.fields import FieldInfo

from multilane.engines.base import Completion, Message, SamplingOptions
from multilane.errors import AgentStepLimitError, MultilaneError, OutputValidationError
from multilane.steps import Codec, Scope

if TYPE_CHECKING:
    from multilane.retrieval import OpenedIndex

__all__ = [
    "Agent",
    "AgentContext",
    "AgentResult",
    "AgentRuntime",
    "AgentStep",
    "Tool",
    "ToolCall",
    "run_agent",
    "tool",
]

log = structlog.get_logger(__name__)

MAX_DEPTH = 8  # agents calling agents calling agents...
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class AgentRuntime(Protocol):
    """What an agent run needs: generation with a declared model, and declared indexes for tools."""

    async def generate(self, model: str, messages: Sequence[Message] | str, options: SamplingOptions | None = None,
                       *, truncate: bool = False, priority: int = 0) -> Completion: ...

    async def index(self, name: str) -> OpenedIndex: ...


@dataclass(frozen=True)
class AgentContext:
    """What a tool receives when one of its parameters is annotated `AgentContext`: the runtime and the run.

    `scope` is the tool call's place in the run (see `multilane.steps`), under which a sub-agent's steps go;
    `priority` is the run's, which a sub-agent's model calls keep.
    """

    runtime: AgentRuntime
    agent: Agent
    run_id: str
    depth: int = 0
    scope: Scope | None = None
    priority: int = 0


# ---------------------------------------------------------------------------------------------
# Tools


def _doc_sections(doc: str) -> tuple[str, dict[str, str]]:
    """A docstring's summary and its per-argument descriptions, written Google, numpy or reST style."""
    try:
        parsed = docstring_parser.parse(doc)
    except docstring_parser.ParseError:  # a docstring no style reads: all of it is the summary
        return " ".join(doc.split()), {}
    summary = " ".join(part for part in (parsed.short_description, parsed.long_description) if part)
    args = {p.arg_name: " ".join((p.description or "").split()) for p in parsed.params}
    return " ".join(summary.split()), args


def _inline(schema: Any, defs: Mapping[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """Resolve `$ref`s into their definitions and drop titles, so the schema is small and self-contained."""
    if isinstance(schema, list):
        return [_inline(item, defs, seen) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        ref = str(schema["$ref"]).rsplit("/", 1)[-1]
        if ref in seen:
            raise TypeError(f"recursive type '{ref}' cannot be a tool argument")
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return {**_inline(defs[ref], defs, (*seen, ref)), **_inline(rest, defs, seen)}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("title", "$defs"):
            continue
        if key in ("properties", "patternProperties") and isinstance(value, dict):
            out[key] = {name: _inline(sub, defs, seen) for name, sub in value.items()}
        elif key == "default" or key == "examples" or key == "const" or key == "enum":
            out[key] = value
        else:
            out[key] = _inline(value, defs, seen)
    return out


def json_schema_of(adapter: TypeAdapter[Any] | type[BaseModel]) -> dict[str, Any]:
    """A pydantic type's JSON schema with references inlined and titles dropped."""
    schema = adapter.model_json_schema() if isinstance(adapter, type) else adapter.json_schema()
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return inlined


class Tool:
    """A function an agent can call, with the JSON schema of its arguments taken from its signature and docstring."""

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"tool name {self.name!r} must be a plain identifier (letters, digits, _ and -)")
        summary, arg_docs = _doc_sections(inspect.getdoc(fn) or "")
        self.description = description if description is not None else summary
        self.is_async = inspect.iscoroutinefunction(fn)
        self.indexes: tuple[str, ...] = ()  # declared indexes the tool searches, checked when the file loads
        self.agent: Agent | None = None  # set when the tool runs a sub-agent
        self._context_param: str | None = None
        hints = get_type_hints(fn, include_extras=True)
        fields: dict[str, Any] = {}
        for pname, param in inspect.signature(fn).parameters.items():
            if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise TypeError(f"tool '{self.name}': *args and **kwargs cannot be described to a model")
            annotation = hints.get(pname)
            if annotation is AgentContext:
                self._context_param = pname
                continue
            if annotation is None:
                raise TypeError(f"tool '{self.name}': annotate parameter '{pname}' so its schema is known")
            info: FieldInfo = param.default if isinstance(param.default, FieldInfo) else Field(
                default=... if param.default is inspect.Parameter.empty else param.default)
            if pname in arg_docs and info.description is None and not _described(annotation):
                annotation = Annotated[annotation, Field(description=arg_docs[pname])]
            fields[pname] = (annotation, info)
        self.args_model: type[BaseModel] = create_model(  # type: ignore[call-overload]
            f"{self.name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        self.parameters: dict[str, Any] = json_schema_of(self.args_model)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def call_schema(self) -> dict[str, Any]:
        """The JSON schema of one call of this tool: `{"tool": name, "arguments": {...}}`."""
        return {"type": "object", "properties": {"tool": {"const": self.name}, "arguments": self.parameters},
                "required": ["tool", "arguments"], "additionalProperties": False}

    def signature(self) -> str:
        """A compact line for a system prompt: `name(arg: type, ...): description`."""
        props: dict[str, Any] = self.parameters.get("properties", {})
        required = set(self.parameters.get("required", []))
        args = []
        notes = []
        for name, sub in props.items():
            kind = _type_name(sub)
            args.append(f"{name}: {kind}" if name in required else f"{name}: {kind} = {json.dumps(sub.get('default'))}")
            if sub.get("description"):
                notes.append(f"{name}: {str(sub['description']).rstrip('.')}")
        line = f"{self.name}({', '.join(args)})"
        if self.description:
            line += f": {self.description}"
        if notes:
            line += f" ({'; '.join(notes)})"
        return line

    def validate(self, arguments: Any) -> BaseModel:
        """Validate arguments with pydantic; raises ValidationError."""
        return self.args_model.model_validate(arguments)

    async def invoke(self, arguments: BaseModel, ctx: AgentContext) -> Any:
        """Call the function with validated arguments; a sync function runs in a worker thread."""
        kwargs = {name: getattr(arguments, name) for name in type(arguments).model_fields}
        if self._context_param is not None:
            kwargs[self._context_param] = ctx
        if self.is_async:
            return await self.fn(**kwargs)
        return await anyio.to_thread.run_sync(functools.partial(self.fn, **kwargs))


def _described(annotation: Any) -> bool:
    return any(isinstance(m, FieldInfo) and m.description for m in getattr(annotation, "__metadata__", ()))


def _type_name(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return "|".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return "|".join(_type_name(s) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "object" and isinstance(schema.get("properties"), dict):
        required = set(schema.get("required", []))
        return "{" + ", ".join(f"{name}{'' if name in required else '?'}: {_type_name(sub)}"
                               for name, sub in schema["properties"].items()) + "}"
    if kind == "array":
        return f"list[{_type_name(schema.get('items', {}))}]"
    return {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "null"}.get(
        str(kind), str(kind))


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(*, name: str | None = None, description: str | None = None) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
         description: str | None = None) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Turn a typed function (sync or async) into a Tool: `@tool` or `@tool(name=..., description=...)`."""
    if fn is not None:
        return Tool(fn, name=name, description=description)
    return lambda f: Tool(f, name=name, description=description)


# ---------------------------------------------------------------------------------------------
# Transcripts


@dataclass(frozen=True)
class ToolCall:
    """One tool call of an agent step: its arguments, the text the model got back, and its times."""

    tool: str
    arguments: Any
    result: str
    ok: bool
    started: float
    finished: float
    error: str | None = None
    sub: AgentResult | None = None  # the sub-agent's own run, when the tool is an agent

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the call."""
        out: dict[str, Any] = {"tool": self.tool, "arguments": self.arguments, "result": self.result, "ok": self.ok,
                               "error": self.error, "started": self.started, "finished": self.finished}
        if self.sub is not None:
            out["sub"] = self.sub.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        """The call back from `to_dict()` (a sub-agent's answer stays as JSON)."""
        sub = data.get("sub")
        return cls(data["tool"], data["arguments"], data["result"], data["ok"], data["started"], data["finished"],
                   data.get("error"), AgentResult.from_dict(sub) if sub is not None else None)


@dataclass(frozen=True)
class AgentStep:
    """One generation of the loop: what the model wrote and what came of it (tool calls, an answer, a rejection)."""

    index: int
    kind: str  # "calls" | "answer" | "rejected"
    output: str
    prompt_tokens: int
    completion_tokens: int
    started: float
    finished: float
    calls: tuple[ToolCall, ...] = ()
    answer: Any = None
    error: str | None = None
    cached: bool = False  # the model call was answered from the call cache
    cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the step."""
        return {"index": self.index, "kind": self.kind, "output": self.output, "answer": _jsonable(self.answer),
                "error": self.error, "calls": [c.to_dict() for c in self.calls],
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens, "cached": self.cached, "started": self.started,
                "finished": self.finished}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentStep:
        """The step back from `to_dict()` (its answer stays as JSON)."""
        return cls(data["index"], data["kind"], data["output"], data["prompt_tokens"], data["completion_tokens"],
                   data["started"], data["finished"], tuple(ToolCall.from_dict(c) for c in data["calls"]),
                   data.get("answer"), data.get("error"), bool(data.get("cached", False)),
                   int(data.get("cached_tokens", 0)))


@dataclass(frozen=True)
class AgentResult:
    """An agent run: its answer (None when it ran out of steps) and its transcript of steps."""

    agent: str
    run_id: str
    task: str
    answer: Any
    steps: tuple[AgentStep, ...]
    started: float
    finished: float

    @property
    def seconds(self) -> float:
        """How long the run took."""
        return self.finished - self.started

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens over every step of this run (sub-agents not included)."""
        return sum(s.prompt_tokens for s in self.steps)

    @property
    def completion_tokens(self) -> int:
        """Generated tokens over every step of this run (sub-agents not included)."""
        return sum(s.completion_tokens for s in self.steps)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens over every step of this run taken from the engine's prefix cache (sub-agents not included)."""
        return sum(s.cached_tokens for s in self.steps)

    @property
    def calls(self) -> list[ToolCall]:
        """Every tool call of the run, in order."""
        return [c for s in self.steps for c in s.calls]

    @property
    def transcript(self) -> list[dict[str, Any]]:
        """The steps as JSON-ready dicts: outputs, tool calls with results and times, tokens."""
        return [s.to_dict() for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the run; the `agent` stage's result."""
        return {"agent": self.agent, "run_id": self.run_id, "task": self.task, "answer": _jsonable(self.answer),
                "steps": len(self.steps), "transcript": self.transcript, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
                "seconds": round(self.seconds, 3),
                "started": self.started, "finished": self.finished}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentResult:
        """The run back from `to_dict()` (its answer stays as JSON)."""
        return cls(data["agent"], data["run_id"], data["task"], data.get("answer"),
                   tuple(AgentStep.from_dict(s) for s in data["transcript"]), data["started"], data["finished"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# Agents


class Agent:
    """An agent: a model, instructions and tools, looped step by step (each step schema-constrained) to an answer.

    Options for weak models: `first_step_calls` (the first step must make this many calls), `max_tool_steps`
    (after that many steps with calls the next must answer), `parallel_calls` (calls one step may make at once).
    """

    def __init__(self, name: str, model: str, instructions: str = "", tools: Sequence[Tool | Agent] = (), *,
                 max_steps: int = 8, output_type: Any = None, description: str | None = None,
                 first_step_calls: int = 0, max_tool_steps: int | None = None, parallel_calls: int = 1,
                 tool_retries: int = 2, max_tokens: int = 256, max_answer_chars: int | None = 600,
                 max_result_chars: int = 1500, temperature: float = 0.0) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"agent name {name!r} must be a plain identifier (letters, digits, _ and -)")
        self.name = name
        self.model = model
        self.instructions = instructions
        self.description = description or f"Ask the {name} agent to do a task."
        self.tools: tuple[Tool, ...] = tuple(t.as_tool() if isinstance(t, Agent) else t for t in tools)
        names = [t.name for t in self.tools]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"agent '{name}': two tools are named '{duplicated[0]}'")
        for value, label, low in ((max_steps, "max_steps", 1), (parallel_calls, "parallel_calls", 1),
                                  (first_step_calls, "first_step_calls", 0), (tool_retries, "tool_retries", 0),
                                  (max_tokens, "max_tokens", 1), (max_result_chars, "max_result_chars", 1)):
            if value < low:
                raise ValueError(f"agent '{name}': {label} must be >= {low}, got {value}")
        if first_step_calls and not self.tools:
            raise ValueError(f"agent '{name}': first_step_calls needs at least one tool")
        if first_step_calls > max(parallel_calls, 1):
            raise ValueError(f"agent '{name}': first_step_calls ({first_step_calls}) exceeds "
                             f"parallel_calls ({parallel_calls})")
        self.max_steps = max_steps
        self.output_type = output_type
        self.first_step_calls = first_step_calls
        self.max_tool_steps = max_tool_steps
        self.parallel_calls = parallel_calls
        self.tool_retries = tool_retries
        self.max_tokens = max_tokens
        self.max_answer_chars = max_answer_chars
        self.max_result_chars = max_result_chars
        self.temperature = temperature
        self._answer_adapter: TypeAdapter[Any] | None = None if output_type is None else TypeAdapter(output_type)
        if self._answer_adapter is None:
            self.answer_schema: dict[str, Any] = {"type": "string"}
            if max_answer_chars is not None:
                self.answer_schema["maxLength"] = max_answer_chars
        else:
            self.answer_schema = json_schema_of(self._answer_adapter)
        caller = sys._getframe(1)
        self.defined_at = f"{caller.f_code.co_filename}:{caller.f_lineno}"

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, model={self.model!r}, tools={[t.name for t in self.tools]})"

    def as_tool(self, name: str | None = None, description: str | None = None, *, max_task_chars: int = 300) -> Tool:
        """This agent as a tool of another: it takes a task and returns this agent's answer."""
        agent = self

        async def run(ctx: AgentContext, task: str) -> AgentResult:
            scope = ctx.scope.child("agent") if ctx.scope is not None else None
            return await run_agent(agent, task, ctx.runtime, depth=ctx.depth + 1, scope=scope, priority=ctx.priority)

        run.__annotations__ = {"ctx": AgentContext, "return": AgentResult, "task": Annotated[str, Field(
            min_length=1, max_length=max_task_chars)]}
        wrapped = Tool(run, name=name or self.name, description=description or self.description)
        wrapped.agent = self
        return wrapped

    def answer(self, value: Any) -> Any:
        """Validate a final answer against output_type (a string when there is none); raises ValidationError."""
        if self._answer_adapter is None:
            if not isinstance(value, str):
                raise TypeError(f"expected a string answer, got {type(value).__name__}")
            return value.strip()
        return self._answer_adapter.validate_python(value)

    def system_prompt(self) -> str:
        """The compact system message: instructions, one line per tool, and the reply format."""
        lines = [self.instructions.strip()] if self.instructions.strip() else []
        if self.tools:
            lines.append("Tools:")
            lines.extend(f"- {t.signature()}" for t in self.tools)
            many = ', {"calls": [call, ...]} for several at once' if self.parallel_calls > 1 else ""
            lines.append('Reply with JSON: {"tool": name, "arguments": {...}} to call a tool' + many +
                         ', or {"answer": ...} when done.')
        else:
            lines.append('Reply with JSON: {"answer": ...}.')
        return "\n".join(lines)

    def step_schema(self, *, first: bool, tools: Sequence[Tool], may_call: bool) -> dict[str, Any]:
        """The one JSON schema a step is generated under: allowed tool calls and/or the final answer."""
        answer = {"type": "object", "properties": {"answer": self.answer_schema}, "required": ["answer"],
                  "additionalProperties": False}
        if not tools or not may_call:
            return answer
        single = [t.call_schema() for t in tools]
        one: dict[str, Any] = single[0] if len(single) == 1 else {"anyOf": single}

        def many(low: int, high: int) -> dict[str, Any]:
            return {"type": "object", "properties": {"calls": {"type": "array", "items": one, "minItems": low,
                                                                "maxItems": high}},
                    "required": ["calls"], "additionalProperties": False}

        if first and self.first_step_calls > 1:
            return many(self.first_step_calls, self.first_step_calls)
        if first and self.first_step_calls == 1:
            return one
        options = [*single]
        if self.parallel_calls > 1:
            options.append(many(1, self.parallel_calls))
        options.append(answer)
        return {"anyOf": options}


# ---------------------------------------------------------------------------------------------
# The loop


StepCallback = Callable[[AgentStep], Awaitable[None]]


def _format_result(value: Any, limit: int) -> str:
    """The text the model reads for a tool's result: JSON, or the value's repr when JSON cannot show it."""
    if isinstance(value, AgentResult):
        value = value.answer
    try:
        if isinstance(value, BaseModel):
            text = value.model_dump_json()
        elif isinstance(value, str):
            text = value
        else:
            text = json.dumps(_jsonable(value), default=str)
    except Exception as exc:  # tuple keys, a cycle, a field pydantic cannot dump: the tool worked, show its value
        log.warning("tool result is not JSON; the model gets its repr", error=f"{type(exc).__name__}: {exc}")
        text = repr(value)
    if len(text) > limit:
        text = text[:limit] + " ...(cut)"
    return text


def _parse_step(agent: Agent, step: int, done: Completion, schema: dict[str, Any],
                available: Sequence[Tool]) -> dict[str, Any]:
    """Parse and check a step's output; an engine that ignored the schema is an OutputValidationError."""
    where = f"agent '{agent.name}' step {step}"
    try:
        value = json.loads(done.text)
    except ValueError as exc:
        hint = " (it hit max_tokens before the JSON closed; raise the agent's max_tokens)" \
            if done.finish_reason == "length" else ""
        raise OutputValidationError(f"{where}: model output is not valid JSON{hint}: {exc}; "
                                    f"output: {done.text[:200]!r}") from exc
    names = [t.name for t in available]
    calls = value.get("calls") if isinstance(value, dict) else None
    for call in calls if isinstance(calls, list) else [value]:
        if isinstance(call, dict) and isinstance(call.get("tool"), str) and call["tool"] not in names:
            known = ", ".join(names) or "none"
            raise OutputValidationError(f"{where}: unknown tool '{call['tool']}' (tools now: {known})")
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise OutputValidationError(f"{where}: model output does not match the step schema at {at}: "
                                    f"{exc.message}; output: {done.text[:200]!r}") from exc
    if not isinstance(value, dict):
        raise OutputValidationError(f"{where}: expected a JSON object, got {done.text[:200]!r}")
    return value


async def _call_tool(tool_: Tool, arguments: Any, ctx: AgentContext, limit: int) -> ToolCall:
    started = time.perf_counter()
    try:
        parsed = tool_.validate(arguments)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                             for e in exc.errors())
        error = f"invalid arguments: {problems}"
        return ToolCall(tool_.name, arguments, f"{tool_.name} failed: {error}", False, started,
                        time.perf_counter(), error)
    try:
        value = await tool_.invoke(parsed, ctx)
    except Exception as exc:  # a tool failure goes back to the model; it never ends the run
        error = f"{type(exc).__name__}: {exc}"
        log.warning("tool failed", tool=tool_.name, error=error)
        return ToolCall(tool_.name, arguments, f"{tool_.name} failed: {error}"[:limit], False, started,
                        time.perf_counter(), error)
    try:
        text = _format_result(value, limit)
    except Exception as exc:  # not even its repr works: the model gets an error, as for a tool that raised
        error = f"its result cannot be shown: {type(exc).__name__}: {exc}"
        log.warning("tool failed", tool=tool_.name, error=error)
        return ToolCall(tool_.name, arguments, f"{tool_.name} failed: {error}"[:limit], False, started,
                        time.perf_counter(), error)
    sub = value if isinstance(value, AgentResult) else None
    return ToolCall(tool_.name, arguments, text, True, started, time.perf_counter(), sub=sub)


TOOL_CALL: Codec[ToolCall] = Codec(ToolCall.to_dict, ToolCall.from_dict)
AGENT_STEP: Codec[AgentStep] = Codec(AgentStep.to_dict)  # re-run over its recorded model and tool calls
AGENT_RESULT: Codec[AgentResult] = Codec(AgentResult.to_dict)


async def _call_tools(wanted: Sequence[dict[str, Any]], available: Sequence[Tool], ctx: AgentContext,
                      limit: int, scope: Scope) -> tuple[ToolCall, ...]:
    """Make a step's calls; several calls run at the same time in one task group, their results kept in order.

    Each call is the step `tool:<i>` under the agent step's scope; a plain tool is a leaf (a replay answers it
    from the recording), a sub-agent is not (its own model calls are).
    """
    by_name = {t.name: t for t in available}
    calls: list[ToolCall | None] = [None] * len(wanted)

    async def one(i: int, call: dict[str, Any]) -> None:
        tool_ = by_name[call["tool"]]
        tool_scope = scope.child(f"tool:{i}")
        tool_ctx = dataclasses.replace(ctx, scope=tool_scope)
        made: ToolCall = await tool_scope.run(
            "tool", functools.partial(_call_tool, tool_, call["arguments"], tool_ctx, limit),
            attrs={"tool": tool_.name, "arguments": call["arguments"]}, codec=TOOL_CALL, leaf=tool_.agent is None)
        calls[i] = made

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(wanted):
            tg.start_soon(one, i, call)
    return tuple(c for c in calls if c is not None)


@dataclass
class _Conversation:
    """What an agent run carries from step to step: the messages, tool failures, and steps that made calls."""

    messages: list[Message]
    failures: Counter[str]
    tool_steps: int = 0


async def _take_step(agent: Agent, index: int, chat: _Conversation, runtime: AgentRuntime, ctx: AgentContext,
                     scope: Scope) -> AgentStep:
    """One step: generate under the step schema, then answer, or make the calls and add their results."""
    available = [t for t in agent.tools if chat.failures[t.name] <= agent.tool_retries]
    may_call = agent.max_tool_steps is None or chat.tool_steps < agent.max_tool_steps
    schema = agent.step_schema(first=index == 1, tools=available, may_call=may_call)
    options = SamplingOptions(max_tokens=agent.max_tokens, temperature=agent.temperature, json_schema=schema)
    messages = list(chat.messages)
    t0 = time.perf_counter()
    done = await scope.generate(agent.model, messages, options,
                                lambda: runtime.generate(agent.model, messages, options, priority=ctx.priority))
    value = _parse_step(agent, index, done, schema, available)
    chat.messages.append({"role": "assistant", "content": done.text})
    pt, ct, cached = done.prompt_tokens, done.completion_tokens, bool(done.extra.get("cached"))
    reused = done.cached_tokens
    if "answer" in value:
        try:
            answer = agent.answer(value["answer"])
        except (ValidationError, TypeError) as exc:  # passed the schema, failed a validator: try again
            chat.messages.append({"role": "user", "content": f"Your answer was rejected: {exc}"[:600]})
            return AgentStep(index, "rejected", done.text, pt, ct, t0, time.perf_counter(),
                             error=f"answer rejected: {exc}", cached=cached, cached_tokens=reused)
        return AgentStep(index, "answer", done.text, pt, ct, t0, time.perf_counter(), answer=answer, cached=cached,
                         cached_tokens=reused)
    wanted = value["calls"] if "calls" in value else [value]
    made = await _call_tools(wanted, available, ctx, agent.max_result_chars, scope)
    chat.tool_steps += 1
    notes: list[str] = []
    for call_ in made:
        if not call_.ok:
            chat.failures[call_.tool] += 1
            if chat.failures[call_.tool] > agent.tool_retries:
                notes.append(f"{call_.tool} failed too often and is no longer available.")
    reply = "\n\n".join(f"[{i}] {c.result}" if len(made) > 1 else c.result for i, c in enumerate(made, 1))
    if made and all(c.ok for c in made) and len(made) == 1:
        reply = f"{made[0].tool} returned:\n{reply}"
    if agent.max_tool_steps is not None and chat.tool_steps >= agent.max_tool_steps:
        notes.append("Now give your answer.")
    chat.messages.append({"role": "user", "content": "\n".join([reply, *notes])})
    return AgentStep(index, "calls", done.text, pt, ct, t0, time.perf_counter(), calls=made, cached=cached,
                     cached_tokens=reused)


async def run_agent(agent: Agent, task: str, runtime: AgentRuntime, *, depth: int = 0, run_id: str | None = None,
                    on_step: StepCallback | None = None, scope: Scope | None = None, priority: int = 0) -> AgentResult:
    """Loop an agent to an answer; raises AgentStepLimitError (with the transcript) when it runs out of steps.

    `scope` is the agent's place in a run (see `multilane.steps`): its steps, model and tool calls are steps
    under it. Without one, the run stands alone and nothing is recorded. Its model calls, and its
    sub-agents', wait for slots at `priority` (lower first).
    """
    if depth > MAX_DEPTH:
        raise MultilaneError(f"agent '{agent.name}': agents nest deeper than {MAX_DEPTH} levels")
    scope = scope if scope is not None else Scope(run_id or uuid.uuid4().hex[:12]).child("agent")
    run_id = run_id or scope.derived_id()  # the same id each time a recorded run executes again
    attrs = {"agent": agent.name, "model": agent.model, "task": task, "depth": depth}
    return await scope.run("agent", functools.partial(_run_loop, agent, task, runtime, depth, run_id, on_step, scope,
                                                      priority), attrs=attrs, codec=AGENT_RESULT)


async def _run_loop(agent: Agent, task: str, runtime: AgentRuntime, depth: int, run_id: str,
                    on_step: StepCallback | None, scope: Scope, priority: int) -> AgentResult:
    ctx = AgentContext(runtime, agent, run_id, depth, scope, priority)
    chat = _Conversation([{"role": "system", "content": agent.system_prompt()}, {"role": "user", "content": task}],
                         Counter())
    steps: list[AgentStep] = []
    started = time.perf_counter()
    with structlog.contextvars.bound_contextvars(agent=agent.name, agent_run=run_id):
        log.info("agent started", model=agent.model, task=task[:200], depth=depth)
        for index in range(1, agent.max_steps + 1):
            step_scope = scope.child(f"step:{index}")
            step = await step_scope.run(
                "agent_step", functools.partial(_take_step, agent, index, chat, runtime, ctx, step_scope),
                attrs={"agent": agent.name, "step": index, "task": task}, codec=AGENT_STEP)
            steps.append(step)
            log.info("agent step", step=step.index, kind=step.kind, error=step.error,
                     calls=[{"tool": c.tool, "arguments": c.arguments, "ok": c.ok, "result": c.result[:200]}
                            for c in step.calls],
                     prompt_tokens=step.prompt_tokens, cached_tokens=step.cached_tokens,
                     completion_tokens=step.completion_tokens)
            if on_step is not None:
                await on_step(step)
            if step.kind == "answer":
                result = AgentResult(agent.name, run_id, task, step.answer, tuple(steps), started, time.perf_counter())
                log.info("agent finished", steps=len(steps), seconds=round(result.seconds, 3),
                         prompt_tokens=result.prompt_tokens, cached_tokens=result.cached_tokens,
                         completion_tokens=result.completion_tokens, transcript=result.transcript)
                return result
        result = AgentResult(agent.name, run_id, task, None, tuple(steps), started, time.perf_counter())
        log.warning("agent ran out of steps", steps=len(steps), transcript=result.transcript)
    raise AgentStepLimitError(
        f"agent '{agent.name}' took its {agent.max_steps} steps without answering; raise max_steps, or read "
        "the steps in the error's transcript", agent=agent.name, transcript=result)
