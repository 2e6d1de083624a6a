from __future__ import annotations

import asyncio
import math
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskGroup

from multilane.batching import BatchError, BatchStats, MicroBatcher
from multilane.errors import MultilaneError


class Recorder:
    """A batched function that multiplies by ten and records every batch it was called with."""

    def __init__(self, gate: anyio.Event | None = None) -> None:
        self.calls: list[list[int]] = []
        self.started = anyio.Event()
        self.gate = gate

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.calls.append(list(items))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return [item * 10 for item in items]

    @property
    def sizes(self) -> list[int]:
        return [len(call) for call in self.calls]


async def _gather(batcher: MicroBatcher[int, int], items: list[int]) -> dict[int, int | BaseException]:
    """Submit each item from its own task and return each caller's result or exception."""
    outcomes: dict[int, int | BaseException] = {}

    async def call(item: int) -> None:
        try:
            outcomes[item] = await batcher.submit(item)
        except Exception as exc:
            outcomes[item] = exc

    async with anyio.create_task_group() as tg:
        for item in items:
            tg.start_soon(call, item)
    return outcomes


class Callers:
    """Callers started one by one, each in its own cancel scope so a test can cancel exactly one of them."""

    def __init__(self, batcher: MicroBatcher[int, int], tg: TaskGroup) -> None:
        self.batcher = batcher
        self.tg = tg
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.results: dict[int, int] = {}

    async def start(self, item: int) -> None:
        self.scopes[item] = anyio.CancelScope()
        self.tg.start_soon(self._call, item)
        await anyio.wait_all_tasks_blocked()  # the caller has joined its batch and is waiting

    async def _call(self, item: int) -> None:
        with self.scopes[item]:
            self.results[item] = await self.batcher.submit(item)


@pytest.mark.anyio
async def test_concurrent_submits_within_max_wait_make_one_call() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=64, max_wait=0.05)
    outcomes = await _gather(batcher, list(range(5)))
    assert fn.calls == [[0, 1, 2, 3, 4]]
    assert outcomes == {i: i * 10 for i in range(5)}


@pytest.mark.virtual_clock
@pytest.mark.anyio
async def test_batch_closes_early_when_it_reaches_max_batch_size() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=4, max_wait=60.0)
    start = anyio.current_time()
    await _gather(batcher, list(range(8)))
    assert anyio.current_time() == start  # full batches never wait for max_wait (virtual seconds)
    assert fn.sizes == [4, 4]


@pytest.mark.anyio
async def test_ten_submits_with_max_batch_size_four_run_as_four_four_two() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=4, max_wait=0.05)
    outcomes = await _gather(batcher, list(range(10)))
    assert fn.sizes == [4, 4, 2]
    assert sorted(item for call in fn.calls for item in call) == list(range(10))
    assert outcomes == {i: i * 10 for i in range(10)}


@pytest.mark.virtual_clock
@pytest.mark.anyio
async def test_lone_submit_runs_alone_after_max_wait() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_wait=0.05)
    start = anyio.current_time()
    assert await batcher.submit(7) == 70
    assert anyio.current_time() - start == pytest.approx(0.05)  # virtual seconds: exactly max_wait, no more
    assert fn.calls == [[7]]


@pytest.mark.virtual_clock
@pytest.mark.anyio
async def test_a_submit_within_max_wait_joins_the_batch_and_one_after_it_starts_the_next() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_wait=0.05)

    async def submit_at(when: float, item: int) -> None:
        await anyio.sleep(when)
        await batcher.submit(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(submit_at, 0, 1)
        tg.start_soon(submit_at, 0.049, 2)
        tg.start_soon(submit_at, 0.051, 3)
    assert fn.calls == [[1, 2], [3]]


@pytest.mark.anyio
async def test_zero_max_wait_still_answers_every_caller() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_wait=0)
    outcomes = await _gather(batcher, list(range(6)))
    assert outcomes == {i: i * 10 for i in range(6)}
    assert sum(fn.sizes) == 6


@pytest.mark.anyio
async def test_each_caller_gets_its_own_result() -> None:
    async def shuffled(items: list[int]) -> list[int | Exception]:
        await anyio.lowlevel.checkpoint()
        return [item * 10 for item in items]

    batcher = MicroBatcher(shuffled, max_batch_size=7, max_wait=0.01)
    outcomes = await _gather(batcher, list(range(30)))
    assert outcomes == {i: i * 10 for i in range(30)}


@pytest.mark.anyio
async def test_submit_many_keeps_a_callers_items_together_and_in_order() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=16, max_wait=0.05)
    results: dict[str, object] = {}

    async def one() -> None:
        results["one"] = await batcher.submit(1)

    async def many() -> None:
        results["many"] = await batcher.submit_many([5, 4, 3])

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(many)
    assert fn.calls == [[1, 5, 4, 3]]
    assert results == {"one": 10, "many": [50, 40, 30]}


@pytest.mark.anyio
async def test_submit_many_larger_than_max_batch_size_is_split_in_order() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=4, max_wait=0.01)
    assert await batcher.submit_many(list(range(10))) == [i * 10 for i in range(10)]
    assert fn.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.anyio
async def test_submit_many_that_does_not_fit_starts_a_new_batch() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=4, max_wait=0.05)
    results: dict[str, object] = {}

    async def pair(name: str, items: list[int]) -> None:
        results[name] = await batcher.submit_many(items)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pair, "a", [1, 2, 3])
        tg.start_soon(pair, "b", [4, 5])
    assert sorted(fn.calls) == [[1, 2, 3], [4, 5]]
    assert results == {"a": [10, 20, 30], "b": [40, 50]}


@pytest.mark.anyio
async def test_submit_many_of_nothing_returns_nothing_without_calling_fn() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn)
    assert await batcher.submit_many([]) == []
    assert fn.calls == []


@pytest.mark.anyio
async def test_validate_rejects_a_bad_item_at_submit_time_and_spares_the_others() -> None:
    def no_negatives(item: int) -> None:
        if item < 0:
            raise ValueError(f"negative item {item}")

    fn = Recorder()
    batcher = MicroBatcher(fn, max_wait=0.05, validate=no_negatives)
    outcomes = await _gather(batcher, [1, -1, 2])
    assert isinstance(outcomes[-1], ValueError)
    assert str(outcomes[-1]) == "negative item -1"
    assert outcomes[1] == 10
    assert outcomes[2] == 20
    assert fn.calls == [[1, 2]]
    with pytest.raises(ValueError, match="negative item -3"):
        await batcher.submit_many([3, -3])
    assert fn.calls == [[1, 2]]


@pytest.mark.anyio
async def test_fn_raising_fails_every_caller_of_that_batch_and_the_next_batch_works() -> None:
    calls: list[list[int]] = []

    async def broken(items: list[int]) -> list[int | Exception]:
        calls.append(items)
        if len(calls) == 1:
            raise ConnectionError("engine went away")
        return [item * 10 for item in items]

    batcher = MicroBatcher(broken, max_wait=0.05)
    outcomes = await _gather(batcher, [1, 2, 3])
    assert len(calls) == 1
    assert all(isinstance(outcome, ConnectionError) for outcome in outcomes.values())
    assert await batcher.submit(4) == 40


@pytest.mark.anyio
async def test_exception_in_an_items_slot_fails_that_caller_alone() -> None:
    async def picky(items: list[int]) -> list[int | Exception]:
        return [ValueError(f"bad {item}") if item == 13 else item * 10 for item in items]

    batcher = MicroBatcher(picky, max_wait=0.05)
    outcomes = await _gather(batcher, [12, 13, 14])
    assert outcomes[12] == 120
    assert outcomes[14] == 140
    assert isinstance(outcomes[13], ValueError)
    assert str(outcomes[13]) == "bad 13"
    with pytest.raises(ValueError, match="bad 13"):
        await batcher.submit_many([1, 13, 2])


@pytest.mark.anyio
async def test_wrong_number_of_results_fails_every_caller_with_an_error_naming_the_batcher() -> None:
    async def short(items: list[int]) -> list[int]:
        return [item * 10 for item in items][:-1]

    batcher = MicroBatcher(short, max_wait=0.05, name="embedder")
    outcomes = await _gather(batcher, [1, 2, 3])
    for outcome in outcomes.values():
        assert isinstance(outcome, BatchError)
        assert isinstance(outcome, RuntimeError)
        assert isinstance(outcome, MultilaneError)
        assert "batcher 'embedder'" in str(outcome)
        assert "2 results for 3 items" in str(outcome)


@pytest.mark.anyio
async def test_caller_cancelled_before_dispatch_is_removed_from_its_batch() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=3, max_wait=60.0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = Callers(batcher, tg)
            for item in (1, 2, 3):
                await callers.start(item)
                if item == 2:
                    callers.scopes[2].cancel()
                    await anyio.wait_all_tasks_blocked()
            await callers.start(4)
    assert fn.calls == [[1, 3, 4]]
    assert callers.results == {1: 10, 3: 30, 4: 40}
    assert callers.scopes[2].cancelled_caught


@pytest.mark.anyio
async def test_cancelled_leader_hands_over_and_the_batch_still_fills_and_runs() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=3, max_wait=60.0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = Callers(batcher, tg)
            await callers.start(1)  # the first caller leads the batch
            await callers.start(2)
            callers.scopes[1].cancel()
            await anyio.wait_all_tasks_blocked()
            await callers.start(3)
            await callers.start(4)  # the batch is full again: whoever leads now must dispatch it
    assert fn.calls == [[2, 3, 4]]
    assert callers.results == {2: 20, 3: 30, 4: 40}


@pytest.mark.anyio
async def test_cancelled_leader_does_not_strand_the_others_when_max_wait_runs_out() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=64, max_wait=0.5)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = Callers(batcher, tg)
            for item in (1, 2, 3):
                await callers.start(item)
            callers.scopes[1].cancel()
    assert fn.calls == [[2, 3]]
    assert callers.results == {2: 20, 3: 30}


@pytest.mark.anyio
async def test_last_caller_cancelled_leaves_a_fresh_batch_for_the_next_one() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_wait=60.0, max_batch_size=2)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = Callers(batcher, tg)
            await callers.start(1)
            callers.scopes[1].cancel()
            await anyio.wait_all_tasks_blocked()
            await callers.start(2)
            await callers.start(3)
    assert fn.calls == [[2, 3]]


@pytest.mark.anyio
async def test_caller_cancelled_while_its_batch_runs_does_not_disturb_the_others() -> None:
    gate = anyio.Event()
    fn = Recorder(gate)
    batcher = MicroBatcher(fn, max_batch_size=3, max_wait=60.0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = Callers(batcher, tg)
            for item in (1, 2, 3):
                await callers.start(item)
            await fn.started.wait()
            callers.scopes[2].cancel()
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert fn.calls == [[1, 2, 3]]
    assert callers.results == {1: 10, 3: 30}
    assert callers.scopes[2].cancelled_caught


@pytest.mark.anyio
async def test_leader_cancelled_while_fn_runs_still_delivers_results_then_is_cancelled() -> None:
    gate = anyio.Event()
    fn = Recorder(gate)
    batcher = MicroBatcher(fn, max_batch_size=3, max_wait=60.0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            callers = Callers(batcher, tg)
            for item in (1, 2, 3):
                await callers.start(item)
            await fn.started.wait()
            callers.scopes[1].cancel()  # caller 1 leads and is running fn
            await anyio.wait_all_tasks_blocked()
            gate.set()
    assert fn.calls == [[1, 2, 3]]
    assert callers.results == {2: 20, 3: 30}
    assert callers.scopes[1].cancelled_caught


@pytest.mark.anyio
async def test_cancelled_submit_many_leaves_no_items_behind() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=4, max_wait=0.1)
    results: list[int] = []

    async def many() -> None:
        with anyio.move_on_after(0.01):
            await batcher.submit_many([1, 2])
        results.extend(await batcher.submit_many([3, 4]))

    with anyio.fail_after(5):
        await many()
    assert fn.calls == [[3, 4]]
    assert results == [30, 40]


@pytest.mark.anyio
async def test_nothing_is_left_running_after_all_callers_return() -> None:
    before = asyncio.all_tasks()
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=3, max_wait=0.01)
    await _gather(batcher, list(range(7)))
    await batcher.submit_many(list(range(5)))
    assert asyncio.all_tasks() == before


@pytest.mark.anyio
async def test_stats_count_batches_items_and_sizes() -> None:
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=4, max_wait=0.05)
    assert batcher.stats() == BatchStats(batches=0, items=0, largest_batch=0, mean_batch_size=0.0)
    await _gather(batcher, list(range(10)))
    stats = batcher.stats()
    assert (stats.batches, stats.items, stats.largest_batch) == (3, 10, 4)
    assert math.isclose(stats.mean_batch_size, 10 / 3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
    ({"max_wait": -1.0}, "max_wait must be a number of seconds >= 0"),
    ({"max_wait": math.nan}, "max_wait must be a number of seconds >= 0"),
])
def test_bad_settings_are_rejected_with_the_batcher_name(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        MicroBatcher(Recorder(), name="rerank", **kwargs)
    assert "batcher 'rerank'" in str(info.value)
