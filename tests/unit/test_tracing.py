"""Traces of runs: the span tree and attributes a trace viewer shows, recorded with the SDK's in-memory exporter."""

from __future__ import annotations

import functools
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from multilane import Agent, AgentContext, Runtime, SamplingOptions, tool
from multilane.errors import SpecError
from multilane.server import create_app
from multilane.steps import Scope
from multilane.testing import FakeGenerateEngine
from multilane.tracing import TraceLayer, TracingError, export_provider, tracer_of

pytestmark = pytest.mark.anyio

RAG = """
models:
  embedder: {kind: embedding, source: ./embedder}
  assistant: {kind: generate, source: ./assistant, parallel: 1}
indexes:
  docs: {embedder: embedder, documents: "docs/*.md", chunk_tokens: 32, chunk_overlap: 4}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: docs, query: "{{ inputs.question }}", top_k: 2}
      answer:
        kind: reason
        model: assistant
        prompt: "{{ stages.passages.text }} Question: {{ inputs.question }}"
        max_tokens: 32
    output: "{{ stages.answer.text }}"
"""


class Spans:
    """The finished spans of a tracer provider, looked up by name and by parent."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def all(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.all if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name!r}: {[s.name for s in self.all]}"
        return found[0]

    def children(self, parent: ReadableSpan) -> list[str]:
        """Names of the spans directly under `parent`, in the order they started."""
        assert parent.context is not None
        under = [s for s in self.all if s.parent is not None and s.parent.span_id == parent.context.span_id]
        return [s.name for s in sorted(under, key=lambda s: s.start_time or 0)]

    def tree(self, root: ReadableSpan) -> dict[str, Any]:
        """The names under `root`, nested: {"stage answer": {"chat assistant": {...}}}; siblings keyed by name."""
        assert root.context is not None
        under = [s for s in self.all if s.parent is not None and s.parent.span_id == root.context.span_id]
        return {s.name: self.tree(s) for s in sorted(under, key=lambda s: s.start_time or 0)}


@pytest.fixture
def spans() -> Iterator[Spans]:
    recorded = Spans()
    yield recorded
    recorded.provider.shutdown()


def rag_runtime(fake_runtime: Callable[..., Any], docs: Path, spans: Spans, text: str = RAG,
                **engines: Any) -> tuple[Runtime, Any]:
    rt, factory = fake_runtime(text, **engines)
    return Runtime(rt.spec, engines=factory, index_root=docs.parent / "indexes", tracer_provider=spans.provider), \
        factory


async def test_a_rag_run_is_a_tree_of_workflow_stage_retrieval_and_chat_spans(fake_runtime, docs: Path,
                                                                               spans: Spans) -> None:
    rt, _ = rag_runtime(fake_runtime, docs, spans)
    async with rt:
        result = await rt.run("ask", question="Why do otters hold hands?")

    run = spans.one("invoke_workflow ask")
    assert run.parent is None
    assert spans.tree(run) == {
        "stage passages": {"retrieval docs": {"open_index docs": {"load embedder": {}},
                                              "embeddings embedder": {}}},
        "stage answer": {"chat assistant": {"load assistant": {}}},
    }
    assert len({span.context.trace_id for span in spans.all if span.context}) == 1  # one trace for the run
    assert run.attributes is not None
    assert run.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert run.attributes["gen_ai.workflow.name"] == "ask"
    assert run.attributes["multilane.run_id"] == result.run_id

    chat = spans.one("chat assistant")
    a = chat.attributes or {}
    assert chat.kind is SpanKind.CLIENT
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "multilane"
    assert a["gen_ai.request.model"] == "assistant"
    assert a["gen_ai.request.max_tokens"] == 32
    assert a["gen_ai.usage.input_tokens"] == result.stages["answer"]["prompt_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] == result.stages["answer"]["completion_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["multilane.lane"] == "assistant"
    assert a["multilane.path"] == "stage:answer/model"
    assert a["multilane.answered_by"] == "engine"
    assert a["multilane.slots.total"] == 1 and a["multilane.slots.busy"] == 0 and a["multilane.queued"] is False
    assert a["multilane.time_to_first_token_s"] == a["gen_ai.response.time_to_first_chunk"] >= 0
    assert "gen_ai.input.messages" not in a  # prompts are recorded only when asked

    retrieval = spans.one("retrieval docs")
    r = retrieval.attributes or {}
    assert r["gen_ai.operation.name"] == "retrieval"
    assert r["gen_ai.data_source.id"] == "docs"
    assert r["gen_ai.request.top_k"] == 2
    assert r["multilane.retrieval.hits"] == len(result.stages["passages"]["passages"])
    index = spans.one("open_index docs").attributes or {}
    assert index["multilane.index.status"] == "built" and index["multilane.index.chunks"] >= 3
    query = spans.one("embeddings embedder").attributes or {}
    assert query["gen_ai.request.model"] == "embedder" and query["multilane.lane"] == "embedder"
    assert query["multilane.model_loaded"] is False  # the index build had loaded it already

    stage = spans.one("stage answer")
    assert (stage.attributes or {})["multilane.stage.kind"] == "reason"
    for span in spans.all:  # every span lies within its parent
        parent = next((p for p in spans.all if span.parent and p.context and p.context.span_id == span.parent.span_id),
                      None)
        if parent is not None:
            assert parent.start_time is not None and span.start_time is not None
            assert parent.start_time <= span.start_time and span.end_time <= parent.end_time, span.name  # type: ignore[operator]


async def test_a_call_that_loaded_its_model_says_so_and_shows_the_load_the_next_call_does_not(
        fake_runtime, docs: Path, spans: Spans) -> None:
    rt, _ = rag_runtime(fake_runtime, docs, spans)
    async with rt:
        await rt.run("ask", question="first")
        lane = rt.pool.loaded("assistant")
        assert lane is not None
        await rt.run("ask", question="second")

    first, second = sorted(spans.named("chat assistant"), key=lambda s: s.start_time or 0)
    a, b = first.attributes or {}, second.attributes or {}
    assert a["multilane.model_loaded"] is True
    assert a["multilane.load_s"] == pytest.approx(lane.load_seconds, abs=1e-6)
    assert spans.children(first) == ["load assistant"]
    load = spans.one("load assistant")
    assert (load.attributes or {})["multilane.wait"] == "load"
    assert first.start_time <= load.start_time <= load.end_time <= first.end_time  # type: ignore[operator]
    assert b["multilane.model_loaded"] is False and "multilane.load_s" not in b
    assert spans.children(second) == []


async def test_a_call_that_queued_for_a_slot_shows_its_wait_and_the_slots_it_found_busy(
        fake_runtime, held: Callable[..., Any], spans: Spans, docs: Path) -> None:
    engine = held("an answer")
    rt, _ = rag_runtime(fake_runtime, docs, spans, assistant=engine)
    async with rt:
        await rt.load("assistant")
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(rt.run, "ask", question="one"))
            await engine.holding.wait()  # the first call has the lane's only slot
            tg.start_soon(functools.partial(rt.run, "ask", question="two"))
            lane = rt.pool.loaded("assistant")
            assert lane is not None
            while lane.queued == 0:
                await anyio.wait_all_tasks_blocked()
                await anyio.lowlevel.checkpoint()
            released = time.time_ns()
            engine.release.set()

    first, second = sorted(spans.named("chat assistant"), key=lambda s: s.start_time or 0)
    a, b = first.attributes or {}, second.attributes or {}
    assert a["multilane.queued"] is False and a["multilane.slots.busy"] == 0
    assert b["multilane.queued"] is True
    assert b["multilane.slots.busy"] == 1 and b["multilane.slots.total"] == 1 and b["multilane.queue.ahead"] == 0
    assert b["multilane.queue_wait_s"] > 0
    assert spans.children(second) == ["queue assistant"]
    queue = spans.one("queue assistant")
    assert (queue.attributes or {})["multilane.wait"] == "queue"
    # it waited from before the first call let go of the slot until after: causal, not a wall-clock bound
    assert queue.start_time <= released <= queue.end_time  # type: ignore[operator]
    assert b["multilane.time_to_first_token_s"] >= b["multilane.queue_wait_s"]


AGENT_PIPELINE = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      work: {kind: agent, agent: clerk, task: "{{ inputs.question }}"}
    output: "{{ stages.work.answer }}"
"""

CLERK = '''
from multilane import Agent, tool

@tool
def lookup(word: str) -> str:
    """Look a word up."""
    if word == "nothing":
        raise KeyError(word)
    return f"{word}: a small sea mammal"

clerk = Agent("clerk", "assistant", "You look words up.", [lookup])
'''


def agent_reply(*replies: dict[str, Any]) -> Callable[[str, SamplingOptions], str]:
    def reply(prompt: str, options: SamplingOptions) -> str:
        return json.dumps(replies[min(prompt.count("<assistant>"), len(replies)) - 1])

    return reply


async def test_an_agent_run_shows_its_steps_their_chat_calls_and_the_tool_it_called(
        fake_runtime, tmp_path: Path, spans: Spans) -> None:
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "clerk.py").write_text(CLERK)
    engine = FakeGenerateEngine(agent_reply({"tool": "lookup", "arguments": {"word": "otter"}},
                                            {"answer": "A small sea mammal."}))
    rt, factory = fake_runtime(AGENT_PIPELINE, assistant=engine)
    rt = Runtime(rt.spec, engines=factory, tracer_provider=spans.provider)
    async with rt:
        result = await rt.run("ask", question="What is an otter?")

    assert result.output == "A small sea mammal."
    run = spans.one("invoke_workflow ask")
    assert spans.children(run) == ["stage work"]
    assert spans.children(spans.one("stage work")) == ["invoke_agent clerk"]
    agent = spans.one("invoke_agent clerk")
    assert spans.children(agent) == ["agent_step clerk", "agent_step clerk"]
    steps = sorted(spans.named("agent_step clerk"), key=lambda s: s.start_time or 0)
    assert [spans.children(step) for step in steps] == [["chat assistant", "execute_tool lookup"], ["chat assistant"]]
    first_chat = sorted(spans.named("chat assistant"), key=lambda s: s.start_time or 0)[0]
    assert spans.children(first_chat) == ["load assistant"]  # the agent's first call loaded the model
    assert [(s.attributes or {})["multilane.agent.step"] for s in steps] == [1, 2]
    assert [(s.attributes or {})["multilane.agent.step.kind"] for s in steps] == ["calls", "answer"]

    g = agent.attributes or {}
    assert g["gen_ai.operation.name"] == "invoke_agent"
    assert g["gen_ai.agent.name"] == "clerk"
    assert g["gen_ai.request.model"] == "assistant"
    assert g["multilane.agent.steps"] == 2
    assert g["gen_ai.usage.input_tokens"] == result.stages["work"]["prompt_tokens"]

    call = spans.one("execute_tool lookup")
    t = call.attributes or {}
    assert t["gen_ai.operation.name"] == "execute_tool"
    assert t["gen_ai.tool.name"] == "lookup"
    assert t["gen_ai.tool.type"] == "function"
    assert t["gen_ai.tool.call.id"] == "stage:work/agent/step:1/tool:0"
    assert call.status.status_code is StatusCode.UNSET
    assert all((s.attributes or {})["gen_ai.output.type"] == "json" for s in spans.named("chat assistant"))


async def test_a_failed_tool_call_marks_its_span_but_the_agent_goes_on(fake_runtime, tmp_path: Path,
                                                                       spans: Spans) -> None:
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "clerk.py").write_text(CLERK)
    engine = FakeGenerateEngine(agent_reply({"tool": "lookup", "arguments": {"word": "nothing"}},
                                            {"answer": "Not found."}))
    rt, factory = fake_runtime(AGENT_PIPELINE, assistant=engine)
    async with Runtime(rt.spec, engines=factory, tracer_provider=spans.provider) as rt:
        await rt.run("ask", question="What is nothing?")

    call = spans.one("execute_tool lookup")
    assert call.status.status_code is StatusCode.ERROR
    assert call.status.description == "KeyError: 'nothing'"
    assert (call.attributes or {})["error.type"] == "tool_error"
    assert spans.one("invoke_workflow ask").status.status_code is StatusCode.UNSET


async def test_a_failing_stage_sets_error_status_up_the_tree_and_marks_the_cancelled_sibling(
        fake_runtime, spans: Spans, held: Callable[..., Any], tmp_path: Path) -> None:
    text = """
    models:
      assistant: {kind: generate, source: ./assistant}
      slow: {kind: generate, source: ./slow}
    pipelines:
      ask:
        stages:
          bad: {kind: tool_call, model: assistant, prompt: "x", json_schema: {type: object}}
          long: {kind: reason, model: slow, prompt: "y"}
    """
    slow = held("never finishes")
    # the bad stage answers once the long one is under way, so that its failure cancels a running stage
    bad_engine = FakeGenerateEngine(lambda prompt, options: "not json", pace=slow.holding.wait)
    rt, factory = fake_runtime(text, assistant=bad_engine, slow=slow)
    async with Runtime(rt.spec, engines=factory, tracer_provider=spans.provider) as rt:
        await rt.load("slow")
        with pytest.raises(Exception, match="not valid JSON"):
            await rt.run("ask")

    bad = spans.one("stage bad")
    assert bad.status.status_code is StatusCode.ERROR
    assert (bad.attributes or {})["error.type"] == "OutputValidationError"
    assert any(event.name == "exception" for event in bad.events)
    run = spans.one("invoke_workflow ask")
    assert run.status.status_code is StatusCode.ERROR and "stage 'bad'" in (run.status.description or "")
    long = spans.one("stage long")
    assert (long.attributes or {}).get("multilane.cancelled") is True
    assert long.status.status_code is StatusCode.UNSET


async def test_a_cache_hit_and_a_replayed_call_say_who_answered_them(fake_runtime, spans: Spans) -> None:
    text = """
    models:
      assistant: {kind: generate, source: ./assistant, cache: true}
    pipelines:
      ask:
        stages:
          answer: {kind: reason, model: assistant, prompt: "hello"}
    """
    rt, factory = fake_runtime(text)
    async with Runtime(rt.spec, engines=factory, tracer_provider=spans.provider) as rt:
        first = await rt.run("ask")
        await rt.run("ask")
        await rt.replay(first.run_id)

    answered = [(s.attributes or {})["multilane.answered_by"]
                for s in sorted(spans.named("chat assistant"), key=lambda s: s.start_time or 0)]
    assert answered == ["engine", "cache", "journal"]
    cached = sorted(spans.named("chat assistant"), key=lambda s: s.start_time or 0)[1]
    assert "multilane.lane" not in (cached.attributes or {})  # no lane was asked


async def test_a_priority_in_the_call_options_is_on_its_span_and_absence_is_fine(spans: Spans) -> None:
    from multilane.engines.base import Completion

    scope = Scope("r1", layers=[TraceLayer(tracer_of(spans.provider))])

    async def answer() -> Completion:
        return Completion("ok", 3, 1, "stop")

    await scope.child("model").run("model", answer, attrs={"model": "m", "messages": [], "options": {"priority": 5}})
    await scope.child("model").run("model", answer, attrs={"model": "m", "messages": [], "options": {}})

    with_priority, without = sorted(spans.named("chat m"), key=lambda s: s.start_time or 0)
    assert (with_priority.attributes or {})["multilane.priority"] == 5
    assert "multilane.priority" not in (without.attributes or {})


async def test_prompts_and_outputs_are_recorded_only_with_content_on(fake_runtime, docs: Path, spans: Spans) -> None:
    text = RAG.replace("pipelines:", "runtime: {tracing: {export: off, content: true}}\npipelines:")
    rt, _ = rag_runtime(fake_runtime, docs, spans, text=text)  # a given provider wins over `export: off`
    async with rt:
        await rt.run("ask", question="Why do otters hold hands?")

    a = spans.one("chat assistant").attributes or {}
    messages = json.loads(str(a["gen_ai.input.messages"]))
    assert messages[0]["role"] == "user" and "Why do otters hold hands?" in messages[0]["parts"][0]["content"]
    assert json.loads(str(a["gen_ai.output.messages"]))[0]["parts"][0]["content"] == "fake reply"
    assert (spans.one("retrieval docs").attributes or {})["gen_ai.retrieval.query.text"] == "Why do otters hold hands?"


async def test_tracing_off_in_the_file_records_nothing_even_with_a_global_provider(
        fake_runtime, monkeypatch: pytest.MonkeyPatch, spans: Spans) -> None:
    from opentelemetry import trace

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: spans.provider)
    on = """
    models:
      assistant: {kind: generate, source: ./assistant}
    pipelines:
      ask:
        stages:
          answer: {kind: reason, model: assistant, prompt: "hello"}
    """
    rt, _ = fake_runtime(on)
    async with rt:  # nothing configured: the host's (global) provider gets the spans
        await rt.run("ask")
    assert len(spans.named("invoke_workflow ask")) == 1

    rt, _ = fake_runtime(on + "runtime: {tracing: off}\n")
    async with rt:
        await rt.run("ask")
    assert len(spans.named("invoke_workflow ask")) == 1


def test_runtime_tracing_is_a_word_or_a_mapping_and_a_wrong_word_names_the_field(make_spec) -> None:
    base = "models:\n  m: {kind: generate, source: ./m}\nruntime:\n  tracing: %s\n"
    assert make_spec(base % "otlp").runtime.tracing.export == "otlp"  # type: ignore[union-attr]
    assert make_spec(base % "off").runtime.tracing.export == "off"  # type: ignore[union-attr]
    spec = make_spec(base % "{export: console, content: true, service_name: shop}")
    assert spec.runtime.tracing is not None
    assert (spec.runtime.tracing.export, spec.runtime.tracing.content, spec.runtime.tracing.service_name) == \
        ("console", True, "shop")
    with pytest.raises(SpecError, match=r"runtime\.tracing"):
        make_spec(base % "jaeger")


def test_the_otel_variables_choose_the_exporter_when_the_file_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace import TracerProvider as Sdk

    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert export_provider(None) is None  # nothing asked: the global provider is used
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    provider = export_provider(None)
    assert isinstance(provider, Sdk)
    assert provider.resource.attributes["service.name"] == "multilane"
    provider.shutdown()
    from opentelemetry import trace

    host = Sdk()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: host)
    assert export_provider(None) is None  # the host application configured tracing: its provider is used
    monkeypatch.undo()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(TracingError, match="OTEL_TRACES_EXPORTER: unknown trace exporter 'zipkin'"):
        export_provider(None)


def test_console_export_writes_the_spans_to_stderr(fake_runtime, capfd: pytest.CaptureFixture[str]) -> None:
    text = """
    models:
      assistant: {kind: generate, source: ./assistant}
    runtime: {tracing: console}
    pipelines:
      ask:
        stages:
          answer: {kind: reason, model: assistant, prompt: "hello"}
    """

    async def go() -> None:
        rt, _ = fake_runtime(text)
        async with rt:
            await rt.run("ask")

    anyio.run(go)
    out, err = capfd.readouterr()
    assert out == ""
    assert '"name": "chat assistant"' in err and '"name": "invoke_workflow ask"' in err


async def test_the_server_continues_the_callers_trace_and_the_run_hangs_under_its_request_span(
        fake_runtime, spans: Spans, server_spec: str) -> None:
    rt, factory = fake_runtime(server_spec)
    runtime = Runtime(rt.spec, engines=factory, tracer_provider=spans.provider)
    app = create_app(runtime)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            reply = await client.post("/v1/pipelines/echo/runs", json={"inputs": {"question": "hi"}},
                                      headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
            await client.get("/healthz")
    assert reply.status_code == 200, reply.text

    request = spans.one("POST /v1/pipelines/{name}/runs")
    assert request.kind is SpanKind.SERVER
    assert request.context is not None and request.parent is not None
    assert f"{request.context.trace_id:032x}" == trace_id
    assert f"{request.parent.span_id:016x}" == parent_id
    a = request.attributes or {}
    assert a["http.request.method"] == "POST" and a["http.route"] == "/v1/pipelines/{name}/runs"
    assert a["http.response.status_code"] == 200
    run = spans.one("invoke_workflow echo")
    assert run.parent is not None and run.parent.span_id == request.context.span_id
    assert not [s for s in spans.all if "healthz" in s.name]  # health checks and the lanes page are not traced


async def test_a_plain_tool_that_calls_a_model_shows_that_call_under_it(fake_runtime, spans: Spans) -> None:
    @tool
    async def summarize(ctx: AgentContext, text: str) -> str:
        """Summarize text with the assistant."""
        done = await ctx.runtime.generate("assistant", f"Summarize: {text}")
        return done.text

    engine = FakeGenerateEngine(agent_reply({"tool": "summarize", "arguments": {"text": "otters"}},
                                            {"answer": "done"}))
    rt, factory = fake_runtime("models:\n  assistant: {kind: generate, source: ./assistant}\n", assistant=engine)
    async with Runtime(rt.spec, engines=factory, tracer_provider=spans.provider) as rt:
        await rt.run_agent(Agent("writer", "assistant", "", [summarize]), "summarize otters")

    call = spans.one("execute_tool summarize")
    assert spans.children(call) == ["chat assistant"]
    inner = next(s for s in spans.named("chat assistant") if s.parent and call.context
                 and s.parent.span_id == call.context.span_id)
    assert (inner.attributes or {})["multilane.lane"] == "assistant"
    assert (inner.attributes or {})["multilane.model_loaded"] is False


def test_a_missing_sdk_is_a_clear_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch, make_spec) -> None:
    import builtins

    real = builtins.__import__

    def no_sdk(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry.sdk"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sdk)
    spec = make_spec("models:\n  m: {kind: generate, source: ./m}\nruntime: {tracing: otlp}\n")
    with pytest.raises(TracingError, match=r"pip install 'multilane\[otel\]'"):
        export_provider(spec.runtime.tracing)


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver on loopback that keeps the export requests it gets."""

    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


async def test_runtime_tracing_otlp_exports_the_runs_spans_to_a_collector_and_flushes_them_on_close(
        fake_runtime, collector: tuple[str, list[tuple[str, bytes]]]) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    endpoint, received = collector
    rt, _ = fake_runtime(f"""
    models:
      assistant: {{kind: generate, source: ./assistant}}
    runtime:
      tracing: {{export: otlp, endpoint: "{endpoint}", service_name: shop}}
    pipelines:
      ask:
        stages:
          answer: {{kind: reason, model: assistant, prompt: "hello"}}
    """)
    async with rt:
        result = await rt.run("ask")
        assert rt.tracer is not None

    assert received, "nothing was exported"
    names, services, run_ids = [], set(), set()
    for path, body in received:
        assert path == "/v1/traces"
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            services |= {a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"}
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name == "multilane"
                for span in scope_spans.spans:
                    names.append(span.name)
                    run_ids |= {a.value.string_value for a in span.attributes if a.key == "multilane.run_id"}
    assert sorted(names) == ["chat assistant", "invoke_workflow ask", "load assistant", "stage answer"]
    assert services == {"shop"}
    assert run_ids == {result.run_id}


async def test_api_calls_outside_a_run_get_their_own_chat_and_embeddings_spans_under_the_request(
        fake_runtime, spans: Spans, server_spec: str) -> None:
    rt, factory = fake_runtime(server_spec)
    runtime = Runtime(rt.spec, engines=factory, tracer_provider=spans.provider)
    app = create_app(runtime)
    body = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            plain = await client.post("/v1/chat/completions", json=body)
            streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
            embedded = await client.post("/v1/embeddings", json={"model": "embedder", "input": ["a", "b"]})
    assert plain.status_code == streamed.status_code == embedded.status_code == 200

    requests = sorted(spans.named("POST /v1/chat/completions"), key=lambda s: s.start_time or 0)
    chats = sorted(spans.named("chat assistant"), key=lambda s: s.start_time or 0)
    assert len(requests) == len(chats) == 2
    for request, chat in zip(requests, chats, strict=True):
        assert spans.children(request) == ["chat assistant"]
        assert chat.kind is SpanKind.CLIENT
    first, second = (dict(chat.attributes or {}) for chat in chats)
    usage = plain.json()["usage"]
    assert first["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert first["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert first["multilane.model_loaded"] is True and spans.children(chats[0]) == ["load assistant"]
    assert "multilane.run_id" not in first  # no run: a call of its own
    assert second["gen_ai.usage.output_tokens"] == first["gen_ai.usage.output_tokens"]  # the stream, summed
    assert second["gen_ai.response.finish_reasons"] == first["gen_ai.response.finish_reasons"]
    assert second["multilane.model_loaded"] is False and second["multilane.lane"] == "assistant"
    embeddings = spans.one("embeddings embedder")
    assert spans.children(spans.one("POST /v1/embeddings")) == ["embeddings embedder"]
    assert (embeddings.attributes or {})["gen_ai.embeddings.dimension.count"] > 0


async def test_each_for_each_item_is_a_span_under_its_stage_with_its_own_chat_call(fake_runtime, spans: Spans) -> None:
    text = """
    models:
      assistant: {kind: generate, source: ./assistant}
    pipelines:
      fan:
        inputs: {words: list}
        stages:
          each: {kind: reason, model: assistant, for_each: "{{ inputs.words }}", prompt: "Define {{ item }}"}
    """
    rt, factory = fake_runtime(text)
    async with Runtime(rt.spec, engines=factory, tracer_provider=spans.provider) as rt:
        await rt.run("fan", words=["alpha", "beta", "gamma"])

    stage = spans.one("stage each")
    assert spans.children(stage) == ["item each"] * 3
    assert (stage.attributes or {})["multilane.item.count"] == 3
    assert (stage.attributes or {})["multilane.item.errors"] == 0
    items = spans.named("item each")
    assert sorted((s.attributes or {})["multilane.item.index"] for s in items) == [0, 1, 2]
    for item in items:
        assert spans.children(item) == ["chat assistant"]
        index = (item.attributes or {})["multilane.item.index"]
        assert (item.attributes or {})["multilane.path"] == f"stage:each/item:{index}"


async def test_a_stream_left_early_is_marked_cancelled_and_keeps_its_lane_figures(fake_runtime, spans: Spans) -> None:
    rt, factory = fake_runtime(RAG, assistant=FakeGenerateEngine(reply="one two three four five six"))
    async with Runtime(rt.spec, engines=factory, tracer_provider=spans.provider) as runtime:
        async with aclosing(runtime.generate_stream("assistant", "hi", SamplingOptions(max_tokens=6))) as chunks:
            async for _ in chunks:
                break  # the caller leaves after the first chunk: the call is aborted
    attrs = dict(spans.one("chat assistant").attributes or {})
    assert attrs["multilane.cancelled"] is True
    # the lane's figures reached the span before it ended
    assert attrs["multilane.lane"] == "assistant" and attrs["multilane.slots.busy"] == 0
    assert attrs["multilane.model_loaded"] is True
