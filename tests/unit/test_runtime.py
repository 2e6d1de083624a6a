"""Opening and closing a Runtime: close works from any task, and the `async with` block still ends cleanly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from multilane import MultilaneError, Runtime
from multilane.errors import RuntimeClosedError
from multilane.journal import list_runs
from multilane.testing import FakeGenerateEngine

pytestmark = pytest.mark.anyio

SPEC = """
models:
  assistant: {kind: generate, source: ./assistant, parallel: 1}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      answer: {kind: reason, model: assistant, prompt: "{{ inputs.question }}", max_tokens: 4}
    output: "{{ stages.answer.text }}"
"""


class SlowClosing(FakeGenerateEngine):
    """A fake whose close waits for a gate, as a vLLM engine core takes seconds to exit."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.closing = anyio.Event()

    async def close(self) -> None:
        self.closing.set()
        await self.gate.wait()
        await super().close()


async def _closed_from_elsewhere(rt: Runtime, engine: FakeGenerateEngine,
                                 close: Callable[[Runtime], Any]) -> None:
    async with rt:
        await rt.run("ask", question="first")
        await close(rt)
        assert engine.closed  # close returned once the engine had closed
        await anyio.lowlevel.checkpoint()  # the block itself is not cancelled: it goes on after the close
        with pytest.raises(RuntimeClosedError, match="closed"):
            await rt.run("ask", question="after")
        assert rt.journal is None


async def test_close_from_a_child_task_stops_the_engines_and_the_block_ends_cleanly(fake_runtime: Any) -> None:
    # Before: closing from another task than the one that opened the runtime raised anyio's "Attempted to exit
    # cancel scope in a different task than it was entered in".
    engine = FakeGenerateEngine()
    rt, _ = fake_runtime(SPEC, assistant=engine)

    async def in_a_child_task(rt: Runtime) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.close)

    await _closed_from_elsewhere(rt, engine, in_a_child_task)


async def test_close_from_inside_a_nested_task_group_of_the_opening_task(fake_runtime: Any) -> None:
    # Before: the runtime's task group could not be exited from under a nested cancel scope.
    engine = FakeGenerateEngine()
    rt, _ = fake_runtime(SPEC, assistant=engine)

    async def under_a_nested_scope(rt: Runtime) -> None:
        async with anyio.create_task_group():
            await rt.close()

    await _closed_from_elsewhere(rt, engine, under_a_nested_scope)


async def test_a_close_from_a_worker_writes_the_journal_before_it_returns(fake_runtime: Any, _home: Any) -> None:
    rt, _ = fake_runtime(SPEC)
    async with rt, anyio.create_task_group() as tg:
        result = await rt.run("ask", question="kept")
        tg.start_soon(rt.close)
    runs = list_runs(_home / "journal.db")
    assert [(run.run_id, run.status) for run in runs] == [(result.run_id, "finished")]


async def test_two_closes_at_once_both_return_only_once_everything_has_stopped(fake_runtime: Any) -> None:
    engine = SlowClosing()
    rt, _ = fake_runtime(SPEC, assistant=engine)
    returned: list[str] = []

    async def close(who: str) -> None:
        await rt.close()
        returned.append(who)

    async with rt:
        await rt.run("ask", question="first")
        async with anyio.create_task_group() as tg:
            tg.start_soon(close, "worker")
            await engine.closing.wait()
            tg.start_soon(close, "second")
            await anyio.wait_all_tasks_blocked()
            assert returned == []  # neither returns while the engine is still closing
            engine.gate.set()
    assert sorted(returned) == ["second", "worker"] and engine.closed


async def test_a_runtime_never_opened_says_to_open_it(fake_runtime: Any) -> None:
    rt, factory = fake_runtime(SPEC)
    with pytest.raises(MultilaneError, match="async with"):
        await rt.run("ask", question="q")
    assert not factory.loads
