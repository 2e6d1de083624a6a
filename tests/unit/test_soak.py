"""A fault soak of the pool on fake engines: thousands of seeded random operations, invariants after each step.

Calls of random lengths, cancels at random points, per-call keep_alive (0 included), loads, unloads,
evictions by the cap and by the budget, engine deaths, keep-alive expiry on a fake clock, and a close in
the middle. Time is a ticker the soak advances by hand: every engine token, embed and load waits for the
next tick, so a seed always plays out the same way and nothing depends on the wall clock.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest

from multilane.engines.base import SamplingOptions
from multilane.errors import MultilaneError, RuntimeClosedError
from multilane.lanes import UNSET, Engine, LanePlan, Pool
from multilane.testing import FakeEmbeddingEngine, FakeGenerateEngine

pytestmark = pytest.mark.anyio

SEEDS = [3, 17, 29, 41, 58, 73, 88, 97]
STEPS = 800  # per seed, in two phases: about 600 calls and pool operations each, besides cancels and deaths
GENERATE = {"g0": 200, "g1": 300, "g2": 150, "g3": 250}  # model -> weights cost
EMBEDDING = {"e0": 60}
BUDGET = 700  # fits two or three of the generate models: loads must evict by budget
MAX_LOADED = 3  # and by the cap
PARALLEL = 2
MAX_QUEUE = 3
CONTEXT = 48
LOAD_TICKS = 3
SETTLE_ROUNDS = 25
KEEP_ALIVES: list[Any] = [UNSET, UNSET, 0.0, 5.0, 60.0]  # per call: none given, unload when idle, seconds


class Ticker:
    """The soak's clock: whatever waits on it moves one step when the soak ticks."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._free = False

    async def wait(self) -> None:
        if self._free:
            await anyio.lowlevel.checkpoint()
        else:
            await self._event.wait()

    def tick(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    def run_free(self) -> None:
        """Stop pacing (after a failed check), so that shielded closes and loads can finish and the test end."""
        self._free = True
        self._event.set()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Loaded:
    name: str
    cost: int
    engine: FakeGenerateEngine | FakeEmbeddingEngine


class SoakPlanner:
    """Plans fake lanes whose loads take a few ticks; records every engine and how many loads overlapped."""

    def __init__(self, ticker: Ticker) -> None:
        self.ticker = ticker
        self.loaded: list[Loaded] = []
        self.loading = 0
        self.max_loading = 0

    async def __call__(self, name: str) -> LanePlan:
        kind = "embedding" if name in EMBEDDING else "generate"
        cost = {**GENERATE, **EMBEDDING}[name]

        async def load() -> Engine:
            self.loading += 1
            self.max_loading = max(self.max_loading, self.loading)
            try:
                for _ in range(LOAD_TICKS):
                    await self.ticker.wait()
                engine: FakeGenerateEngine | FakeEmbeddingEngine = (
                    FakeEmbeddingEngine(pace=self.ticker.wait) if kind == "embedding"
                    else FakeGenerateEngine(" ".join(f"w{i}" for i in range(40)), context=CONTEXT,
                                            pace=self.ticker.wait))
                self.loaded.append(Loaded(name, cost, engine))
                return engine
            finally:
                self.loading -= 1

        return LanePlan(key=name, kind=kind, source=f"fake:{name}", load=load, weights_bytes=cost,
                        parallel=PARALLEL, context=CONTEXT if kind == "generate" else None)

    def open_engines(self) -> list[Loaded]:
        return [item for item in self.loaded if not item.engine.closed]


@dataclass
class Op:
    """One call or pool operation started by the soak, and how it ended."""

    what: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    cancel_at: int | None = None
    outcome: str | None = None  # "ok", "cancelled", or the name of the MultilaneError it ended with


class Soak:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ticker = Ticker()
        self.clock = FakeClock()
        self.planner = SoakPlanner(self.ticker)
        keep = {name: self.rng.choice([0.0, 10.0, 30.0]) for name in GENERATE}
        keep["e0"] = 30.0
        self.pool = Pool(self.planner, models={name: ("embedding" if name in EMBEDDING else "generate", seconds)
                                               for name, seconds in keep.items()},
                         budget_bytes=BUDGET, max_loaded=MAX_LOADED, max_queue=MAX_QUEUE, clock=self.clock)
        self.ops: list[Op] = []
        self.step = 0
        self.closed_done = False

    # ---- operations

    async def _run(self, op: Op, action: Callable[[], Any]) -> None:
        with op.scope:
            try:
                await action()
                op.outcome = "ok"
            except MultilaneError as exc:
                op.outcome = type(exc).__name__
            except Exception as exc:  # anything else is a call lost to a bug
                op.outcome = f"LOST {type(exc).__name__}: {exc}"
        if op.outcome is None:
            op.outcome = "cancelled"

    def start(self, tg: anyio.abc.TaskGroup, what: str, action: Callable[[], Any], *,
              cancellable: bool = False) -> None:
        op = Op(what, cancel_at=self.step + self.rng.randint(0, 25) if cancellable and self.rng.random() < 0.3
                else None)
        self.ops.append(op)
        tg.start_soon(self._run, op, action)

    def random_op(self, tg: anyio.abc.TaskGroup) -> None:
        rng, pool = self.rng, self.pool
        roll = rng.random()
        model = rng.choice(list(GENERATE))
        if roll < 0.40:
            words = rng.randint(1, 40)
            prompt = [{"role": "user", "content": " ".join(f"p{i}" for i in range(words))}]
            options = SamplingOptions(max_tokens=rng.randint(1, 20))
            keep_alive, truncate = rng.choice(KEEP_ALIVES), rng.random() < 0.3
            if rng.random() < 0.5:
                self.start(tg, f"generate {model}", lambda: pool.generate(
                    model, prompt, options, truncate=truncate, keep_alive=keep_alive), cancellable=True)
            else:
                leave_after = rng.randint(1, 10)

                async def stream_part() -> None:  # a client that hangs up after a few tokens
                    async with aclosing(pool.stream(model, prompt, options, truncate=truncate,
                                                    keep_alive=keep_alive)) as chunks:
                        seen = 0
                        async for _ in chunks:
                            seen += 1
                            if seen >= leave_after:
                                break

                self.start(tg, f"stream {model}", stream_part, cancellable=True)
        elif roll < 0.52:
            texts = [f"text {i}" for i in range(rng.randint(1, 4))]
            self.start(tg, "embed e0", lambda: pool.embed("e0", texts, keep_alive=rng.choice(KEEP_ALIVES)),
                       cancellable=True)
        elif roll < 0.60:
            live = [op for op in self.ops if op.outcome is None]
            if live:
                rng.choice(live).scope.cancel()
        elif roll < 0.70:
            self.clock.now += rng.choice([0.0, 1.0, 6.0, 15.0, 40.0])
            self.start(tg, "reap", pool.reap)
        elif roll < 0.74:
            loaded = [item for item in self.planner.loaded if not item.engine.closed]
            if loaded:
                rng.choice(loaded).engine.kill()
        elif roll < 0.80:
            self.start(tg, f"unload {model}", lambda: pool.unload(model))
        elif roll < 0.86:
            name = rng.choice([*GENERATE, *EMBEDDING])
            self.start(tg, f"load {name}", lambda: pool.load(name, keep_alive=rng.choice(KEEP_ALIVES)),
                       cancellable=True)
        # else: a quiet step

    # ---- checks

    def check(self) -> None:
        """The invariants that hold between any two steps."""
        pool, planner = self.pool, self.planner
        assert planner.max_loading <= 1, "two loads at once"
        usage = pool.usage()
        open_engines = planner.open_engines()
        assert usage["used_bytes"] == sum(item.cost for item in open_engines), \
            f"the books ({usage['used_bytes']}) differ from the open engines {[i.name for i in open_engines]}"
        assert usage["used_bytes"] <= BUDGET and usage["loaded"] <= MAX_LOADED
        assert usage["loaded"] == len(open_engines)  # a retired lane stays on the books until its engine closed
        rows = pool.ps()
        for row in rows:
            assert 0 <= row["busy"] <= row["slots"] == PARALLEL and 0 <= row["queued"] <= MAX_QUEUE
            lane = pool.loaded(row["name"])
            assert lane is not None
            engine = lane.engine
            if isinstance(engine, FakeGenerateEngine):
                assert engine.unfinished_requests() <= lane.busy
        lost = [op for op in self.ops if op.outcome is not None and op.outcome.startswith("LOST")]
        assert not lost, lost
        if self.closed_done:
            assert open_engines == [], "an engine is open after close"
            assert pool.ps() == [] and usage["used_bytes"] == 0

    async def advance(self) -> None:
        """One step: cancel what is due, move every engine and load one tick, let everything settle, check."""
        for op in self.ops:
            if op.outcome is None and op.cancel_at is not None and op.cancel_at <= self.step:
                op.scope.cancel()
        self.ticker.tick()
        # Let every task run until it waits for the next tick. (anyio.wait_all_tasks_blocked polls every 0.1 s
        # while any task can run; a few rounds of the scheduler settle a step as well, a hundred times faster.
        # The invariants hold at any scheduling point, settled or not.)
        for _ in range(SETTLE_ROUNDS):
            await anyio.lowlevel.checkpoint()
        self.step += 1
        self.check()

    async def drain(self) -> None:
        """Tick until every call and operation has ended."""
        for _ in range(2000):
            if all(op.outcome is not None for op in self.ops):
                return
            await self.advance()
        pending = [op.what for op in self.ops if op.outcome is None]
        raise AssertionError(f"{len(pending)} calls never ended: {pending[:10]}")


async def play(soak: Soak, tg: anyio.abc.TaskGroup) -> Op:
    """Both phases of one seed; returns the close."""
    pool = soak.pool
    for _ in range(STEPS // 2):  # phase 1: everything at random
        soak.random_op(tg)
        await soak.advance()
    await soak.drain()  # every call ends, and the lanes come to rest
    for row in pool.ps():
        assert row["busy"] == 0 and row["queued"] == 0, row
    for item in soak.planner.open_engines():
        if isinstance(item.engine, FakeGenerateEngine):
            assert item.engine.unfinished_requests() == 0

    close_at = soak.rng.randint(STEPS // 8, STEPS // 4)
    closing = Op("close")
    for i in range(STEPS // 2):  # phase 2: the same, with a close in the middle
        soak.random_op(tg)
        if i == close_at:
            soak.ops.append(closing)
            tg.start_soon(soak._run, closing, pool.close)
        await soak.advance()
        if closing.outcome == "ok":
            soak.closed_done = True
    await soak.drain()
    soak.closed_done = True
    soak.check()
    return closing


async def test_the_pool_keeps_its_invariants_through_a_seeded_fault_soak() -> None:
    totals: Counter[str] = Counter()
    for seed in SEEDS:
        soak = Soak(seed)
        async with anyio.create_task_group() as tg:
            try:
                closing = await play(soak, tg)
            except BaseException:
                soak.ticker.run_free()  # let shielded loads and closes finish, so that the failure shows
                raise

        outcomes = Counter(op.outcome for op in soak.ops)
        assert None not in outcomes
        after_close = [op for op in soak.ops[soak.ops.index(closing) + 1:]
                       if op.what.split()[0] in ("generate", "stream", "embed", "load")]
        assert all(op.outcome in (RuntimeClosedError.__name__, "cancelled") for op in after_close), \
            Counter(op.outcome for op in after_close)
        totals.update(op.outcome for op in soak.ops)
        totals["loads"] += len(soak.planner.loaded)
        totals["evictions"] += sum(m.evictions for m in soak.pool.metrics.values())
        totals["deaths"] += sum(1 for item in soak.planner.loaded if getattr(item.engine, "dead", False))
        totals["ops"] += len(soak.ops)

    # The soak exercised what it claims to: every kind of ending happened somewhere.
    assert totals["ops"] > 4000, totals
    for outcome in ("ok", "cancelled", "QueueFullError", "EngineDeadError", "MemoryBudgetError",
                    "ContextLengthError", "RuntimeClosedError"):
        assert totals[outcome] > 0, (outcome, totals)
    assert totals["evictions"] > 0 and totals["deaths"] > 0 and totals["loads"] > 20, totals
