"""Lanes and the pool: resident models within a memory budget, parallel slots and a bounded FIFO queue.

A lane is one loaded model. Calls take one of its `parallel` slots or wait in its FIFO queue; past
`max_queue` waiting calls a call is refused at once. The pool loads lanes on demand, one load at a time,
shares a lane between declared models with the same weights and settings, evicts idle lanes (soonest
expiry first) to make room, unloads lanes whose keep-alive ran out, and refuses, with the arithmetic,
a load that cannot fit.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import structlog

from multilane.durations import format_duration
from multilane.engines.base import (
    Chunk,
    Completion,
    EmbeddingEngine,
    GenerateEngine,
    Message,
    PreparingEngine,
    SamplingOptions,
    TokenizingEngine,
    collect,
)
from multilane.errors import (
    ContextLengthError,
    EngineDeadError,
    EngineError,
    MemoryBudgetError,
    QueueFullError,
    UnknownNameError,
)
from multilane.memory import KVPlan, format_bytes

log = structlog.get_logger(__name__)

Engine = GenerateEngine | EmbeddingEngine


class _Unset:
    pass


UNSET: Any = _Unset()
"""Marks a per-call keep_alive that was not given (None means pinned, so it cannot mark absence)."""


@dataclass(frozen=True)
class LanePlan:
    """What loading a declared model costs and how to load it; models with equal keys share one lane."""

    key: Hashable
    kind: str  # "generate" | "embedding"
    source: str
    load: Callable[[], Awaitable[Engine]]
    weights_bytes: int = 0
    kv: KVPlan | None = None  # the KV cache the engine gets, in its own blocks
    parallel: int = 1
    context: int | None = None
    dtype: str | None = None  # the dtype the engine computes in, when Multilane chooses it

    @property
    def kv_bytes(self) -> int:
        """The KV cache the engine gets."""
        return self.kv.bytes if self.kv is not None else 0

    @property
    def cost(self) -> int:
        """Weights plus KV cache."""
        return self.weights_bytes + self.kv_bytes

    def arithmetic(self) -> str:
        """The cost spelled out, for error messages and ps."""
        text = f"weights {format_bytes(self.weights_bytes)}"
        if self.kv is not None and self.kv.bytes:
            text += f" + {self.kv.arithmetic()}"
        return text


Planner = Callable[[str], Awaitable[LanePlan]]
"""Plans the lane of a declared model, given its name."""

RequestObserver = Callable[[str, float | None, float], None]
"""Told of each finished call: (declared model, seconds to its first token or None, seconds in all, queue included)."""


@dataclass(frozen=True)
class Prepared:
    """A prompt ready for a lane's engine (token ids, or what a remote engine prepared), and its token count."""

    payload: Any
    tokens: int | None


@dataclass
class LaneMetrics:
    """Counters of one declared model's lane, kept across its loads and evictions."""

    loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0
    requests: int = 0
    rejected: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _LaneClosed(Exception):
    """The lane was unloaded between finding it and taking a slot; the pool looks it up again."""


@dataclass
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    granted: bool = False
    closed: bool = False


class Lane:
    """One resident model: its engine, its parallel slots and its FIFO queue of waiting calls."""

    def __init__(self, plan: LanePlan, engine: Engine, *, name: str, keep_alive: float | None,
                 max_queue: int, pool: Pool, load_seconds: float) -> None:
        self.plan = plan
        self.engine = engine
        self.name = name
        self.names: list[str] = [name]
        self.kind = plan.kind
        self.parallel = plan.parallel
        self.keep_alive = keep_alive
        self.max_queue = max_queue
        self.loaded_at = time.time()
        self.load_seconds = load_seconds
        self.busy = 0
        self.holds = 0  # users that need the lane kept (an index build) without taking a slot
        self.expires_at: float | None = None  # monotonic; None while busy or when pinned
        self.closed = False
        self._queue: deque[_Waiter] = deque()
        self._pool = pool

    @property
    def queued(self) -> int:
        """Calls waiting for a slot."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing running, waiting or holding it: the lane may be unloaded."""
        return self.busy == 0 and not self._queue and self.holds == 0

    @property
    def pinned(self) -> bool:
        """A pinned lane (keep_alive -1) is never evicted."""
        return self.keep_alive is None

    async def acquire(self, keep_alive: float | None = UNSET) -> None:
        """Take a slot, or wait for one in FIFO order; refuse at once when the queue is full."""
        if self.closed:
            raise _LaneClosed
        free = self.busy < self.parallel and not self._queue
        if not free and len(self._queue) >= self.max_queue:
            self._pool.metrics[self.name].rejected += 1
            raise QueueFullError(f"lane '{self.name}' queue is full ({len(self._queue)} waiting, "
                                 f"{self.busy} of {self.parallel} slots busy); retry later or raise "
                                 "runtime.max_queue")
        if keep_alive is not UNSET:
            self.keep_alive = keep_alive  # the latest admitted call's keep_alive decides, as in Ollama
        self.expires_at = None
        if free:
            self.busy += 1
            return
        waiter = _Waiter()
        self._queue.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # the slot was handed over as we were cancelled: pass it on
                self.release()
            elif not waiter.closed:
                self._queue.remove(waiter)
                self._pool.lane_changed(self)
            raise
        if waiter.closed:
            raise _LaneClosed

    def release(self) -> None:
        """Free a slot: hand it straight to the longest waiter, or start the idle clock."""
        if self._queue:
            waiter = self._queue.popleft()
            waiter.granted = True
            waiter.event.set()
            return
        self.busy -= 1
        self._pool.lane_changed(self)

    def _close_queue(self) -> None:
        """Wake every waiter so that it retries on a new lane (used when the engine died)."""
        while self._queue:
            waiter = self._queue.popleft()
            waiter.closed = True
            waiter.event.set()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[Lane]:
        """Keep the lane loaded for a while without taking a slot."""
        self.holds += 1
        self.expires_at = None
        try:
            yield self
        finally:
            self.holds -= 1
            self._pool.lane_changed(self)

    def _generate_engine(self) -> GenerateEngine:
        if self.kind != "generate" or not isinstance(self.engine, GenerateEngine):
            raise EngineError(f"model '{self.name}' is an embedding model; it cannot generate text")
        return self.engine

    async def prepare(self, messages: Sequence[Message] | str, max_tokens: int, *,
                      truncate: bool = False) -> Prepared:
        """Render and tokenize messages, or take a str as a raw prompt; refuse a prompt that does not fit, or cut it.

        A prompt longer than the context minus max_tokens is an error unless `truncate` keeps its end.
        """
        engine = self._generate_engine()
        if isinstance(engine, PreparingEngine):
            prompt = await engine.prepare(messages, max_tokens, truncate=truncate, model=self.name)
            return Prepared(prompt, prompt.tokens)
        if not isinstance(engine, TokenizingEngine):
            raise EngineError(f"model '{self.name}': its engine has neither a tokenizer nor a prepare method")
        ids = engine.encode(messages if isinstance(messages, str) else engine.render(messages))
        room = engine.context - max_tokens
        if len(ids) > room:
            if not truncate or room <= 0:
                raise ContextLengthError(
                    f"model '{self.name}': prompt of {len(ids)} tokens + max_tokens {max_tokens} = "
                    f"{len(ids) + max_tokens} tokens, more than its context of {engine.context} tokens; shorten the "
                    "prompt, lower max_tokens, raise the model's context, or set truncate: true")
            log.warning("prompt truncated", model=self.name, tokens=len(ids), kept=room)
            ids = ids[len(ids) - room:]  # keep the end: the question and the generation prompt
        return Prepared(ids, len(ids))

    async def _stream_in_slot(self, prompt: Prepared, options: SamplingOptions,
                              model: str, started: float) -> AsyncGenerator[Chunk, None]:
        metrics = self._pool.metrics[model]  # counted under the declared name called, also on a shared lane
        metrics.requests += 1
        prompt_tokens = prompt.tokens or 0
        metrics.prompt_tokens += prompt_tokens
        request_id = f"{self.name}-{self._pool.next_request_id()}"
        chunks = self._generate_engine().stream(prompt.payload, options, request_id)
        first: float | None = None
        try:
            async for chunk in chunks:
                metrics.completion_tokens += chunk.tokens
                if first is None and chunk.tokens:
                    first = time.perf_counter() - started
                yield dataclasses.replace(chunk, prompt_tokens=prompt_tokens)
            self._pool.observe(model, first, time.perf_counter() - started)
        except EngineDeadError:
            metrics.failures += 1
            await self._pool.drop(self, reason="engine died")
            raise
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:  # leaving early aborts the engine request now, before the slot is freed
                await aclose()


class Pool:
    """The lanes loaded now, within a memory budget and a cap; loads on demand, one at a time."""

    def __init__(self, planner: Planner, *, models: dict[str, tuple[str, float | None]],
                 budget_bytes: int | None, max_loaded: int, max_queue: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._planner = planner
        self._models = models  # declared name -> (kind, keep_alive seconds or None when pinned)
        self.budget_bytes = budget_bytes
        self.max_loaded = max_loaded
        self.max_queue = max_queue
        self._clock = clock
        self._lanes: dict[Hashable, Lane] = {}
        self._by_name: dict[str, Lane] = {}
        self._plans: dict[str, LanePlan] = {}
        self._load_lock = anyio.Lock()
        self._wake = anyio.Event()
        self._requests = 0
        self.metrics: dict[str, LaneMetrics] = {name: LaneMetrics() for name in models}
        self.observers: list[RequestObserver] = []  # e.g. the HTTP server's latency histograms

    def observe(self, model: str, first_token: float | None, seconds: float) -> None:
        """Tell the observers that a call finished."""
        for observer in self.observers:
            observer(model, first_token, seconds)

    def next_request_id(self) -> int:
        """A number unique in this pool, for engine request ids."""
        self._requests += 1
        return self._requests

    # ---- finding and loading lanes

    def loaded(self, name: str) -> Lane | None:
        """The lane of a declared model if it is loaded now."""
        return self._by_name.get(name)

    async def lane(self, name: str) -> Lane:
        """The lane of a declared model, loading it first (and evicting idle lanes) if needed."""
        lane = self._by_name.get(name)
        if lane is not None:
            return lane
        if name not in self._models:
            raise UnknownNameError(f"unknown model '{name}' (declared: {', '.join(self._models)})")
        async with self._load_lock:  # one load at a time: loads compete for the same memory and cores
            lane = self._by_name.get(name)
            if lane is None:
                lane = await self._load(name)
        return lane

    async def plan(self, name: str) -> LanePlan:
        """What loading a declared model would cost (its source is resolved, and prepared, once)."""
        if name not in self._models:
            raise UnknownNameError(f"unknown model '{name}' (declared: {', '.join(self._models)})")
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = await self._planner(name)
        return plan

    async def _load(self, name: str) -> Lane:
        plan = await self.plan(name)
        shared = self._lanes.get(plan.key)
        if shared is not None:  # same weights and settings as a loaded lane: share it
            shared.names.append(name)
            self._by_name[name] = shared
            if self._models[name][1] is None:
                shared.keep_alive = None
                shared.expires_at = None  # an idle lane's running expiry would otherwise still reap it
            log.info("lane shared", model=name, lane=shared.name)
            return shared
        await self._make_room(name, plan)
        started = self._clock()
        t0 = time.perf_counter()
        engine = await plan.load()
        seconds = time.perf_counter() - t0
        lane = Lane(plan, engine, name=name, keep_alive=self._models[name][1], max_queue=self.max_queue,
                    pool=self, load_seconds=seconds)
        self._lanes[plan.key] = lane
        self._by_name[name] = lane
        metrics = self.metrics[name]
        metrics.loads += 1
        metrics.load_seconds += seconds
        log.info("lane loaded", model=name, seconds=round(seconds, 2), cost=plan.arithmetic(),
                 started=started)
        self.lane_changed(lane)
        return lane

    def _in_use(self) -> int:
        return sum(lane.plan.cost for lane in self._lanes.values())

    async def _make_room(self, name: str, plan: LanePlan) -> None:
        """Evict idle lanes, soonest expiry first, until the plan fits the budget and the cap; else refuse."""
        budget = self.budget_bytes
        if budget is not None and plan.cost > budget:
            raise MemoryBudgetError(
                f"cannot load model '{name}': it needs {format_bytes(plan.cost)} ({plan.arithmetic()}), more "
                f"than the whole memory budget of {format_bytes(budget)}; raise runtime.memory_budget or lower "
                "the model's parallel or context")

        def fits() -> bool:
            within_budget = budget is None or self._in_use() + plan.cost <= budget
            return within_budget and len(self._lanes) < self.max_loaded

        while not fits():
            candidates = [lane for lane in self._lanes.values() if lane.idle and not lane.pinned]
            if not candidates:
                raise MemoryBudgetError(self._refusal(name, plan))
            victim = min(candidates, key=lambda lane: (lane.expires_at is None, lane.expires_at or 0.0))
            await self._unload(victim, reason="evicted to make room for " + repr(name))
            for victim_name in victim.names:
                self.metrics[victim_name].evictions += 1

    def _refusal(self, name: str, plan: LanePlan) -> str:
        held = ", ".join(
            f"{lane.name} ({'pinned' if lane.pinned else 'busy'}, {format_bytes(lane.plan.cost)})"
            for lane in self._lanes.values())
        if len(self._lanes) >= self.max_loaded:
            return (f"cannot load model '{name}': runtime.max_loaded_models is {self.max_loaded} and every "
                    f"loaded lane is busy or pinned: {held}; retry later, raise runtime.max_loaded_models, or "
                    "unload a model")
        in_use = self._in_use()
        return (f"cannot load model '{name}': it needs {format_bytes(plan.cost)} ({plan.arithmetic()}); the "
                f"budget is {format_bytes(self.budget_bytes or 0)} with {format_bytes(in_use)} in use by lanes "
                f"that cannot be evicted: {held}; {format_bytes(in_use + plan.cost)} would exceed it. Retry "
                "later, raise runtime.memory_budget, lower parallel or context, or unload a model")

    async def unload(self, name: str) -> bool:
        """Unload a model's lane now if idle, else as soon as it goes idle; False if it was not loaded."""
        lane = self._by_name.get(name)
        if lane is None:
            return False
        lane.keep_alive = 0.0
        if lane.idle:
            await self._unload(lane, reason="unloaded on request")
        return True

    async def _unload(self, lane: Lane, *, reason: str) -> None:
        if lane.closed:
            return
        lane.closed = True
        self._lanes.pop(lane.plan.key, None)
        for name in lane.names:
            self._by_name.pop(name, None)
        log.info("lane unloaded", model=lane.name, reason=reason)
        with anyio.CancelScope(shield=True):
            try:
                await lane.engine.close()
            except Exception as exc:  # a failing close must not keep the lane's memory counted
                log.error("engine close failed", model=lane.name, error=str(exc))
        self._wake.set()

    async def drop(self, lane: Lane, *, reason: str) -> None:
        """Drop a lane whose engine died: its waiters retry on a fresh lane, loaded on the next call."""
        if lane.closed:
            return
        log.error("lane dropped", model=lane.name, reason=reason)
        lane._close_queue()
        await self._unload(lane, reason=reason)

    # ---- using lanes

    async def _leased(self, name: str, keep_alive: float | None,
                      check: Callable[[Lane], Awaitable[Any]] | None = None) -> tuple[Lane, Any]:
        """A lane of the model with one of its slots taken (the caller releases it), and what `check` said.

        `check` runs before the call queues, so a request that can never run fails at once.
        """
        while True:
            lane = await self.lane(name)
            checked = await check(lane) if check is not None else None
            try:
                await lane.acquire(keep_alive)
            except _LaneClosed:
                continue  # unloaded under us (idle eviction or engine death): look it up again
            return lane, checked

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[Lane]:
        """Keep a model's lane loaded (not evicted) for the duration, without taking a slot."""
        lane = await self.lane(name)
        async with lane.hold():
            yield lane

    async def stream(self, name: str, messages: Sequence[Message] | str, options: SamplingOptions, *,
                     truncate: bool = False, keep_alive: float | None = UNSET) -> AsyncGenerator[Chunk, None]:
        """Stream a completion from a generate model (a str is a raw prompt); cancelling the consumer aborts it."""
        started = time.perf_counter()
        lane, prompt = await self._leased(
            name, keep_alive, lambda lane: lane.prepare(messages, options.max_tokens, truncate=truncate))
        try:
            async with aclosing(lane._stream_in_slot(prompt, options, name, started)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            lane.release()

    async def generate(self, name: str, messages: Sequence[Message] | str, options: SamplingOptions, *,
                       truncate: bool = False, keep_alive: float | None = UNSET) -> Completion:
        """Generate a whole completion from a generate model (a str is a raw prompt)."""
        return await collect(self.stream(name, messages, options, truncate=truncate, keep_alive=keep_alive))

    async def embed(self, name: str, texts: Sequence[str], *, keep_alive: float | None = UNSET) -> np.ndarray:
        """Embed texts with an embedding model."""
        async def is_embedding(lane: Lane) -> EmbeddingEngine:
            if lane.kind != "embedding" or not isinstance(lane.engine, EmbeddingEngine):
                raise EngineError(f"model '{name}' is a generate model; it cannot embed text")
            return lane.engine

        started = time.perf_counter()
        lane, engine = await self._leased(name, keep_alive, is_embedding)
        try:
            self.metrics[name].requests += 1
            try:
                vectors: np.ndarray = await engine.embed(texts)
                self.observe(name, None, time.perf_counter() - started)
                return vectors
            except EngineDeadError:
                self.metrics[name].failures += 1
                await self.drop(lane, reason="engine died")
                raise
        finally:
            lane.release()

    # ---- keep-alive

    def lane_changed(self, lane: Lane) -> None:
        """Start the idle clock of a lane that just went idle, and wake the reaper."""
        if lane.idle and not lane.closed:
            lane.expires_at = None if lane.keep_alive is None else self._clock() + lane.keep_alive
        self._wake.set()

    async def reap_forever(self) -> None:
        """Unload idle lanes whose keep-alive ran out; runs until cancelled (the runtime's task group)."""
        while True:
            self._wake = anyio.Event()
            await self.reap()
            expiries = [lane.expires_at for lane in self._lanes.values()
                        if lane.idle and lane.expires_at is not None]
            delay = max(0.0, min(expiries) - self._clock()) if expiries else None
            with anyio.move_on_after(delay):
                await self._wake.wait()

    async def reap(self) -> None:
        """Unload every idle lane whose keep-alive has run out."""
        now = self._clock()
        for lane in list(self._lanes.values()):
            if lane.idle and not lane.pinned and lane.expires_at is not None and lane.expires_at <= now:
                async with self._load_lock:  # never unload in the middle of a load's arithmetic
                    if lane.idle and not lane.closed and lane.expires_at is not None and lane.expires_at <= now:
                        await self._unload(lane, reason=f"idle for {format_duration(lane.keep_alive)}")

    # ---- reporting

    def ps(self) -> list[dict[str, Any]]:
        """One row per loaded lane: what `multilane ps` shows."""
        now_wall, now = time.time(), self._clock()
        rows = []
        for lane in self._lanes.values():
            if lane.pinned:
                expires: str | float | None = "forever"
            elif lane.expires_at is None:
                expires = None  # busy: the clock starts when it goes idle
            else:
                expires = now_wall + (lane.expires_at - now)
            kv = lane.plan.kv
            rows.append({
                "name": lane.name, "models": list(lane.names), "source": lane.plan.source, "kind": lane.kind,
                "device": getattr(lane.engine, "device", "cpu"),
                "dtype": getattr(lane.engine, "dtype", None) or lane.plan.dtype,
                "weights_bytes": lane.plan.weights_bytes, "kv_bytes": lane.plan.kv_bytes,
                "kv_blocks": kv.blocks if kv is not None else None,
                "kv_block_size": kv.block_size if kv is not None else None,
                "cost": lane.plan.arithmetic(), "busy": lane.busy, "slots": lane.parallel,
                "queued": lane.queued, "context": lane.plan.context, "loaded_at": lane.loaded_at,
                "expires_at": expires, "keep_alive": format_duration(lane.keep_alive),
            })
        return rows

    def usage(self) -> dict[str, Any]:
        """The budget, what the loaded lanes use of it, and the cap."""
        return {"budget_bytes": self.budget_bytes, "used_bytes": self._in_use(), "loaded": len(self._lanes),
                "max_loaded_models": self.max_loaded}

    async def close(self) -> None:
        """Unload every lane, even while being cancelled."""
        with anyio.CancelScope(shield=True):
            for lane in list(self._lanes.values()):
                lane._close_queue()
                await self._unload(lane, reason="runtime closed")
