"""Traces of runs in the OpenTelemetry GenAI conventions: a span for each step, with what its lane did.

`TraceLayer` wraps every step of a run (see `multilane.steps`) in a span: `invoke_workflow {pipeline}` for the
run, `stage {name}`, `item {stage}`, `invoke_agent {agent}`, `agent_step {agent}`, `execute_tool {tool}`,
`retrieval {index}`, `embeddings {model}` and `chat {model}`. A model or embedding call also carries what the
scheduler did with it (`multilane.*`: its lane, the slots busy and calls waiting when it arrived, how long it
queued, whether it waited for the model to load and for how long, its time to first token), and gets a child
span for each wait (`load {lane}`, `queue {lane}`), so a trace viewer shows where the time went.

The spans go to the OpenTelemetry API: nothing is recorded until a tracer provider is configured, by the host
application, by `runtime.tracing` in the pipeline file, or by the standard `OTEL_*` environment variables
(see `export_provider`). Prompts, outputs and tool arguments are recorded only when asked (`content`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from multilane.agents import AgentResult, AgentStep, ToolCall
from multilane.engines.base import Completion
from multilane.errors import MultilaneError
from multilane.lanes import Lane, LaneCall, observing_calls
from multilane.steps import Proceed, Step

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

    from multilane.retrieval import OpenedIndex
    from multilane.spec import TracingSpec

__all__ = [
    "PROVIDER",
    "IndexTrace",
    "TraceLayer",
    "TracedStep",
    "TracingError",
    "capture_content",
    "export_provider",
    "index_span",
    "tracer_of",
    "tracing_off",
]

PROVIDER = "multilane"
"""`gen_ai.provider.name` of the spans: the models run in Multilane's own lanes."""

_SCOPE = "multilane"
_CONTENT_VARIABLE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_OBSERVED = frozenset({"model", "embed", "search", "tool"})  # steps whose own lane calls they report
_SDK_HINT = "install the OpenTelemetry SDK and exporter: pip install 'multilane[otel]'"


class TracingError(MultilaneError):
    """Tracing was asked for (runtime.tracing or OTEL_* variables) but cannot be set up."""


def _version() -> str:
    try:
        return importlib.metadata.version("multilane")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


def tracer_of(provider: trace.TracerProvider | None = None) -> Tracer:
    """Multilane's tracer from a tracer provider, or from the global one (a no-op until one is set)."""
    return (provider or trace.get_tracer_provider()).get_tracer(_SCOPE, _version())


class TraceLayer:
    """Opens a span for every step of a run, in the GenAI conventions, with the lane's figures of each call."""

    def __init__(self, tracer: Tracer, *, content: bool = False) -> None:
        self.tracer = tracer
        self.content = content

    async def around(self, step: Step, proceed: Proceed) -> Any:
        """Run the step inside its span; an error sets the span's status, a cancellation marks it."""
        traced = self.start(step)
        try:
            with trace.use_span(traced.span, record_exception=False, set_status_on_exception=False), \
                    traced.observing():
                result = await proceed()
        except BaseException as exc:
            traced.failed(exc)
            raise
        traced.succeeded(result)
        return result

    def start(self, step: Step) -> TracedStep:
        """Open the span of a step, for a caller that runs the step itself (a model call made outside a run)."""
        name, kind, attributes = _describe(step, self.content)
        return TracedStep(self, step, self.tracer.start_span(name, kind=kind, attributes=attributes))

    def lanes(self, span: Span, step: Step, calls: Sequence[LaneCall]) -> None:
        """Show the lane calls of a step: on its own span for a model or embedding call, else as child spans."""
        if not span.is_recording():
            return
        if step.kind in ("model", "embed") and calls:
            call = calls[-1]
            span.set_attributes(_lane_attributes(call))
            self._waits(span, call)
            return
        for call in calls:  # a search's query embedding, or the models a plain tool calls
            operation = "chat" if call.kind == "generate" else "embeddings"
            attributes = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER,
                          "gen_ai.request.model": call.model, **_lane_attributes(call)}
            child = self.tracer.start_span(f"{operation} {call.model}", context=trace.set_span_in_context(span),
                                           kind=SpanKind.CLIENT, attributes=attributes, start_time=call.arrived_ns)
            self._waits(child, call)
            child.end(end_time=call.finished_ns)

    def _waits(self, span: Span, call: LaneCall) -> None:
        """A child span for the model load the call waited for, and one for its time in the lane's queue."""
        context = trace.set_span_in_context(span)
        if call.load is not None:
            _load_span(self.tracer, span, call.lane, call.load, call.arrived_ns)
        if call.queued:
            end = call.admitted_ns if call.admitted_ns is not None else call.finished_ns
            queue = self.tracer.start_span(f"queue {call.lane}", context=context, start_time=call.reached_ns,
                                           attributes={"multilane.wait": "queue", "multilane.lane": call.lane,
                                                       "multilane.queue.ahead": call.ahead})
            queue.end(end_time=max(end, call.reached_ns))


class IndexTrace:
    """The span of opening an index, where the runtime notes the embedding lane it held and what it opened."""

    def __init__(self, tracer: Tracer | None, span: Span | None) -> None:
        self._tracer = tracer
        self._span = span
        self._started = time.time_ns()

    def held(self, lane: Lane) -> None:
        """Note the embedding lane; when it came up during the opening, show its load as a child span."""
        loaded = int(lane.loaded_at * 1e9)
        if self._tracer is not None and self._span is not None and loaded >= self._started:
            _load_span(self._tracer, self._span, lane.name, (loaded - int(lane.load_seconds * 1e9), loaded),
                       self._started)

    def opened(self, index: OpenedIndex) -> None:
        """Note whether the index was built or reused, and its size."""
        if self._span is not None:
            self._span.set_attributes({"multilane.index.status": index.status, "multilane.index.chunks": index.chunks,
                                       "multilane.index.documents": index.documents})


@contextmanager
def index_span(tracer: Tracer | None, name: str) -> Iterator[IndexTrace]:
    """A span `open_index {name}` around opening (or building) an index. The embeddings of a build are not
    reported as lane calls of the step that asked for the index, which would show hundreds of them."""
    with observing_calls(_ignore):
        if tracer is None:
            yield IndexTrace(None, None)
            return
        with tracer.start_as_current_span(f"open_index {name}", attributes={"gen_ai.data_source.id": name}) as span:
            yield IndexTrace(tracer, span)


def _ignore(call: LaneCall) -> None:
    return None


def _load_span(tracer: Tracer, parent: Span, lane: str, load: tuple[int, int], waited_from: int) -> None:
    """A child span `load {lane}` for the part of a model load that the parent waited for."""
    start, end = max(load[0], waited_from), load[1]
    span = tracer.start_span(f"load {lane}", context=trace.set_span_in_context(parent), start_time=start,
                             attributes={"multilane.wait": "load", "multilane.lane": lane,
                                         "multilane.load_s": (load[1] - load[0]) / 1e9})
    span.end(end_time=max(end, start))


class TracedStep:
    """A step's open span, the lane calls seen under it, and how it ended; `TraceLayer.start` makes one."""

    def __init__(self, layer: TraceLayer, step: Step, span: Span) -> None:
        self._layer = layer
        self.step = step
        self.span = span
        self.calls: list[LaneCall] = []

    def observing(self) -> AbstractContextManager[None]:
        """While open, the lane calls made in this context are the step's (for the steps that make them)."""
        return observing_calls(self.calls.append) if self.step.kind in _OBSERVED else nullcontext()

    def succeeded(self, result: Any) -> None:
        """Note what the result tells (tokens, hits, a failed tool call) and end the span."""
        try:
            _finish(self.span, self.step, result, self.calls, self._layer.content)
        finally:
            self._end()

    def failed(self, exc: BaseException) -> None:
        """An error sets the span's status; a cancellation (a sibling failed, a timeout, a caller gone) marks it."""
        if isinstance(exc, Exception):
            self.span.record_exception(exc)
            self.span.set_attribute("error.type", type(exc).__qualname__)
            self.span.set_status(Status(StatusCode.ERROR, str(exc)))
        else:
            self.span.set_attribute("multilane.cancelled", True)
        self._end()

    def _end(self) -> None:
        try:
            self._layer.lanes(self.span, self.step, self.calls)
        finally:
            self.span.end()


def _lane_attributes(call: LaneCall) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "multilane.lane": call.lane, "multilane.slots.total": call.slots, "multilane.slots.busy": call.busy,
        "multilane.queue.ahead": call.ahead, "multilane.queued": call.queued,
        "multilane.queue_wait_s": call.queue_seconds, "multilane.model_loaded": call.load is not None,
    }
    if call.load is not None:
        attributes["multilane.load_s"] = (call.load[1] - call.load[0]) / 1e9
    if call.first_token_ns is not None:
        first = (call.first_token_ns - call.arrived_ns) / 1e9
        attributes["multilane.time_to_first_token_s"] = first
        attributes["gen_ai.response.time_to_first_chunk"] = first
    if call.cached_tokens:
        attributes["gen_ai.usage.cache_read.input_tokens"] = call.cached_tokens
    return attributes


def _part(path: str, prefix: str) -> str:
    """The nearest part of a call path with this prefix, without it: `stage:answer/model` -> `answer`."""
    for part in reversed(path.split("/")):
        if part.startswith(prefix):
            return part[len(prefix):]
    return ""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _priority(attrs: Mapping[str, Any]) -> Any:
    """A call's priority, where the step says one (in its attributes or its sampling options)."""
    options = attrs.get("options")
    value = attrs.get("priority", options.get("priority") if isinstance(options, Mapping) else None)
    return value if isinstance(value, int | float | str) and not isinstance(value, bool) else None


def _describe(step: Step, content: bool) -> tuple[str, SpanKind, dict[str, Any]]:
    """A step's span name, kind and the attributes known before it runs."""
    a = step.attrs
    base: dict[str, Any] = {"multilane.step": step.kind}
    if step.run_id:  # a call made outside any run has none
        base["multilane.run_id"] = step.run_id
    if step.path:
        base["multilane.path"] = step.path
    kind = step.kind
    if kind == "run":
        pipeline = str(a.get("pipeline", ""))
        return f"invoke_workflow {pipeline}", SpanKind.INTERNAL, {
            **base, "gen_ai.operation.name": "invoke_workflow", "gen_ai.workflow.name": pipeline,
            "multilane.pipeline": pipeline}
    if kind == "stage":
        stage = _part(step.path, "stage:")
        return f"stage {stage}", SpanKind.INTERNAL, {**base, "multilane.stage": stage,
                                                      "multilane.stage.kind": str(a.get("kind", ""))}
    if kind == "item":
        stage = _part(step.path, "stage:")
        return f"item {stage}", SpanKind.INTERNAL, {**base, "multilane.stage": stage,
                                                     "multilane.item.index": int(_part(step.path, "item:") or 0)}
    if kind == "agent":
        agent = str(a.get("agent", ""))
        attributes = {**base, "gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": PROVIDER,
                      "gen_ai.agent.name": agent, "gen_ai.request.model": str(a.get("model", "")),
                      "multilane.agent.depth": int(a.get("depth", 0))}
        return f"invoke_agent {agent}", SpanKind.INTERNAL, attributes
    if kind == "agent_step":
        agent = str(a.get("agent", ""))
        return f"agent_step {agent}", SpanKind.INTERNAL, {**base, "gen_ai.agent.name": agent,
                                                           "multilane.agent.step": int(a.get("step", 0))}
    if kind == "tool":
        tool = str(a.get("tool", ""))
        attributes = {**base, "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                      "gen_ai.tool.type": "function", "gen_ai.tool.call.id": step.path,
                      "multilane.tool.agent": not step.leaf}
        if content:
            attributes["gen_ai.tool.call.arguments"] = _json(a.get("arguments"))
        return f"execute_tool {tool}", SpanKind.INTERNAL, attributes
    if kind == "model":
        return _model(step, base, content)
    if kind == "embed":
        model = str(a.get("model", ""))
        return f"embeddings {model}", SpanKind.CLIENT, {
            **base, "gen_ai.operation.name": "embeddings", "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": model}
    index = str(a.get("index", ""))  # search
    attributes = {**base, "gen_ai.operation.name": "retrieval", "gen_ai.data_source.id": index,
                  "gen_ai.request.top_k": float(a.get("top_k") or 0), "multilane.retrieval.mode": str(a.get("mode"))}
    if content:
        attributes["gen_ai.retrieval.query.text"] = str(a.get("query", ""))
    return f"retrieval {index}", SpanKind.CLIENT, attributes


def _model(step: Step, base: dict[str, Any], content: bool) -> tuple[str, SpanKind, dict[str, Any]]:
    a = step.attrs
    model, messages = str(a.get("model", "")), a.get("messages")
    given = a.get("options")
    options: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    operation = "text_completion" if isinstance(messages, str) else "chat"
    attributes: dict[str, Any] = {
        **base, "gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": model,
        "gen_ai.output.type": "json" if a.get("schema") is not None else "text"}
    for key, name in (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                      ("seed", "seed")):
        if options.get(key) is not None:
            attributes[f"gen_ai.request.{name}"] = options[key]
    if options.get("stop"):
        attributes["gen_ai.request.stop_sequences"] = [str(s) for s in options["stop"]]
    priority = _priority(a)
    if priority is not None:
        attributes["multilane.priority"] = priority
    if content:
        turns = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        attributes["gen_ai.input.messages"] = _json(
            [{"role": t.get("role"), "parts": [{"type": "text", "content": t.get("content")}]} for t in turns or []])
    return f"{operation} {model}", SpanKind.CLIENT, attributes


def _finish(span: Span, step: Step, result: Any, calls: Sequence[LaneCall], content: bool) -> None:
    """Set what a step's result tells: tokens, finish reason, who answered, hits, tool failures."""
    if not span.is_recording():
        return
    if isinstance(result, Completion):
        answered = "cache" if result.extra.get("cached") else "engine" if calls else "journal"
        span.set_attributes({"gen_ai.usage.input_tokens": result.prompt_tokens,
                             "gen_ai.usage.output_tokens": result.completion_tokens,
                             "gen_ai.response.finish_reasons": [result.finish_reason or "unknown"],
                             "multilane.answered_by": answered})
        if content:
            span.set_attribute("gen_ai.output.messages", _json([{
                "role": "assistant", "parts": [{"type": "text", "content": result.text}],
                "finish_reason": result.finish_reason or "unknown"}]))
    elif step.kind == "embed" and (isinstance(result, list) or hasattr(result, "shape")):
        dimension = len(result) if isinstance(result, list) else int(result.shape[-1])
        span.set_attributes({"gen_ai.embeddings.dimension.count": dimension,
                             "multilane.answered_by": "engine" if calls else "journal"})
    elif step.kind == "search" and isinstance(result, list):
        span.set_attribute("multilane.retrieval.hits", len(result))
        if content:
            span.set_attribute("gen_ai.retrieval.documents", _json(
                [{"id": hit.get("source"), "score": hit.get("score")} for hit in result if isinstance(hit, dict)]))
    elif isinstance(result, ToolCall):
        if content:
            span.set_attribute("gen_ai.tool.call.result", result.result)
        if not result.ok:  # the model gets the failure back and goes on; the span still shows it failed
            span.set_attribute("error.type", "tool_error")
            span.set_status(Status(StatusCode.ERROR, result.error or "tool failed"))
    elif isinstance(result, AgentStep):
        span.set_attributes({"multilane.agent.step.kind": result.kind,
                             "gen_ai.usage.input_tokens": result.prompt_tokens,
                             "gen_ai.usage.output_tokens": result.completion_tokens})
    elif isinstance(result, AgentResult):
        span.set_attributes({"multilane.agent.steps": len(result.steps),
                             "gen_ai.conversation.id": result.run_id,
                             "gen_ai.usage.input_tokens": result.prompt_tokens,
                             "gen_ai.usage.output_tokens": result.completion_tokens})
    elif step.kind == "stage" and isinstance(result, Mapping) and "items" in result:
        span.set_attributes({"multilane.item.count": int(result.get("count", 0)),
                             "multilane.item.errors": len(result.get("errors") or [])})


# ---------------------------------------------------------------------------------------------
# Configuration: runtime.tracing and the OTEL_* variables


def _env_exporter() -> str | None:
    """The exporter the standard variables ask for: otlp, console, none, or None when they say nothing."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    named = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return named
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return "otlp"
    return None


def tracing_off(setting: TracingSpec | None) -> bool:
    """Whether a runtime records no spans at all: `runtime.tracing: off`, or OTEL_SDK_DISABLED=true."""
    if setting is not None:
        return setting.export == "off"
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def capture_content(setting: TracingSpec | None) -> bool:
    """Whether spans record prompts, outputs, tool arguments and results (`content: true`, or the GenAI variable)."""
    if setting is not None and setting.content is not None:
        return setting.content
    return os.environ.get(_CONTENT_VARIABLE, "").strip().lower() == "true"


def export_provider(setting: TracingSpec | None) -> SdkTracerProvider | None:
    """A tracer provider that exports spans as `runtime.tracing` or the OTEL_* variables ask; None when neither does,
    or when the file says nothing and the host application has set a global tracer provider already.

    The file's setting wins over the variables; an OTLP endpoint, headers (`OTEL_EXPORTER_OTLP_HEADERS`), the
    service name (`OTEL_SERVICE_NAME`, default "multilane") and the sampler come from the variables when the file
    does not give them. Raises TracingError when the OpenTelemetry SDK is not installed, or for an exporter it
    does not know.
    """
    if setting is None and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return None  # the host application set up tracing itself (and the variables with it): its provider wins
    export = setting.export if setting is not None else _env_exporter()
    if export in (None, "none", "off"):
        return None
    exporters = [name.strip() for name in export.split(",") if name.strip() and name.strip() != "none"]
    unknown = [name for name in exporters if name not in ("otlp", "console")]
    if unknown:
        where = "runtime.tracing" if setting is not None else "OTEL_TRACES_EXPORTER"
        raise TracingError(f"{where}: unknown trace exporter '{unknown[0]}'; use otlp, console or off")
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError as exc:
        raise TracingError(f"exporting traces ({', '.join(exporters)}) needs the OpenTelemetry SDK; {_SDK_HINT}") \
            from exc
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "multilane"}
    if setting is not None and setting.service_name:
        attributes = {SERVICE_NAME: setting.service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in exporters:
        if name == "console":  # stderr: a command's stdout stays its output
            import sys

            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        else:
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(setting)))
    return provider


def _otlp_exporter(setting: TracingSpec | None) -> Any:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise TracingError(f"exporting traces over OTLP needs the OTLP exporter; {_SDK_HINT}") from exc
    endpoint = setting.endpoint if setting is not None else None
    if endpoint is None:
        return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, its headers and timeout
    base = endpoint.rstrip("/")
    return OTLPSpanExporter(endpoint=base if base.endswith("/v1/traces") else base + "/v1/traces")
