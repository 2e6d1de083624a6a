"""The executor: walks a pipeline's stage graph, running every stage as soon as what it reads is ready."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import jsonschema
import numpy as np
import structlog

from multilane.engines.base import Chunk, Completion, Message, SamplingOptions, collect
from multilane.errors import EngineError, ItemError, MultilaneError, OutputValidationError, StageError, TemplateError
from multilane.pipeline.templates import NO_ITEM, evaluate, render
from multilane.retrieval import OpenedIndex
from multilane.retrieval.filters import DocumentFilter
from multilane.spec import (
    AgentStage,
    EmbedStage,
    GenerateStage,
    PipelineSpec,
    ReasonStage,
    RetrieveStage,
    StageBase,
    ToolCallStage,
    describe_value,
)
from multilane.steps import Scope

if TYPE_CHECKING:
    from multilane.agents import Agent, AgentStep

log = structlog.get_logger(__name__)


class Resources(Protocol):
    """What stages need from the runtime: models by name and indexes by name."""

    async def generate(self, model: str, messages: Sequence[Message] | str, options: SamplingOptions | None = None,
                       *, truncate: bool = False, priority: int = 0) -> Completion: ...

    def generate_stream(self, model: str, messages: Sequence[Message] | str, options: SamplingOptions | None = None,
                        *, truncate: bool = False, priority: int = 0) -> AsyncGenerator[Chunk, None]: ...

    async def embed(self, model: str, texts: Sequence[str]) -> np.ndarray: ...

    async def index(self, name: str) -> OpenedIndex: ...

    def agent(self, name: str) -> Agent: ...


@dataclass(frozen=True)
class StageEvent:
    """When a stage of a run started and finished (perf_counter seconds), and whether it failed."""

    stage: str
    started: float
    finished: float
    ok: bool = True


@dataclass(frozen=True)
class RunResult:
    """The outcome of a pipeline run: its output, every stage's result, and the stage timeline."""

    run_id: str
    pipeline: str
    output: Any
    stages: dict[str, dict[str, Any]]
    events: list[StageEvent] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the result."""
        return {"run_id": self.run_id, "pipeline": self.pipeline, "output": self.output,
                "stages": self.stages, "seconds": round(self.seconds, 3),
                "events": [{"stage": e.stage, "started": e.started, "finished": e.finished, "ok": e.ok}
                           for e in self.events]}


@dataclass(frozen=True)
class RunEvent:
    """Something that happened in a run, for streaming: run/stage started/finished/failed, or a token."""

    type: str  # run_started | stage_started | token | stage_finished | stage_failed | run_finished | run_failed
    run_id: str
    stage: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the event."""
        return {"type": self.type, "run_id": self.run_id, "stage": self.stage, **self.data}


EventSink = Callable[[RunEvent], Awaitable[None]]


@dataclass(frozen=True)
class StageContext:
    """What a stage runner sees: its name, the run's inputs, earlier stages' results, and the runtime."""

    pipeline: str
    stage: str
    run_id: str
    inputs: Mapping[str, Any]
    stages: Mapping[str, Any]
    resources: Resources
    scope: Scope  # the stage's (or item's) place in the run: its steps are recorded and looked up under it
    sink: EventSink | None = None
    item: Any = NO_ITEM  # the list element, in a for_each stage
    item_index: int | None = None
    priority: int = 0  # of the stage's model calls, lower first (the stage's setting, else the pipeline's)

    def render(self, source: str) -> str:
        """Render a template of this stage with `inputs` and `stages` (and `item` in a for_each stage)."""
        return render(source, inputs=self.inputs, stages=self.stages, item=self.item)

    async def emit(self, type: str, **data: Any) -> None:
        """Send an event to the run's listener, if it has one; events of a for_each item carry its index."""
        if self.sink is not None:
            if self.item_index is not None:
                data = {"item": self.item_index, **data}
            await self.sink(RunEvent(type, self.run_id, self.stage, data))


StageRunner = Callable[[Any, StageContext], Awaitable[dict[str, Any]]]


def _messages(stage: GenerateStage, ctx: StageContext) -> list[Message]:
    messages: list[Message] = []
    if stage.system is not None:
        messages.append({"role": "system", "content": ctx.render(stage.system)})
    messages.append({"role": "user", "content": ctx.render(stage.prompt)})
    return messages


def _options(stage: GenerateStage, schema: dict[str, Any] | None = None) -> SamplingOptions:
    return SamplingOptions(max_tokens=stage.max_tokens, temperature=stage.temperature, top_p=stage.top_p,
                           stop=tuple(stage.stop), json_schema=schema, seed=stage.seed)


async def _generate(stage: GenerateStage, ctx: StageContext, options: SamplingOptions) -> Completion:
    """Generate a stage's completion; with a listener, stream it and pass each piece on as a token event.

    A completion answered from the journal or the cache reaches the listener as one piece.
    """
    messages = _messages(stage, ctx)
    streamed = False

    async def call() -> Completion:
        nonlocal streamed
        if ctx.sink is None:
            return await ctx.resources.generate(stage.model, messages, options, truncate=stage.truncate,
                                                priority=ctx.priority)
        streamed = True
        stream = ctx.resources.generate_stream(stage.model, messages, options, truncate=stage.truncate,
                                               priority=ctx.priority)
        return await collect(stream, lambda text: ctx.emit("token", text=text))

    done = await ctx.scope.generate(stage.model, messages, options, call, truncate=stage.truncate)
    if ctx.sink is not None and not streamed and done.text:
        await ctx.emit("token", text=done.text)
    return done


async def _run_embed(stage: EmbedStage, ctx: StageContext) -> dict[str, Any]:
    text = ctx.render(stage.text)

    async def embed() -> list[float]:
        return [float(x) for x in (await ctx.resources.embed(stage.model, [text]))[0]]

    vector = await ctx.scope.child("embed").run("embed", embed, attrs={"model": stage.model, "text": text},
                                                leaf=True)
    return {"vector": vector, "dimension": len(vector), "text": text}


async def _run_retrieve(stage: RetrieveStage, ctx: StageContext) -> dict[str, Any]:
    query = ctx.render(stage.query)
    where = None if stage.filter is None else DocumentFilter.from_mapping(stage.filter)

    async def search() -> list[dict[str, Any]]:
        index = await ctx.resources.index(stage.index)
        hits = (await index.search([query], stage.top_k, mode=stage.mode, weights=stage.fusion_weights,
                                   where=where, per_source=stage.per_source, candidates=stage.candidates))[0]
        return [{"rank": rank, "source": hit.chunk.source, "score": round(float(hit.score), 4),
                 "text": hit.chunk.text} for rank, hit in enumerate(hits, start=1)]

    attrs = {"index": stage.index, "query": query, "top_k": stage.top_k, "mode": stage.mode,
             "weights": stage.fusion_weights, "filter": stage.filter, "per_source": stage.per_source,
             "candidates": stage.candidates}
    passages = await ctx.scope.child("search").run("search", search, attrs=attrs, leaf=True)
    text = "\n\n".join(f"[{p['rank']}] ({p['source']})\n{p['text'].strip()}" for p in passages)
    return {"query": query, "passages": passages, "text": text}


async def _run_reason(stage: ReasonStage, ctx: StageContext) -> dict[str, Any]:
    done = await _generate(stage, ctx, _options(stage))
    return {"text": done.text.strip(), "prompt_tokens": done.prompt_tokens, "cached_tokens": done.cached_tokens,
            "completion_tokens": done.completion_tokens, "finish_reason": done.finish_reason,
            "cached": bool(done.extra.get("cached"))}


async def _run_tool_call(stage: ToolCallStage, ctx: StageContext) -> dict[str, Any]:
    done = await _generate(stage, ctx, _options(stage, stage.json_schema))
    value = parse_json_output(done.text, stage.json_schema, finish_reason=done.finish_reason)
    return {"json": value, "text": done.text, "prompt_tokens": done.prompt_tokens,
            "cached_tokens": done.cached_tokens, "completion_tokens": done.completion_tokens,
            "finish_reason": done.finish_reason, "cached": bool(done.extra.get("cached"))}


async def _run_agent(stage: AgentStage, ctx: StageContext) -> dict[str, Any]:
    from multilane.agents import run_agent

    task = ctx.render(stage.task)
    agent = ctx.resources.agent(stage.agent)

    async def on_step(step: AgentStep) -> None:
        await ctx.emit("agent_step", agent=agent.name, step=step.to_dict())

    result = await run_agent(agent, task, ctx.resources, on_step=on_step if ctx.sink is not None else None,
                             scope=ctx.scope.child("agent"), priority=ctx.priority)
    return result.to_dict()


async def run_for_each(stage: StageBase, ctx: StageContext, runner: StageRunner) -> dict[str, Any]:
    """Run a stage once per element of its for_each list, at most max_concurrency at a time, results in order.

    on_error: `fail` fails the stage at the first failed item (cancelling the rest); `skip` leaves failed items
    out of `items`; `collect` keeps them in place as {"error", "item"}. Both list failures under `errors`.
    """
    source = stage.for_each_source()
    assert source is not None
    values = evaluate(source, inputs=ctx.inputs, stages=ctx.stages)
    if not isinstance(values, list | tuple):
        raise TemplateError(f"for_each must give a list, got {describe_value(values)}")
    missing = object()
    results: list[Any] = [missing] * len(values)
    errors: list[dict[str, Any]] = []
    failed: list[ItemError] = []
    limiter = anyio.CapacityLimiter(stage.max_concurrency)

    async def one(index: int, item: Any, scope: anyio.CancelScope) -> None:
        item_ctx = dataclasses.replace(ctx, item=item, item_index=index, scope=ctx.scope.child(f"item:{index}"))
        async with limiter:
            try:
                results[index] = await item_ctx.scope.run("item", lambda: runner(stage, item_ctx), attrs={"item": item})
            except Exception as exc:
                if not isinstance(exc, MultilaneError):
                    log.exception("for_each item crashed", stage=ctx.stage, item=index)
                    exc = EngineError(f"{type(exc).__name__}: {exc}")
                error = ItemError(index, len(values), item, exc)
                if stage.on_error == "fail":
                    failed.append(error)
                    scope.cancel()
                    return
                log.warning("for_each item failed", stage=ctx.stage, item=index, error=str(exc))
                errors.append({"index": index, "item": item, "error": str(exc)})

    async with anyio.create_task_group() as tg:
        for index, item in enumerate(values):
            tg.start_soon(one, index, item, tg.cancel_scope)
    if failed:
        raise failed[0]
    if stage.on_error == "collect":
        by_index = {e["index"]: e for e in errors}
        items = [r if r is not missing else {"error": by_index[i]["error"], "item": values[i]}
                 for i, r in enumerate(results)]
    else:
        items = [r for r in results if r is not missing]
    return {"items": items, "count": len(items), "errors": sorted(errors, key=lambda e: e["index"])}


def parse_json_output(text: str, schema: dict[str, Any], *, finish_reason: str | None = None) -> Any:
    """Parse a constrained output and validate it against its schema; a violation is an error, never passed on."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        hint = " (the output hit max_tokens before the JSON closed; raise max_tokens)" \
            if finish_reason == "length" else ""
        raise OutputValidationError(f"model output is not valid JSON{hint}: {exc}; output: {text[:200]!r}") \
            from exc
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise OutputValidationError(f"model output does not match the schema at {where}: {exc.message}") \
            from exc
    return value


RUNNERS: dict[str, StageRunner] = {
    "embed": _run_embed,
    "retrieve": _run_retrieve,
    "reason": _run_reason,
    "tool_call": _run_tool_call,
    "agent": _run_agent,
}


async def execute(name: str, pipeline: PipelineSpec, inputs: Mapping[str, Any], resources: Resources, *,
                  run_id: str | None = None, sink: EventSink | None = None, scope: Scope | None = None) -> RunResult:
    """Run a pipeline: each stage starts once the stages it depends on finished; a failure cancels the rest.

    With a `sink`, every stage start and finish, and every generated piece of text, is sent to it as a RunEvent.
    Each stage, item and call is a step under `scope` (the run's), whose layers may record or answer it.
    """
    run_id = scope.run_id if scope is not None else run_id or uuid.uuid4().hex[:12]
    scope = scope or Scope(run_id)
    bound = pipeline.check_inputs(inputs, pipeline=name)
    deps = pipeline.dependencies()
    done = {stage: anyio.Event() for stage in pipeline.stages}
    results: dict[str, dict[str, Any]] = {}
    events: list[StageEvent] = []
    failures: list[StageError] = []
    started = time.perf_counter()

    async def emit(type: str, stage: str | None = None, **data: Any) -> None:
        if sink is not None:
            await sink(RunEvent(type, run_id, stage, data))

    async def run_stage(stage_name: str, cancel: anyio.CancelScope) -> None:
        for dep in deps[stage_name]:
            await done[dep].wait()
        stage = pipeline.stages[stage_name]
        stage_scope = scope.child(f"stage:{stage_name}", cache=getattr(stage, "cache", None))
        ctx = StageContext(name, stage_name, run_id, bound, results, resources, stage_scope, sink,
                           priority=pipeline.priority_of(stage_name))
        log.debug("stage started", stage=stage_name, kind=stage.kind)
        await emit("stage_started", stage_name, kind=stage.kind)
        t0 = time.perf_counter()
        runner = RUNNERS[stage.kind]
        try:
            with anyio.fail_after(stage.timeout_seconds):
                result = await stage_scope.run(
                    "stage", lambda: runner(stage, ctx) if stage.for_each is None else run_for_each(stage, ctx, runner),
                    attrs={"kind": stage.kind})
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"timed out after {stage.timeout_seconds:g}s (the stage's timeout)")
            elif not isinstance(exc, MultilaneError):  # a bug or an engine surprise: keep the traceback in the log
                log.exception("stage crashed", stage=stage_name)
                exc = EngineError(f"{type(exc).__name__}: {exc}")
            failures.append(StageError(name, stage_name, exc))
            events.append(StageEvent(stage_name, t0, time.perf_counter(), ok=False))
            await emit("stage_failed", stage_name, error=str(exc))
            cancel.cancel()  # a failed stage stops its siblings; their engine requests are aborted
            return
        events.append(StageEvent(stage_name, t0, time.perf_counter()))
        results[stage_name] = result
        log.info("stage finished", stage=stage_name, kind=stage.kind, seconds=round(time.perf_counter() - t0, 3))
        await emit("stage_finished", stage_name, result=result, seconds=round(time.perf_counter() - t0, 3))
        done[stage_name].set()

    with structlog.contextvars.bound_contextvars(run_id=run_id, pipeline=name):
        log.info("run started", stages=len(pipeline.stages))
        await emit("run_started", pipeline=name, inputs=bound)
        async with anyio.create_task_group() as tg:
            for stage_name in pipeline.stages:
                tg.start_soon(run_stage, stage_name, tg.cancel_scope)
        if failures:
            failure = failures[0]
            log.error("run failed", stage=failure.stage, error=str(failure.cause))
            await emit("run_failed", failure.stage, error=str(failure))
            raise failure from failure.cause
        try:
            output: Any = results if pipeline.output is None else render(
                pipeline.output, inputs=bound, stages=results)
        except MultilaneError as exc:
            await emit("run_failed", error=str(exc))
            raise
        seconds = time.perf_counter() - started
        log.info("run finished", seconds=round(seconds, 3))
        await emit("run_finished", output=output, seconds=round(seconds, 3))
    return RunResult(run_id, name, output, results, sorted(events, key=lambda e: e.started), seconds)
