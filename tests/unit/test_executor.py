"""The executor through the Runtime: data flow, concurrency, validation, failures, cancellation and logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
import structlog
import structlog.testing

from multilane import (
    ContextLengthError,
    InputError,
    MultilaneError,
    OutputValidationError,
    StageError,
    TemplateError,
    UnknownNameError,
)
from multilane.testing import FakeEmbeddingEngine, FakeGenerateEngine

pytestmark = pytest.mark.anyio

ASK = """
models:
  embedder: {kind: embedding, source: ./embedder}
  assistant: {kind: generate, source: ./assistant}
indexes:
  docs: {embedder: embedder, documents: "docs/*.md", chunk_tokens: 32, chunk_overlap: 4}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: docs, query: "{{ inputs.question }}", top_k: 1}
      answer:
        kind: reason
        model: assistant
        prompt: "Notes:\\n{{ stages.passages.text }}\\nQuestion: {{ inputs.question }}"
    output: "{{ stages.answer.text }} | {{ stages.passages.passages[0].source }}"
"""

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

TOOL = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  extract:
    inputs: {text: str}
    stages:
      fields:
        kind: tool_call
        model: assistant
        prompt: "Extract the city from: {{ inputs.text }}"
        schema: {type: object, properties: {city: {type: string}}, required: [city]}
    output: "{{ stages.fields.json.city }}"
"""

SLOW_WORDS = " ".join(f"w{i}" for i in range(200))


def _event(result: Any, stage: str) -> Any:
    return next(e for e in result.events if e.stage == stage)


async def test_retrieve_then_reason_renders_output_from_answer_and_passages(fake_runtime, docs: Path) -> None:
    assistant = FakeGenerateEngine("Otters hold hands.")
    rt, _ = fake_runtime(ASK, assistant=assistant)
    async with rt:
        result = await rt.run("ask", question="why do sea otters hold hands?")

    assert result.output == "Otters hold hands. | docs/otters.md"
    assert "Sea otters hold hands while sleeping" in result.stages["passages"]["text"]
    assert "Sea otters hold hands while sleeping" in assistant.calls[0].prompt  # the passage reached the prompt
    assert "why do sea otters hold hands?" in assistant.calls[0].prompt


@pytest.mark.virtual_clock  # token delays take virtual time: the order is exact
async def test_independent_stages_overlap_and_dependent_stage_waits(fake_runtime) -> None:
    rt, _ = fake_runtime(
        """
        models:
          assistant: {kind: generate, source: ./assistant}
        pipelines:
          fan:
            stages:
              a: {kind: reason, model: assistant, prompt: "first"}
              b: {kind: reason, model: assistant, prompt: "second"}
              c: {kind: reason, model: assistant, prompt: "summarise {{ stages.a.text }}"}
        """,
        assistant=FakeGenerateEngine("one two three four five", token_delay=0.02),
    )
    async with rt:
        result = await rt.run("fan")

    a, b, c = (_event(result, name) for name in "abc")
    assert a.started < b.finished and b.started < a.finished  # a and b ran at the same time
    assert c.started >= a.finished  # c reads a, so it waited for it
    assert all(e.ok for e in result.events)


async def test_tool_call_returns_json_valid_against_its_schema(fake_runtime) -> None:
    rt, _ = fake_runtime(TOOL)
    async with rt:
        result = await rt.run("extract", text="I live in Lyon")

    value = result.stages["fields"]["json"]
    jsonschema.validate(value, SCHEMA)
    assert result.output == value["city"]


async def test_tool_call_output_that_is_not_json_fails_the_stage(fake_runtime) -> None:
    rt, _ = fake_runtime(TOOL, assistant=FakeGenerateEngine(lambda prompt, options: "the city is Lyon"))
    async with rt:
        with pytest.raises(StageError) as caught:
            await rt.run("extract", text="I live in Lyon")

    assert isinstance(caught.value.cause, OutputValidationError)
    assert "pipeline 'extract'" in str(caught.value)
    assert "stage 'fields'" in str(caught.value)
    assert "not valid JSON" in str(caught.value)


async def test_tool_call_json_that_violates_the_schema_names_the_path(fake_runtime) -> None:
    rt, _ = fake_runtime(TOOL, assistant=FakeGenerateEngine(lambda prompt, options: '{"city": 3}'))
    async with rt:
        with pytest.raises(StageError) as caught:
            await rt.run("extract", text="I live in Lyon")

    assert isinstance(caught.value.cause, OutputValidationError)
    assert "at city" in str(caught.value.cause)


@pytest.mark.virtual_clock  # token delays take virtual time: the order is exact
async def test_failing_stage_cancels_a_slow_sibling_and_aborts_its_request(fake_runtime) -> None:
    slow = FakeGenerateEngine(SLOW_WORDS, token_delay=0.05)
    rt, _ = fake_runtime(
        """
        models:
          fast: {kind: generate, source: ./fast}
          slow: {kind: generate, source: ./slow}
        pipelines:
          race:
            stages:
              bad: {kind: tool_call, model: fast, prompt: "go", schema: {type: object}}
              long: {kind: reason, model: slow, prompt: "take your time", max_tokens: 500}
        """,
        fast=FakeGenerateEngine(lambda prompt, options: "not json"),
        slow=slow,
    )
    async with rt:
        with anyio.fail_after(5):  # the slow stage alone would take 10 seconds
            with pytest.raises(StageError) as caught:
                await rt.run("race")

    assert caught.value.stage == "bad"
    assert len(slow.calls) == 1 and slow.calls[0].aborted is True
    assert slow.unfinished_requests() == 0


@pytest.mark.virtual_clock  # token delays take virtual time: the order is exact
async def test_stage_timeout_fails_the_run_saying_timed_out(fake_runtime) -> None:
    rt, _ = fake_runtime(
        """
        models:
          assistant: {kind: generate, source: ./assistant}
        pipelines:
          slow:
            stages:
              answer: {kind: reason, model: assistant, prompt: "hi", timeout: 50ms, max_tokens: 500}
        """,
        assistant=FakeGenerateEngine(SLOW_WORDS, token_delay=0.05),
    )
    async with rt:
        with pytest.raises(StageError, match="timed out") as caught:
            await rt.run("slow")

    assert caught.value.stage == "answer"
    assert rt.spec.models  # the runtime stays usable after a failed run


async def test_cancelling_a_run_aborts_the_engine_request(fake_runtime, held) -> None:
    assistant = held(SLOW_WORDS, before_hold=2)
    rt, _ = fake_runtime(
        """
        models:
          assistant: {kind: generate, source: ./assistant}
        pipelines:
          chat:
            stages:
              answer: {kind: reason, model: assistant, prompt: "hi", max_tokens: 500}
        """,
        assistant=assistant,
    )
    async with rt:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(rt.run, "chat")
                await assistant.holding.wait()  # it has streamed two tokens and is mid-request
                scope.cancel()

        assert scope.cancelled_caught
        assert assistant.calls[0].aborted is True
        assert assistant.unfinished_requests() == 0


async def test_missing_unknown_and_mistyped_inputs_are_input_errors_naming_the_input(fake_runtime) -> None:
    rt, _ = fake_runtime(
        """
        models:
          assistant: {kind: generate, source: ./assistant}
        pipelines:
          count:
            inputs: {topic: str, n: int}
            stages:
              answer: {kind: reason, model: assistant, prompt: "{{ inputs.n }} {{ inputs.topic }}"}
        """
    )
    async with rt:
        with pytest.raises(InputError, match="'n'"):
            await rt.run("count", topic="otters")
        with pytest.raises(InputError, match="'colour'"):
            await rt.run("count", topic="otters", n=3, colour="red")
        with pytest.raises(InputError, match=r"'n'.*int"):
            await rt.run("count", topic="otters", n="three")


async def test_unknown_pipeline_lists_the_declared_ones(fake_runtime) -> None:
    rt, _ = fake_runtime(TOOL)
    async with rt:
        with pytest.raises(UnknownNameError, match=r"unknown pipeline 'nope'.*extract"):
            await rt.run("nope")


async def test_output_template_reading_a_missing_field_is_a_template_error(fake_runtime) -> None:
    rt, _ = fake_runtime(
        """
        models:
          assistant: {kind: generate, source: ./assistant}
        pipelines:
          chat:
            stages:
              answer: {kind: reason, model: assistant, prompt: "hi"}
            output: "{{ stages.answer.nope }}"
        """
    )
    async with rt:
        with pytest.raises(TemplateError, match="nope"):
            await rt.run("chat")


async def test_every_log_event_of_a_run_carries_its_run_id(fake_runtime, docs: Path) -> None:
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        rt, _ = fake_runtime(ASK)
        async with rt:
            result = await rt.run("ask", question="what is lava?")
            events = list(capture.entries)  # closing the runtime afterwards logs outside any run
    finally:
        structlog.reset_defaults()

    assert {"lane loaded", "index ready", "run started", "stage finished", "run finished"} <= {
        e["event"] for e in events}
    assert {e.get("run_id") for e in events} == {result.run_id}


async def test_embed_stage_returns_a_vector_of_the_model_dimension(fake_runtime) -> None:
    rt, _ = fake_runtime(
        """
        models:
          embedder: {kind: embedding, source: ./embedder}
        pipelines:
          vec:
            inputs: {text: str}
            stages:
              e: {kind: embed, model: embedder, text: "{{ inputs.text }}"}
        """,
        embedder=FakeEmbeddingEngine(dimension=16),
    )
    async with rt:
        result = await rt.run("vec", text="sea otters")

    assert result.stages["e"]["dimension"] == 16
    assert len(result.stages["e"]["vector"]) == 16
    assert json.dumps(result.to_dict())  # a run's result is JSON-ready


async def test_runtime_used_without_async_with_refuses_to_run(fake_runtime) -> None:
    rt, factory = fake_runtime(TOOL)
    with pytest.raises(MultilaneError, match="async with"):
        await rt.run("extract", text="Lyon")
    assert not factory.loads


async def test_lanes_load_once_and_are_reused_across_runs(fake_runtime) -> None:
    rt, factory = fake_runtime(TOOL)
    async with rt:
        await rt.run("extract", text="Lyon")
        await rt.run("extract", text="Paris")
        assert len(rt.ps()) == 1

    assert factory.loads == {"assistant": 1}
    assert len(factory["assistant"].calls) == 2


async def test_closing_the_runtime_closes_its_engines(fake_runtime) -> None:
    rt, factory = fake_runtime(TOOL)
    async with rt:
        await rt.run("extract", text="Lyon")
        assert factory["assistant"].closed is False

    assert factory["assistant"].closed is True
    with pytest.raises(MultilaneError):
        await rt.run("extract", text="Lyon")


LONG = """
models:
  small: {kind: generate, source: ./small}
pipelines:
  long:
    inputs: {text: str}
    stages:
      answer: {kind: reason, model: small, prompt: "{{ inputs.text }}", max_tokens: 10, truncate: TRUNCATE}
"""


async def test_prompt_longer_than_the_context_fails_with_both_token_counts(fake_runtime) -> None:
    small = FakeGenerateEngine(context=50)
    rt, _ = fake_runtime(LONG.replace("TRUNCATE", "false"), small=small)
    text = " ".join(["word"] * 100)
    prompt_tokens = len(small.encode(small.render([{"role": "user", "content": text}])))
    async with rt:
        with pytest.raises(StageError) as caught:
            await rt.run("long", text=text)

    assert isinstance(caught.value.cause, ContextLengthError)
    assert f"prompt of {prompt_tokens} tokens" in str(caught.value)
    assert "context of 50 tokens" in str(caught.value)
    assert small.calls == []  # refused before reaching the engine


async def test_truncate_true_lets_a_too_long_prompt_run(fake_runtime) -> None:
    small = FakeGenerateEngine("short answer", context=50)
    rt, _ = fake_runtime(LONG.replace("TRUNCATE", "true"), small=small)
    async with rt:
        result = await rt.run("long", text=" ".join(["word"] * 100))

    assert result.stages["answer"]["text"] == "short answer"
    assert result.stages["answer"]["prompt_tokens"] == 40  # context 50 - max_tokens 10



PRIORITIES = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  nightly:
    priority: 5
    stages:
      summary: {kind: reason, model: assistant, prompt: "Summarise the day.", max_tokens: 4}
      alert: {kind: reason, model: assistant, prompt: "Raise the alert.", max_tokens: 4, priority: -1}
  chat:
    stages:
      reply: {kind: reason, model: assistant, prompt: "Say hello.", max_tokens: 4}
"""


async def test_a_pipeline_priority_reaches_its_model_calls_and_a_stage_may_set_its_own(fake_runtime) -> None:
    engine = FakeGenerateEngine()
    rt, _ = fake_runtime(PRIORITIES, assistant=engine)
    async with rt:
        await rt.run("nightly")
        await rt.run("chat")

    by_prompt = {call.prompt.split(">", 1)[1].split("\n")[0]: call.priority for call in engine.calls}
    assert by_prompt == {"Summarise the day.": 5, "Raise the alert.": -1, "Say hello.": 0}


async def test_a_stage_result_says_how_many_prompt_tokens_came_from_the_prefix_cache(fake_runtime) -> None:
    engine = FakeGenerateEngine(cache_block_size=2)
    rt, _ = fake_runtime(PRIORITIES, assistant=engine)
    async with rt:
        first = await rt.run("chat")
        second = await rt.run("chat")

    assert first.stages["reply"]["cached_tokens"] == 0
    assert second.stages["reply"]["cached_tokens"] == 2  # "<user>Say hello." of 3 tokens: one whole block
    assert second.stages["reply"]["prompt_tokens"] == 3
