"""The pool and its lanes: loading on demand, the budget and the cap, keep-alive, slots and the FIFO queue."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import cast

import anyio
import pytest

from multilane.engines.base import Chunk, Completion, Message, SamplingOptions
from multilane.errors import (
    ContextLengthError,
    EngineDeadError,
    MemoryBudgetError,
    MultilaneError,
    QueueFullError,
    RuntimeClosedError,
    UnknownNameError,
)
from multilane.lanes import Engine, LanePlan, Pool
from multilane.memory import KVPlan
from multilane.testing import FakeGenerateEngine

pytestmark = pytest.mark.anyio

HI: list[Message] = [{"role": "user", "content": "hi"}]
SHORT = SamplingOptions(max_tokens=4)


class FakeClock:
    """A monotonic clock that only moves when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Planner:
    """Plans lanes over fake generate engines; records every engine it loads and how many loads overlapped."""

    def __init__(self, costs: dict[str, int], *, keys: dict[str, str] | None = None, parallel: int = 2,
                 context: int = 2048, kv_bytes_per_token: int = 0, load_delay: float = 0.0,
                 make_engine: Callable[[], FakeGenerateEngine] = FakeGenerateEngine,
                 load_gate: anyio.Event | None = None, max_loads: int = 100, reserved_slots: int = 0,
                 reserved_priority: int = 0) -> None:
        self.costs = costs
        self.reserved_slots = reserved_slots
        self.reserved_priority = reserved_priority
        self.load_gate = load_gate  # when given, every load waits for it
        self.max_loads = max_loads  # a runaway reload loop fails here instead of spinning for ever
        self.keys = keys or {}
        self.parallel = parallel
        self.context = context
        self.kv_bytes_per_token = kv_bytes_per_token
        self.load_delay = load_delay
        self.make_engine = make_engine
        self.engines: dict[str, list[FakeGenerateEngine]] = {}
        self.loading = 0
        self.max_loading = 0

    def loads(self, name: str) -> int:
        return len(self.engines.get(name, []))

    def engine(self, name: str) -> FakeGenerateEngine:
        """The engine of a model's latest load."""
        return self.engines[name][-1]

    async def __call__(self, name: str) -> LanePlan:
        async def load() -> Engine:
            self.loading += 1
            self.max_loading = max(self.max_loading, self.loading)
            try:
                await anyio.sleep(self.load_delay)
                if self.load_gate is not None:
                    await self.load_gate.wait()
                if sum(len(engines) for engines in self.engines.values()) >= self.max_loads:
                    raise RuntimeError(f"more than {self.max_loads} loads: a reload loop")
                engine = self.make_engine()
                self.engines.setdefault(name, []).append(engine)
                return engine
            finally:
                self.loading -= 1

        kv = KVPlan.per_token(self.parallel, self.context, self.kv_bytes_per_token) if self.kv_bytes_per_token else None
        return LanePlan(key=("k", self.keys.get(name, name)), kind="generate", source=f"fake:{name}", load=load,
                        weights_bytes=self.costs[name], kv=kv, parallel=self.parallel, context=self.context,
                        reserved_slots=self.reserved_slots, reserved_priority=self.reserved_priority)


def make_pool(planner: Planner, keep_alive: dict[str, float | None], *, clock: Callable[[], float] = time.monotonic,
              budget: int | None = None, max_loaded: int = 8, max_queue: int = 8, max_overtakes: int = 32) -> Pool:
    return Pool(planner, models={name: ("generate", seconds) for name, seconds in keep_alive.items()},
                budget_bytes=budget, max_loaded=max_loaded, max_queue=max_queue, clock=clock,
                max_overtakes=max_overtakes)


def loaded_names(pool: Pool) -> list[str]:
    return sorted(row["name"] for row in pool.ps())


def row(pool: Pool, name: str) -> dict[str, object]:
    (found,) = [r for r in pool.ps() if name in r["models"]]
    return found


@asynccontextmanager
async def running(pool: Pool, name: str) -> AsyncIterator[AsyncGenerator[Chunk, None]]:
    """A streaming call that has taken its slot and waits mid-stream; it finishes when the block ends."""
    stream = cast(AsyncGenerator[Chunk, None], pool.stream(name, HI, SHORT))
    async with aclosing(stream):
        await stream.__anext__()
        yield stream
        async for _ in stream:
            pass


async def until(condition: Callable[[], bool]) -> None:
    """Let other tasks run until the condition holds."""
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - the conditions are pool and engine state, not events
            await anyio.sleep(0.001)


# ---- loading on demand


async def test_nothing_loads_until_first_call_and_second_call_reuses_the_lane() -> None:
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 300.0})
    assert pool.ps() == []
    assert pool.loaded("a") is None
    assert planner.loads("a") == 0

    first = await pool.generate("a", HI, SHORT)
    second = await pool.generate("a", HI, SHORT)

    assert first.text == second.text == "fake reply"
    assert planner.loads("a") == 1
    assert pool.metrics["a"].loads == 1
    assert pool.metrics["a"].requests == 2
    assert loaded_names(pool) == ["a"]


async def test_an_undeclared_model_is_an_unknown_name() -> None:
    pool = make_pool(Planner({"a": 100}), {"a": 300.0})
    with pytest.raises(UnknownNameError, match=r"unknown model 'nope'.*declared: a"):
        await pool.generate("nope", HI, SHORT)


async def test_two_declared_models_with_the_same_plan_key_share_one_lane() -> None:
    planner = Planner({"a": 100, "b": 100}, keys={"a": "same", "b": "same"})
    pool = make_pool(planner, {"a": 300.0, "b": 300.0})

    await pool.generate("a", HI, SHORT)
    await pool.generate("b", HI, SHORT)

    assert planner.loads("a") + planner.loads("b") == 1
    assert [r["models"] for r in pool.ps()] == [["a", "b"]]
    assert pool.usage()["used_bytes"] == 100
    assert pool.usage()["loaded"] == 1


async def test_loads_never_overlap_even_when_requested_concurrently() -> None:
    planner = Planner({"a": 100, "b": 100, "c": 100}, load_delay=0.02)
    pool = make_pool(planner, {"a": 300.0, "b": 300.0, "c": 300.0})

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for name in ("a", "b", "c"):
                tg.start_soon(pool.lane, name)

    assert planner.max_loading == 1
    assert loaded_names(pool) == ["a", "b", "c"]


async def test_concurrent_first_calls_to_one_model_load_it_once() -> None:
    planner = Planner({"a": 100}, load_delay=0.02)
    pool = make_pool(planner, {"a": 300.0})

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(pool.generate, "a", HI, SHORT)

    assert planner.loads("a") == 1


# ---- the cap and the budget


async def test_cap_evicts_the_idle_lane_and_a_later_call_reloads_it() -> None:
    planner = Planner({"a": 100, "b": 100})
    pool = make_pool(planner, {"a": 300.0, "b": 300.0}, max_loaded=1)

    await pool.generate("a", HI, SHORT)
    first_a = planner.engine("a")
    await pool.generate("b", HI, SHORT)

    assert first_a.closed
    assert pool.metrics["a"].evictions == 1
    assert loaded_names(pool) == ["b"]

    await pool.generate("a", HI, SHORT)
    assert planner.loads("a") == 2
    assert pool.metrics["a"].loads == 2
    assert planner.engine("b").closed
    assert loaded_names(pool) == ["a"]


async def test_budget_evicts_an_idle_lane_rather_than_a_busy_one() -> None:
    # a would expire first, but it is busy: b, idle, goes instead
    planner = Planner({"a": 100, "b": 100, "c": 100})
    pool = make_pool(planner, {"a": 10.0, "b": 100.0, "c": 300.0}, clock=FakeClock(), budget=250)

    await pool.generate("b", HI, SHORT)
    async with running(pool, "a") as stream:
        await pool.generate("c", HI, SHORT)

        assert loaded_names(pool) == ["a", "c"]
        assert planner.engine("b").closed
        assert not planner.engine("a").closed
        assert pool.metrics["b"].evictions == 1
        assert pool.metrics["a"].evictions == 0
        rest = [chunk.text async for chunk in stream]
    assert rest == ["reply"]  # the busy call ran to its end


async def test_budget_evicts_the_idle_lane_that_expires_soonest() -> None:
    planner = Planner({"a": 100, "b": 100, "c": 100})
    pool = make_pool(planner, {"a": 100.0, "b": 10.0, "c": 300.0}, clock=FakeClock(), budget=250)

    await pool.generate("a", HI, SHORT)
    await pool.generate("b", HI, SHORT)  # used last, but its keep-alive runs out first
    await pool.generate("c", HI, SHORT)

    assert loaded_names(pool) == ["a", "c"]
    assert pool.metrics["b"].evictions == 1
    assert pool.metrics["a"].evictions == 0
    assert pool.usage()["used_bytes"] == 200


async def test_budget_refusal_shows_the_arithmetic_and_who_holds_the_memory() -> None:
    planner = Planner({"a": 100, "b": 100, "c": 100})
    pool = make_pool(planner, {"a": 300.0, "b": None, "c": 300.0}, budget=250)

    await pool.generate("b", HI, SHORT)
    async with running(pool, "a"):
        with pytest.raises(MemoryBudgetError) as caught:
            await pool.generate("c", HI, SHORT)

    message = str(caught.value)
    assert "cannot load model 'c'" in message
    assert "needs 100 B (weights 100 B)" in message
    assert "budget is 250 B with 200 B in use" in message
    assert "a (busy, 100 B)" in message
    assert "b (pinned, 100 B)" in message
    assert "300 B would exceed it" in message
    assert "runtime.memory_budget" in message
    assert planner.loads("c") == 0
    assert loaded_names(pool) == ["a", "b"]  # nothing was evicted for a load that could not happen


async def test_a_model_bigger_than_the_whole_budget_is_refused_before_loading() -> None:
    planner = Planner({"a": 1000})
    pool = make_pool(planner, {"a": 300.0}, budget=250)

    with pytest.raises(MemoryBudgetError) as caught:
        await pool.generate("a", HI, SHORT)

    message = str(caught.value)
    assert "needs 1000 B" in message
    assert "whole memory budget of 250 B" in message
    assert "runtime.memory_budget" in message
    assert planner.loads("a") == 0
    assert pool.ps() == []


async def test_cap_refusal_names_max_loaded_models_and_the_busy_lane() -> None:
    planner = Planner({"a": 100, "b": 100})
    pool = make_pool(planner, {"a": 300.0, "b": 300.0}, max_loaded=1)

    async with running(pool, "a"):
        with pytest.raises(MemoryBudgetError) as caught:
            await pool.generate("b", HI, SHORT)
    message = str(caught.value)
    assert "runtime.max_loaded_models is 1" in message
    assert "a (busy, 100 B)" in message

    await pool.generate("b", HI, SHORT)  # once a is idle it makes room
    assert loaded_names(pool) == ["b"]


async def test_usage_sums_the_loaded_plans_costs_and_kv_follows_parallel_times_context() -> None:
    planner = Planner({"a": 1000, "b": 500}, parallel=2, context=2048, kv_bytes_per_token=2)
    pool = make_pool(planner, {"a": 300.0, "b": 300.0}, budget=100_000, max_loaded=3)

    await pool.generate("a", HI, SHORT)
    await pool.generate("b", HI, SHORT)

    plan = await planner("a")
    assert plan.kv_bytes == 2 * 2048 * 2
    assert plan.cost == 1000 + 8192
    assert plan.arithmetic() == "weights 1000 B + KV 2 x 2048 x 2 B = 8.00 KiB"
    assert pool.usage() == {"budget_bytes": 100_000, "used_bytes": (1000 + 8192) + (500 + 8192), "loaded": 2,
                            "max_loaded_models": 3}
    assert row(pool, "a")["kv_bytes"] == 8192
    assert row(pool, "a")["weights_bytes"] == 1000


# ---- keep-alive


async def test_a_pinned_lane_never_expires_and_is_never_evicted() -> None:
    clock = FakeClock()
    planner = Planner({"p": 100, "b": 100})
    pool = make_pool(planner, {"p": None, "b": 300.0}, clock=clock, max_loaded=1)

    await pool.generate("p", HI, SHORT)
    clock.advance(10**9)
    await pool.reap()

    assert loaded_names(pool) == ["p"]
    assert row(pool, "p")["expires_at"] == "forever"
    with pytest.raises(MemoryBudgetError, match=r"p \(pinned"):
        await pool.generate("b", HI, SHORT)
    assert not planner.engine("p").closed


async def test_keep_alive_zero_unloads_as_soon_as_the_call_returns() -> None:
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 0.0}, clock=FakeClock())

    await pool.generate("a", HI, SHORT)
    await pool.reap()

    assert pool.ps() == []
    assert planner.engine("a").closed


async def test_an_idle_lane_unloads_once_its_keep_alive_runs_out() -> None:
    clock = FakeClock()
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 300.0}, clock=clock)

    await pool.generate("a", HI, SHORT)
    clock.advance(299)
    await pool.reap()
    assert loaded_names(pool) == ["a"]

    clock.advance(2)
    await pool.reap()
    assert pool.ps() == []
    assert planner.engine("a").closed
    assert pool.metrics["a"].evictions == 0  # expiry is not an eviction


async def test_the_keep_alive_clock_starts_when_the_lane_goes_idle() -> None:
    clock = FakeClock()
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 300.0}, clock=clock)

    async with running(pool, "a"):
        clock.advance(1000)
        await pool.reap()
        assert loaded_names(pool) == ["a"]
        assert row(pool, "a")["expires_at"] is None  # busy: no expiry yet

    clock.advance(299)
    await pool.reap()
    assert loaded_names(pool) == ["a"]
    clock.advance(2)
    await pool.reap()
    assert pool.ps() == []


async def test_a_call_with_keep_alive_zero_unloads_the_lane_when_idle() -> None:
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 300.0}, clock=FakeClock())

    await pool.generate("a", HI, SHORT, keep_alive=0.0)
    await pool.reap()

    assert pool.ps() == []


async def test_a_call_with_keep_alive_none_pins_the_lane() -> None:
    clock = FakeClock()
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 300.0}, clock=clock)

    await pool.generate("a", HI, SHORT, keep_alive=None)
    clock.advance(10**9)
    await pool.reap()

    assert loaded_names(pool) == ["a"]
    assert row(pool, "a")["expires_at"] == "forever"


async def test_a_lane_shared_with_a_pinned_model_never_expires() -> None:
    clock = FakeClock()
    planner = Planner({"a": 100, "p": 100}, keys={"a": "same", "p": "same"})
    pool = make_pool(planner, {"a": 300.0, "p": None}, clock=clock)

    await pool.generate("a", HI, SHORT)
    await pool.lane("p")  # as the runtime preloads a pinned model
    clock.advance(10**6)
    await pool.reap()

    assert [r["models"] for r in pool.ps()] == [["a", "p"]]
    assert row(pool, "p")["expires_at"] == "forever"


async def test_unload_frees_an_idle_lane_now_and_a_busy_one_once_it_is_idle() -> None:
    planner = Planner({"a": 100, "b": 100})
    pool = make_pool(planner, {"a": 300.0, "b": 300.0}, clock=FakeClock())
    await pool.generate("a", HI, SHORT)

    assert await pool.unload("a") is True
    assert planner.engine("a").closed
    assert await pool.unload("a") is False

    async with running(pool, "b"):
        assert await pool.unload("b") is True
        assert loaded_names(pool) == ["b"]
    await pool.reap()
    assert pool.ps() == []


async def test_the_reaper_unloads_expired_lanes_on_its_own() -> None:
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 0.05})

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.reap_forever)
            await pool.generate("a", HI, SHORT)
            assert loaded_names(pool) == ["a"]
            await until(lambda: pool.loaded("a") is None)
            tg.cancel_scope.cancel()

    assert planner.engine("a").closed


# ---- slots and the queue


async def test_queued_calls_run_in_the_order_they_arrived() -> None:
    planner = Planner({"a": 100}, parallel=1)
    pool = make_pool(planner, {"a": 300.0})
    finished: list[int] = []

    async def call(i: int) -> None:
        await pool.generate("a", [{"role": "user", "content": f"call {i}"}], SHORT)
        finished.append(i)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with running(pool, "a"):
                for i in range(5):
                    tg.start_soon(call, i)
                    await anyio.wait_all_tasks_blocked()
                assert row(pool, "a")["queued"] == 5

    assert finished == [0, 1, 2, 3, 4]
    prompts = [record.prompt for record in planner.engine("a").calls[1:]]
    assert prompts == [f"<user>call {i}\n<assistant>" for i in range(5)]


async def test_a_full_queue_refuses_at_once_while_admitted_calls_complete() -> None:
    planner = Planner({"a": 100}, parallel=1)
    pool = make_pool(planner, {"a": 300.0}, max_queue=2)
    results: list[Completion] = []

    async def call() -> None:
        results.append(await pool.generate("a", HI, SHORT))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with running(pool, "a") as stream:
                for _ in range(2):
                    tg.start_soon(call)
                    await anyio.wait_all_tasks_blocked()
                assert row(pool, "a")["queued"] == 2

                with pytest.raises(QueueFullError) as caught:
                    await pool.generate("a", HI, SHORT)
                assert row(pool, "a")["busy"] == 1  # refused at once: the running call is still held open
                rest = [chunk.text async for chunk in stream]

    message = str(caught.value)
    assert "lane 'a'" in message
    assert "runtime.max_queue" in message
    assert rest == ["reply"]
    assert [r.text for r in results] == ["fake reply", "fake reply"]
    assert pool.metrics["a"].rejected == 1
    assert row(pool, "a")["busy"] == 0


async def test_a_cancelled_queued_call_leaves_the_queue_and_the_next_one_still_runs() -> None:
    planner = Planner({"a": 100}, parallel=1)
    pool = make_pool(planner, {"a": 300.0})
    cancelled = anyio.CancelScope()
    results: list[str] = []

    async def doomed() -> None:
        with cancelled:
            await pool.generate("a", [{"role": "user", "content": "doomed"}], SHORT)
            results.append("doomed")

    async def behind() -> None:
        results.append((await pool.generate("a", HI, SHORT)).text)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with running(pool, "a"):
                tg.start_soon(doomed)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(behind)
                await anyio.wait_all_tasks_blocked()
                assert row(pool, "a")["queued"] == 2

                cancelled.cancel()
                await anyio.wait_all_tasks_blocked()
                assert row(pool, "a")["queued"] == 1

    assert results == ["fake reply"]
    assert "doomed" not in [record.prompt for record in planner.engine("a").calls]
    assert row(pool, "a")["busy"] == 0
    assert row(pool, "a")["queued"] == 0


async def test_cancelling_a_running_call_aborts_the_engine_request_and_frees_the_slot() -> None:
    planner = Planner({"a": 100}, parallel=1,
                      make_engine=lambda: FakeGenerateEngine("many words " * 50, token_delay=0.01))
    pool = make_pool(planner, {"a": 300.0})
    scope = anyio.CancelScope()

    async def call() -> None:
        with scope:
            await pool.generate("a", HI, SamplingOptions(max_tokens=100))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await until(lambda: planner.loads("a") == 1 and planner.engine("a").unfinished_requests() == 1)
            scope.cancel()

        engine = planner.engine("a")
        assert engine.calls[0].aborted
        assert engine.calls[0].finished is not None
        assert engine.unfinished_requests() == 0
        assert row(pool, "a")["busy"] == 0

        engine.token_delay = 0.0
        done = await pool.generate("a", HI, SHORT)  # the slot is free again
    assert done.text == "many words many words "


async def test_leaving_a_stream_early_aborts_the_engine_request_before_the_slot_is_reused() -> None:
    planner = Planner({"a": 100}, parallel=1, make_engine=lambda: FakeGenerateEngine("many words " * 50))
    pool = make_pool(planner, {"a": 300.0})

    stream = cast(AsyncGenerator[Chunk, None], pool.stream("a", HI, SamplingOptions(max_tokens=100)))
    async with aclosing(stream):
        async for _ in stream:
            break

    engine = planner.engine("a")
    assert engine.unfinished_requests() == 0
    assert engine.calls[0].aborted
    assert row(pool, "a")["busy"] == 0


# ---- priority: the queue's order, the bound on overtaking, reserved slots


class Held:
    """Streaming calls that each take their slot, say so, and hold it until the test lets them finish.

    Its tests run on the virtual clock, where waiting for every task to block takes no wall time.
    """

    def __init__(self, pool: Pool, name: str = "a") -> None:
        self.pool = pool
        self.name = name
        self.arrived: list[str] = []
        self.started: list[str] = []
        self.priority: dict[str, int] = {}
        self._finish: dict[str, anyio.Event] = {}

    async def call(self, label: str, priority: int) -> None:
        self.arrived.append(label)
        self.priority[label] = priority
        self._finish[label] = anyio.Event()
        stream = self.pool.stream(self.name, [{"role": "user", "content": label}], SHORT, priority=priority)
        async with aclosing(stream):
            await stream.__anext__()
            self.started.append(label)
            await self._finish[label].wait()
            async for _ in stream:
                pass

    def running(self) -> list[str]:
        return [label for label in self.started if not self._finish[label].is_set()]

    async def finish(self, label: str) -> None:
        self._finish[label].set()
        await anyio.wait_all_tasks_blocked()

    async def arrive(self, tg: anyio.abc.TaskGroup, label: str, priority: int = 0) -> None:
        tg.start_soon(self.call, label, priority)
        await anyio.wait_all_tasks_blocked()


@pytest.mark.virtual_clock
async def test_queued_calls_run_by_priority_then_by_arrival_and_the_engine_gets_each_priority() -> None:
    planner = Planner({"a": 100}, parallel=1)
    pool = make_pool(planner, {"a": 300.0})
    held = Held(pool)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await held.arrive(tg, "first", 0)
            for label, priority in [("late-5", 5), ("urgent", -1), ("normal-a", 0), ("late-9", 9), ("normal-b", 0),
                                    ("late-5b", 5)]:
                await held.arrive(tg, label, priority)
            assert row(pool, "a")["queued"] == 6
            assert row(pool, "a")["queued_by_priority"] == {"-1": 1, "0": 2, "5": 2, "9": 1}
            while held.running():
                await held.finish(held.running()[0])

    assert held.started == ["first", "urgent", "normal-a", "normal-b", "late-5", "late-5b", "late-9"]
    assert [(record.prompt.split(">")[1].split("\n")[0], record.priority) for record in planner.engine("a").calls] \
        == [(label, held.priority[label]) for label in held.started]
    assert row(pool, "a")["queued_by_priority"] == {}


@pytest.mark.virtual_clock
async def test_a_low_priority_call_is_passed_over_at_most_max_overtakes_times() -> None:
    planner = Planner({"a": 100}, parallel=1)
    pool = make_pool(planner, {"a": 300.0}, max_overtakes=2)
    held = Held(pool)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await held.arrive(tg, "running", 0)
            await held.arrive(tg, "background", 10)
            for i in range(4):
                await held.arrive(tg, f"urgent-{i}", 0)
            while held.running():
                await held.finish(held.running()[0])
                if len(held.started) == 3:  # a new urgent call arrives while the slot is busy again
                    await held.arrive(tg, "urgent-late", 0)

    # two urgent calls went first; then the background call, before every urgent call that came after it
    assert held.started == ["running", "urgent-0", "urgent-1", "background", "urgent-2", "urgent-3", "urgent-late"]


@pytest.mark.virtual_clock
async def test_max_overtakes_zero_serves_strictly_in_arrival_order() -> None:
    planner = Planner({"a": 100}, parallel=1)
    pool = make_pool(planner, {"a": 300.0}, max_overtakes=0)
    held = Held(pool)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for label, priority in [("a", 0), ("b", 9), ("c", -5), ("d", 3)]:
                await held.arrive(tg, label, priority)
            while held.running():
                await held.finish(held.running()[0])

    assert held.started == ["a", "b", "c", "d"]


@pytest.mark.virtual_clock
@pytest.mark.parametrize("seed", range(6))
async def test_no_call_is_overtaken_more_than_max_overtakes_times_whatever_the_arrivals(seed: int) -> None:
    rng = random.Random(seed)
    bound = 3
    planner = Planner({"a": 100}, parallel=2)
    pool = make_pool(planner, {"a": 300.0}, max_queue=100, max_overtakes=bound)
    held = Held(pool)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(60):
                if rng.random() < 0.55 or not held.running():
                    await held.arrive(tg, f"c{i}", rng.choice([-2, 0, 0, 1, 5, 9]))
                else:
                    await held.finish(rng.choice(held.running()))
                lane = pool.loaded("a")
                assert lane is not None
                assert lane.busy == 2 or lane.queued == 0  # a free slot never leaves a call waiting
            while held.running():
                await held.finish(held.running()[0])

    order = {label: i for i, label in enumerate(held.started)}
    arrival = {label: i for i, label in enumerate(held.arrived)}
    for label in held.arrived:
        overtaken_by = [other for other in held.arrived
                        if arrival[other] > arrival[label] and order[other] < order[label]]
        assert len(overtaken_by) <= bound, (label, overtaken_by)
    assert sorted(held.started) == sorted(held.arrived)


@pytest.mark.virtual_clock
async def test_reserved_slots_keep_room_for_urgent_calls_while_background_calls_wait() -> None:
    planner = Planner({"a": 100}, parallel=3, reserved_slots=1, reserved_priority=0)
    pool = make_pool(planner, {"a": 300.0})
    held = Held(pool)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(4):
                await held.arrive(tg, f"bg-{i}", 5)
            assert held.started == ["bg-0", "bg-1"]  # the third slot is reserved
            assert (row(pool, "a")["busy"], row(pool, "a")["queued"]) == (2, 2)
            assert row(pool, "a")["reserved_slots"] == 1

            await held.arrive(tg, "chat-1", 0)
            assert held.started[-1] == "chat-1"  # at once, in the reserved slot
            await held.arrive(tg, "chat-2", -3)
            assert row(pool, "a")["queued_by_priority"] == {"-3": 1, "5": 2}

            await held.finish("chat-1")  # the reserved slot frees: only the urgent call may take it
            assert held.running() == ["bg-0", "bg-1", "chat-2"]
            await held.finish("bg-0")  # a shared slot frees: the next background call takes it
            assert held.running() == ["bg-1", "chat-2", "bg-2"]
            await held.finish("chat-2")  # the reserved slot stays free for the next urgent call
            assert (row(pool, "a")["busy"], row(pool, "a")["queued"]) == (2, 1)
            await held.arrive(tg, "chat-3", 0)
            assert held.running() == ["bg-1", "bg-2", "chat-3"]
            while held.running():
                await held.finish(held.running()[0])

    assert held.started == ["bg-0", "bg-1", "chat-1", "chat-2", "bg-2", "chat-3", "bg-3"]
    assert row(pool, "a")["busy"] == 0


@pytest.mark.virtual_clock
async def test_urgent_calls_in_reserved_slots_do_not_count_as_overtaking_background_calls() -> None:
    planner = Planner({"a": 100}, parallel=2, reserved_slots=1)
    pool = make_pool(planner, {"a": 300.0}, max_overtakes=1)
    held = Held(pool)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await held.arrive(tg, "bg-0", 1)
            await held.arrive(tg, "bg-1", 1)  # waits: the other slot is reserved
            for i in range(3):  # each takes the reserved slot, which the waiting background call could not
                await held.arrive(tg, f"chat-{i}", 0)
                assert held.running() == ["bg-0", f"chat-{i}"]
                await held.finish(f"chat-{i}")
            await held.finish("bg-0")
            assert held.running() == ["bg-1"]
            await held.finish("bg-1")


# ---- cached prompt tokens


async def test_a_call_sharing_a_prefix_reports_the_cached_blocks_and_the_lane_counts_them() -> None:
    planner = Planner({"a": 100}, make_engine=lambda: FakeGenerateEngine(cache_block_size=4))
    pool = make_pool(planner, {"a": 300.0})
    shared = "one two three four five six seven eight nine ten"  # 10 words; rendered: <user>one ... ten <assistant>

    first = await pool.generate("a", [{"role": "user", "content": shared + " first question"}], SHORT)
    second = await pool.generate("a", [{"role": "user", "content": shared + " second question"}], SHORT)
    again = await pool.generate("a", [{"role": "user", "content": shared + " second question"}], SHORT)

    assert (first.prompt_tokens, first.cached_tokens) == (13, 0)
    assert (second.prompt_tokens, second.cached_tokens) == (13, 8)  # two whole blocks of the shared words
    assert again.cached_tokens == 12  # all but the last token: an engine always computes that one
    assert pool.metrics["a"].prompt_tokens == 39
    assert pool.metrics["a"].prompt_cached_tokens == 20
    assert row(pool, "a")["cached_tokens"] == 20
    assert row(pool, "a")["cache_hit_rate"] == pytest.approx(20 / 39)


async def test_a_lane_without_prefix_caching_reports_no_cached_tokens_and_no_hit_rate_before_a_call() -> None:
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 300.0})
    await pool.load("a")
    assert row(pool, "a")["cache_hit_rate"] is None

    done = await pool.generate("a", HI, SHORT)
    await pool.generate("a", HI, SHORT)

    assert done.cached_tokens == 0
    assert pool.metrics["a"].prompt_cached_tokens == 0
    assert row(pool, "a")["cache_hit_rate"] == 0.0


# ---- engine death


async def test_a_dead_engine_fails_its_call_drops_the_lane_and_the_next_call_reloads() -> None:
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 300.0})

    async with running(pool, "a") as stream:
        dead = planner.engine("a")
        dead.kill()
        with pytest.raises(EngineDeadError):
            await stream.__anext__()
        assert pool.ps() == []
        assert dead.closed

    done = await pool.generate("a", HI, SHORT)
    assert done.text == "fake reply"
    assert planner.loads("a") == 2
    assert planner.engine("a") is not dead
    assert pool.metrics["a"].failures == 1
    assert loaded_names(pool) == ["a"]


async def test_a_call_queued_behind_a_dead_engine_completes_on_the_reloaded_lane() -> None:
    planner = Planner({"a": 100}, parallel=1)
    pool = make_pool(planner, {"a": 300.0})
    results: list[str] = []

    async def queued() -> None:
        results.append((await pool.generate("a", [{"role": "user", "content": "queued"}], SHORT)).text)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with running(pool, "a") as stream:
                tg.start_soon(queued)
                await anyio.wait_all_tasks_blocked()
                assert row(pool, "a")["queued"] == 1
                planner.engine("a").kill()
                with pytest.raises(EngineDeadError):
                    await stream.__anext__()

    assert results == ["fake reply"]
    assert planner.loads("a") == 2
    assert [record.prompt for record in planner.engine("a").calls] == ["<user>queued\n<assistant>"]
    assert row(pool, "a")["busy"] == 0


# ---- context


def _long_prompt(words: int) -> list[Message]:
    return [{"role": "user", "content": " ".join(f"w{i}" for i in range(words))}]


async def test_a_prompt_too_long_for_the_context_is_refused_before_queueing() -> None:
    planner = Planner({"a": 100}, parallel=1, make_engine=lambda: FakeGenerateEngine(context=20))
    pool = make_pool(planner, {"a": 300.0})
    prompt = _long_prompt(30)

    with anyio.fail_after(5):
        async with running(pool, "a"):  # every slot is busy: a queued call would wait
            engine = planner.engine("a")
            tokens = len(engine.encode(engine.render(prompt)))
            with pytest.raises(ContextLengthError) as caught:
                await pool.generate("a", prompt, SHORT)
            assert row(pool, "a")["queued"] == 0

    message = str(caught.value)
    assert f"prompt of {tokens} tokens + max_tokens 4 = {tokens + 4} tokens" in message
    assert "context of 20 tokens" in message
    assert "truncate" in message


async def test_truncate_cuts_a_long_prompt_to_fit_the_context() -> None:
    planner = Planner({"a": 100}, make_engine=lambda: FakeGenerateEngine(context=20))
    pool = make_pool(planner, {"a": 300.0})

    done = await pool.generate("a", _long_prompt(30), SHORT, truncate=True)

    assert done.text == "fake reply"
    assert done.prompt_tokens == 16  # the context of 20 minus max_tokens 4


# ---- races: each of these tests failed before its fix


class _Ids(list[int]):
    """Token ids a preparing engine returns, with their count."""

    @property
    def tokens(self) -> int:
        return len(self)


class PreparingEngine(FakeGenerateEngine):
    """A fake that prepares prompts with an async call, as a remote engine does with /tokenize."""

    def __init__(self, gate: anyio.Event | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.preparing = anyio.Event()

    async def prepare(self, prompt: list[Message] | str, max_tokens: int, *, truncate: bool, model: str) -> _Ids:
        self.preparing.set()
        if self.gate is not None:
            await self.gate.wait()
        text = prompt if isinstance(prompt, str) else self.render(prompt)
        return _Ids(self.encode(text))


class SlowClosing(FakeGenerateEngine):
    """A fake whose close waits for a gate, as a vLLM engine core takes seconds to exit."""

    def __init__(self, gate: anyio.Event) -> None:
        super().__init__()
        self.gate = gate
        self.closing = anyio.Event()

    async def close(self) -> None:
        self.closing.set()
        await self.gate.wait()
        await super().close()


async def test_a_keep_alive_zero_lane_is_not_reaped_while_its_caller_prepares_the_prompt() -> None:
    # Before: the lane counted as idle during prepare; the reaper unloaded it, the caller reloaded it, and so on.
    gate = anyio.Event()
    planner = Planner({"a": 100}, make_engine=lambda: PreparingEngine(gate), max_loads=5)
    pool = make_pool(planner, {"a": 0.0})
    results: list[Completion] = []

    async def call() -> None:
        results.append(await pool.generate("a", HI, SHORT))

    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.reap_forever)
        tg.start_soon(call)
        await until(lambda: planner.loads("a") == 1)
        engine = cast(PreparingEngine, planner.engine("a"))
        await engine.preparing.wait()
        await anyio.wait_all_tasks_blocked()  # the reaper has had every chance to run
        assert not engine.closed
        gate.set()
        await until(lambda: bool(results))
        await until(lambda: pool.loaded("a") is None)  # idle at last: keep_alive 0 unloads it
        tg.cancel_scope.cancel()

    assert results[0].text == "fake reply"
    assert planner.loads("a") == 1
    assert engine.closed


async def test_a_lane_whose_caller_prepares_its_prompt_is_not_evicted_to_make_room() -> None:
    gate = anyio.Event()
    made: list[PreparingEngine] = []

    def make() -> PreparingEngine:  # the first engine (model a) waits in prepare, later ones do not
        made.append(PreparingEngine(gate if not made else None))
        return made[-1]

    planner = Planner({"a": 100, "b": 100}, make_engine=make, max_loads=5)
    pool = make_pool(planner, {"a": 300.0, "b": 300.0}, max_loaded=1)
    results: list[Completion] = []

    async def call_a() -> None:
        results.append(await pool.generate("a", HI, SHORT))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call_a)
        await until(lambda: bool(made))
        await made[0].preparing.wait()
        with pytest.raises(MemoryBudgetError, match=r"a \(busy"):
            await pool.generate("b", HI, SHORT)
        assert not made[0].closed
        gate.set()

    assert [r.text for r in results] == ["fake reply"]
    assert planner.loads("a") == 1 and planner.loads("b") == 0


async def test_closing_the_pool_fails_queued_calls_with_a_named_error_and_loads_nothing_after() -> None:
    # Before: close woke the queued call, which loaded a new engine that nothing ever closed.
    planner = Planner({"a": 100}, parallel=1, max_loads=5)
    pool = make_pool(planner, {"a": 300.0})
    failures: list[Exception] = []

    async def queued() -> None:
        try:
            await pool.generate("a", HI, SHORT)
        except MultilaneError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        async with running(pool, "a"):
            tg.start_soon(queued)
            await anyio.wait_all_tasks_blocked()
            assert row(pool, "a")["queued"] == 1
            await pool.close()
            await anyio.wait_all_tasks_blocked()

    assert len(failures) == 1 and "closed" in str(failures[0])
    with pytest.raises(MultilaneError, match=r"model 'a'.*closed"):
        await pool.generate("a", HI, SHORT)
    assert planner.loads("a") == 1
    assert all(engine.closed for engine in planner.engines["a"])


async def test_close_waits_for_a_load_in_progress_and_closes_its_engine() -> None:
    # As after an engine death: a queued call is reloading the lane when the runtime closes.
    gate = anyio.Event()
    planner = Planner({"a": 100}, load_gate=gate, max_loads=5)
    pool = make_pool(planner, {"a": 300.0})
    failures: list[Exception] = []

    async def call() -> None:
        try:
            await pool.generate("a", HI, SHORT)
        except MultilaneError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()  # the load waits for the gate
        closed = anyio.Event()

        async def close() -> None:
            await pool.close()
            closed.set()

        tg.start_soon(close)
        await anyio.wait_all_tasks_blocked()
        assert not closed.is_set()  # close waits for the load rather than leave its engine behind
        gate.set()

    assert planner.loads("a") == 1
    assert planner.engine("a").closed
    assert len(failures) == 1 and "closed" in str(failures[0])
    assert pool.ps() == [] and pool.usage()["used_bytes"] == 0


async def test_drain_refuses_waiting_calls_at_once_while_running_calls_finish() -> None:
    planner = Planner({"a": 100}, parallel=1, max_loads=5)
    pool = make_pool(planner, {"a": 300.0})
    failures: list[Exception] = []

    async def queued(i: int) -> None:
        try:
            await pool.generate("a", [{"role": "user", "content": f"queued {i}"}], SHORT)
        except MultilaneError as exc:
            failures.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with running(pool, "a") as stream:
                for i in range(3):
                    tg.start_soon(queued, i)
                await anyio.wait_all_tasks_blocked()
                assert row(pool, "a")["queued"] == 3

                assert pool.drain() == 3
                await anyio.wait_all_tasks_blocked()
                assert len(failures) == 3  # at once: the running call still holds its slot
                assert row(pool, "a")["queued"] == 0 and row(pool, "a")["busy"] == 1
                with pytest.raises(RuntimeClosedError, match=r"model 'a'.*shutting down.*retry"):
                    await pool.generate("a", HI, SHORT)
                rest = [chunk.text async for chunk in stream]

    assert rest == ["reply"]  # the running call finished
    assert all(isinstance(exc, RuntimeClosedError) and "shutting down" in str(exc) for exc in failures)
    assert [record.prompt for record in planner.engine("a").calls] == ["<user>hi\n<assistant>"]
    assert row(pool, "a")["busy"] == 0 and pool.draining
    await pool.close()
    assert planner.loads("a") == 1 and planner.engine("a").closed


async def test_drain_refuses_a_call_that_was_preparing_its_prompt_before_it_takes_a_slot() -> None:
    gate = anyio.Event()
    planner = Planner({"a": 100}, make_engine=lambda: PreparingEngine(gate), max_loads=5)
    pool = make_pool(planner, {"a": 300.0})
    failures: list[Exception] = []

    async def call() -> None:
        try:
            await pool.generate("a", HI, SHORT)
        except RuntimeClosedError as exc:
            failures.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await until(lambda: planner.loads("a") == 1)
            await cast(PreparingEngine, planner.engine("a")).preparing.wait()
            assert pool.drain() == 0  # it was not waiting for a slot yet
            gate.set()

    assert len(failures) == 1 and "shutting down" in str(failures[0])
    assert planner.engine("a").calls == []
    assert row(pool, "a")["busy"] == 0


async def _load_waits_for_the_old_engine_to_close(release: Callable[[Pool], Awaitable[object]]) -> None:
    gate = anyio.Event()
    planner = Planner({"a": 100, "b": 100}, make_engine=lambda: SlowClosing(gate))
    pool = make_pool(planner, {"a": 300.0, "b": 300.0}, budget=150)
    await pool.generate("a", HI, SHORT)
    old = cast(SlowClosing, planner.engine("a"))

    async with anyio.create_task_group() as tg:
        try:
            tg.start_soon(release, pool)
            await old.closing.wait()
            tg.start_soon(pool.generate, "b", HI, SHORT)
            await anyio.wait_all_tasks_blocked()
            assert planner.loads("b") == 0  # a still holds its memory: b must wait for its close
            assert pool.usage()["used_bytes"] == 100
        finally:
            gate.set()  # (a failed check must not leave the close waiting for ever)

    assert old.closed
    assert planner.loads("b") == 1
    assert loaded_names(pool) == ["b"] and pool.usage()["used_bytes"] == 100


async def test_unload_keeps_the_lane_on_the_books_until_its_engine_has_closed() -> None:
    await _load_waits_for_the_old_engine_to_close(lambda pool: pool.unload("a"))


async def test_a_dead_engine_keeps_its_memory_counted_until_it_has_closed() -> None:
    async def die(pool: Pool) -> None:
        lane = pool.loaded("a")
        assert lane is not None
        await pool.drop(lane, reason="engine died")

    await _load_waits_for_the_old_engine_to_close(die)


# ---- the public surface the server and runtime use


async def test_load_with_a_keep_alive_starts_the_lanes_idle_clock_with_it() -> None:
    clock = FakeClock()
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 300.0}, clock=clock)

    lane = await pool.load("a", keep_alive=10.0)
    assert lane.keep_alive == 10.0 and lane.expires_at == clock.now + 10.0
    clock.advance(11)
    await pool.reap()
    assert pool.ps() == []

    lane = await pool.load("a", keep_alive=None)  # pinned, as Ollama's keep_alive -1
    clock.advance(10**6)
    await pool.reap()
    assert lane.pinned and loaded_names(pool) == ["a"]


async def test_count_tokens_uses_the_models_own_tokenizer_and_holds_the_lane_meanwhile() -> None:
    planner = Planner({"a": 100})
    pool = make_pool(planner, {"a": 0.0}, clock=FakeClock())

    assert await pool.count_tokens("a", ["one two three", "four"]) == 4
    assert planner.loads("a") == 1
    await pool.reap()  # keep_alive 0: unloaded once the count is done
    assert pool.ps() == []
