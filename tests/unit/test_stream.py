"""Runtime.stream: a pipeline run as events, for services that show progress and tokens as they come."""

from __future__ import annotations

from typing import Any

import pytest

from multilane import InputError, RunEvent, StageError
from multilane.testing import FakeGenerateEngine

pytestmark = pytest.mark.anyio

PIPELINE = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      draft: {kind: reason, model: assistant, prompt: "Draft: {{ inputs.question }}"}
      answer: {kind: reason, model: assistant, prompt: "Improve: {{ stages.draft.text }}"}
    output: "{{ stages.answer.text }}"
"""


async def collect(rt: Any, *args: Any, **kwargs: Any) -> list[RunEvent]:
    async with rt.stream(*args, **kwargs) as events:
        return [event async for event in events]


async def test_stream_yields_stage_events_and_tokens_in_order_and_ends_with_the_output(fake_runtime: Any) -> None:
    rt, _ = fake_runtime(PIPELINE, assistant=FakeGenerateEngine("one two three"))
    async with rt:
        events = await collect(rt, "ask", question="why?")

    kinds = [(e.type, e.stage) for e in events if e.type != "token"]
    assert kinds == [("run_started", None), ("stage_started", "draft"), ("stage_finished", "draft"),
                     ("stage_started", "answer"), ("stage_finished", "answer"), ("run_finished", None)]
    tokens = [e for e in events if e.type == "token"]
    assert "".join(e.data["text"] for e in tokens if e.stage == "answer") == "one two three"
    assert {e.stage for e in tokens} == {"draft", "answer"}
    assert events[-1].data["output"] == "one two three"
    assert len({e.run_id for e in events}) == 1
    finished = next(e for e in events if e.type == "stage_finished" and e.stage == "answer")
    assert finished.data["result"]["completion_tokens"] == 3
    assert finished.data["result"]["prompt_tokens"] > 0


async def test_stream_and_run_agree_on_the_output(fake_runtime: Any) -> None:
    rt, _ = fake_runtime(PIPELINE, assistant=FakeGenerateEngine("same answer"))
    async with rt:
        events = await collect(rt, "ask", {"question": "why?"})
        result = await rt.run("ask", {"question": "why?"})
    assert events[-1].data["output"] == result.output


async def test_a_failing_stage_is_streamed_as_run_failed_then_raised(fake_runtime: Any) -> None:
    rt, _ = fake_runtime(PIPELINE, assistant=FakeGenerateEngine("x", context=8))
    seen: list[RunEvent] = []
    async with rt:
        with pytest.raises(StageError, match="context"):
            async with rt.stream("ask", question="a question long enough to overflow the context") as events:
                async for event in events:
                    seen.append(event)
    assert [e.type for e in seen][-2:] == ["stage_failed", "run_failed"]


async def test_bad_inputs_raise_before_any_event(fake_runtime: Any) -> None:
    rt, _ = fake_runtime(PIPELINE)
    async with rt:
        with pytest.raises(InputError, match="question"):
            await collect(rt, "ask")


async def test_leaving_the_stream_early_cancels_the_run_and_aborts_its_request(fake_runtime: Any,
                                                                               held: Any) -> None:
    engine = held("word " * 200)  # streams one token, then holds: only an abort ends the request
    rt, _ = fake_runtime(PIPELINE, assistant=engine)
    async with rt:
        async with rt.stream("ask", question="why?") as events:
            async for event in events:
                if event.type == "token":
                    break
        assert engine.unfinished_requests() == 0  # leaving the block waited for the abort
        assert engine.calls[0].aborted
        assert all(row["busy"] == 0 for row in rt.ps())
