"""Lanes and the pool: resident models within a memory budget, parallel slots and a bounded priority queue.

A lane is one loaded model. Calls take one of its `parallel` slots or wait in its queue, which serves the
lowest priority number first and, within a priority, the earliest arrival; past `max_queue` waiting calls a
call is refused at once. A waiting call is passed over (a later call given a slot it could have taken) at
most `max_overtakes` times; after that no later call goes before it, so low priority is delayed, never
starved. `reserved_slots` of a lane are slots only calls of priority `reserved_priority` or lower (more
urgent) may take, so that such a call starts at once while background calls fill the rest. A declared model's
reserved slots come on top of its `parallel` (the engine runs both), so keeping them costs the background
calls no slot, only the KV memory of the extra sequences.

The pool loads lanes on demand, one load at a time,
shares a lane between declared models with the same weights and settings, evicts idle lanes (soonest
expiry first) to make room, unloads lanes whose keep-alive ran out, and refuses, with the arithmetic,
a load that cannot fit.

Every load and unload happens under one lock, and a lane stays on the books (its memory counted) until its
engine has closed, so a load is never admitted while an old engine still holds the memory. A caller that
has found a lane claims it at once, before it awaits anything, so the lane cannot be reaped or evicted
between being found and taking its slot.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from itertools import count
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
    RuntimeClosedError,
    UnknownNameError,
)
from multilane.memory import KVPlan, format_bytes

__all__ = [
    "DEFAULT_MAX_OVERTAKES",
    "UNSET",
    "Engine",
    "Lane",
    "LaneCall",
    "LaneCallObserver",
    "LaneMetrics",
    "LanePlan",
    "Planner",
    "Pool",
    "Prepared",
    "RequestObserver",
    "calls_observed",
    "format_bytes",
    "observing_calls",
]

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
    parallel: int = 1  # every slot (sequences the engine runs at once), the reserved ones included
    context: int | None = None
    dtype: str | None = None  # the dtype the engine computes in, when Multilane chooses it
    reserved_slots: int = 0  # of the slots, those only calls of priority <= reserved_priority may take
    reserved_priority: int = 0

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
    prompt_cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache


@dataclass(frozen=True)
class LaneCall:
    """How one call went through its lane, for traces: what it waited for and when (`time.time_ns()` stamps).

    `load` is the span of the model load the call waited for (None when the lane was loaded already);
    `busy` and `ahead` are the slots running and the calls waiting when it reached the lane.
    """

    model: str  # the declared model called
    lane: str  # the lane's name (the model that loaded it, when lanes are shared)
    kind: str  # generate | embedding
    slots: int
    busy: int
    ahead: int
    arrived_ns: int
    reached_ns: int  # the lane was found (loaded if needed) and the prompt prepared: the call asks for a slot
    admitted_ns: int | None  # took a slot; None when it never did (cancelled or refused in the queue)
    finished_ns: int
    load: tuple[int, int] | None = None
    first_token_ns: int | None = None
    cached_tokens: int = 0  # prompt tokens the engine served from its prefix cache

    @property
    def queue_seconds(self) -> float:
        """Seconds spent waiting for a slot."""
        end = self.admitted_ns if self.admitted_ns is not None else self.finished_ns
        return max(end - self.reached_ns, 0) / 1e9

    @property
    def queued(self) -> bool:
        """Whether the call found every slot taken (or others waiting) and had to queue."""
        return self.busy >= self.slots or self.ahead > 0


LaneCallObserver = Callable[[LaneCall], None]
"""Told of each call that a lane admitted (or queued) in the calling context; see `observing_calls`."""

_call_observer: ContextVar[LaneCallObserver | None] = ContextVar("multilane_lane_call_observer", default=None)


@contextmanager
def observing_calls(observer: LaneCallObserver) -> Iterator[None]:
    """Tell `observer` of every lane call made in this context (and the tasks it starts) until the block ends."""
    token = _call_observer.set(observer)
    try:
        yield
    finally:
        _call_observer.reset(token)


def calls_observed() -> bool:
    """Whether the lane calls made in this context are told to an observer (the calling step reports them)."""
    return _call_observer.get() is not None


class _CallWatch:
    """Takes a call's timings as the pool serves it, and tells the context's observer, if any, at the end."""

    def __init__(self, model: str) -> None:
        self.observer = _call_observer.get()
        self.model = model
        self.arrived = time.time_ns()
        self.lane: Lane | None = None
        self.busy = self.ahead = 0
        self.reached = self.arrived
        self.admitted: int | None = None
        self.first_token: int | None = None
        self.cached_tokens = 0

    def checked(self, check: Callable[[Lane], Awaitable[Any]]) -> Callable[[Lane], Awaitable[Any]]:
        """`check`, noting the lane it was asked of and what the lane looked like just before the call queues."""
        async def noted(lane: Lane) -> Any:
            result = await check(lane)
            self.lane, self.busy, self.ahead, self.reached = lane, lane.busy, lane.queued, time.time_ns()
            return result

        return noted

    def chunk(self, chunk: Chunk) -> None:
        if self.first_token is None and chunk.tokens:
            self.first_token = time.time_ns()
        self.cached_tokens = max(self.cached_tokens, chunk.cached_tokens)

    def done(self) -> None:
        lane = self.lane
        if self.observer is None or lane is None:
            return
        load = None
        loaded_ns = int(lane.loaded_at * 1e9)
        if loaded_ns >= self.arrived:  # the lane came up while the call waited: it waited for that load
            load = (loaded_ns - int(lane.load_seconds * 1e9), loaded_ns)
        self.observer(LaneCall(self.model, lane.name, lane.kind, lane.parallel, self.busy, self.ahead, self.arrived,
                               self.reached, self.admitted, time.time_ns(), load, self.first_token,
                               self.cached_tokens))


class _LaneClosed(Exception):
    """The lane was retired between finding it and taking a slot; the pool looks it up again."""


@dataclass(eq=False)
class _Waiter:
    """A call waiting for a slot: its priority, its place in arrival order, and how often it was passed over."""

    priority: int
    arrival: int
    passed: int = 0  # later calls given a slot this one could have taken
    event: anyio.Event = field(default_factory=anyio.Event)
    granted: bool = False
    closed: bool = False


DEFAULT_MAX_OVERTAKES = 32


class Lane:
    """One resident model: its engine, its parallel slots and its queue of waiting calls, by priority then arrival."""

    def __init__(self, plan: LanePlan, engine: Engine, *, name: str, keep_alive: float | None,
                 max_queue: int, pool: Pool, load_seconds: float,
                 max_overtakes: int = DEFAULT_MAX_OVERTAKES) -> None:
        self._plan = plan
        self._engine = engine
        self._name = name
        self._names: list[str] = [name]
        self._keep_alive = keep_alive
        self._max_queue = max_queue
        self._loaded_at = time.time()
        self._load_seconds = load_seconds
        self._busy = 0
        self._low_busy = 0  # running calls that may not take a reserved slot
        self._claims = 0  # callers that found the lane and will use it (or hold it) without a slot yet
        self._expires_at: float | None = None  # the pool's clock; None while in use or when pinned
        self._closed = False
        self._queue: list[_Waiter] = []  # in arrival order; `_next_waiter` picks who is served
        self._arrivals = count()
        self._max_overtakes = max_overtakes
        self._prompt_tokens = 0  # since the load: the engine's prefix cache lives as long as the lane
        self._cached_tokens = 0
        self._pool = pool

    # ---- what the lane is (read-only)

    @property
    def plan(self) -> LanePlan:
        """How the lane was planned: source, cost, slots, context."""
        return self._plan

    @property
    def engine(self) -> Engine:
        """The loaded engine."""
        return self._engine

    @property
    def name(self) -> str:
        """The declared model that loaded the lane."""
        return self._name

    @property
    def names(self) -> list[str]:
        """Every declared model served by the lane (models with the same weights and settings share it)."""
        return list(self._names)

    @property
    def kind(self) -> str:
        """generate or embedding."""
        return self._plan.kind

    @property
    def parallel(self) -> int:
        """Slots: calls that run at once, the reserved slots included."""
        return self._plan.parallel

    @property
    def loaded_at(self) -> float:
        """Wall-clock time of the load."""
        return self._loaded_at

    @property
    def load_seconds(self) -> float:
        """How long the load took."""
        return self._load_seconds

    @property
    def keep_alive(self) -> float | None:
        """Seconds the lane stays loaded once idle; None when pinned."""
        return self._keep_alive

    @property
    def expires_at(self) -> float | None:
        """When the idle lane unloads, on the pool's clock; None while in use or when pinned."""
        return self._expires_at

    @property
    def busy(self) -> int:
        """Slots running a call."""
        return self._busy

    @property
    def queued(self) -> int:
        """Calls waiting for a slot."""
        return len(self._queue)

    def queued_by_priority(self) -> dict[int, int]:
        """Calls waiting for a slot, counted by priority (most urgent first)."""
        counts: dict[int, int] = {}
        for waiter in sorted(self._queue, key=lambda w: w.priority):
            counts[waiter.priority] = counts.get(waiter.priority, 0) + 1
        return counts

    @property
    def reserved_slots(self) -> int:
        """Slots only calls of priority `reserved_priority` or lower may take."""
        return self._plan.reserved_slots

    @property
    def max_overtakes(self) -> int:
        """How many later calls may be given a slot before a waiting call that could have taken it."""
        return self._max_overtakes

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the calls that ran on this lane since it loaded."""
        return self._prompt_tokens

    @property
    def cached_tokens(self) -> int:
        """Of those, the tokens the engine took from its prefix cache."""
        return self._cached_tokens

    @property
    def closed(self) -> bool:
        """The lane was unloaded (or is being unloaded): it takes no more calls."""
        return self._closed

    @property
    def idle(self) -> bool:
        """Nothing running, waiting, holding or about to use it: the lane may be unloaded."""
        return self._busy == 0 and not self._queue and self._claims == 0

    @property
    def pinned(self) -> bool:
        """A pinned lane (keep_alive -1) is never evicted."""
        return self._keep_alive is None

    # ---- slots

    def _is_low(self, priority: int) -> bool:
        """Whether a call of this priority is kept out of the reserved slots."""
        return priority > self._plan.reserved_priority

    def _may_start(self, priority: int) -> bool:
        """Whether a call of this priority may take a slot now: one is free, and it is not a reserved one."""
        if self._busy >= self.parallel:
            return False
        return not self._is_low(priority) or self._low_busy < self.parallel - self._plan.reserved_slots

    def _take(self, priority: int) -> None:
        self._busy += 1
        if self._is_low(priority):
            self._low_busy += 1

    async def _acquire(self, keep_alive: float | None = UNSET, priority: int = 0) -> None:
        """Take a slot, or wait for one by priority then arrival; refuse at once when the queue is full.

        While a slot is free no waiting call could take it (a freed slot goes straight to a waiter that can),
        so a call that may take a free slot takes it without passing anyone over.
        """
        if self._closed:
            raise _LaneClosed
        free = self._may_start(priority)
        if not free and len(self._queue) >= self._max_queue:
            self._pool.metrics[self._name].rejected += 1
            raise QueueFullError(f"lane '{self._name}' queue is full ({len(self._queue)} waiting, "
                                 f"{self._busy} of {self.parallel} slots busy); retry later or raise "
                                 "runtime.max_queue")
        if keep_alive is not UNSET:
            self._keep_alive = keep_alive  # the latest admitted call's keep_alive decides, as in Ollama
        self._expires_at = None
        if free:
            self._take(priority)
            return
        waiter = _Waiter(priority, next(self._arrivals))
        self._queue.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:  # the slot was handed over as we were cancelled: pass it on
                self._release(priority)
            elif not waiter.closed:
                self._queue.remove(waiter)
                self._pool._lane_changed(self)
            raise
        if waiter.closed:
            raise _LaneClosed

    def _next_waiter(self) -> _Waiter | None:
        """The waiter a freed slot goes to: among those that may take it, one passed over `max_overtakes` times
        (earliest first), else the lowest priority number, earliest first."""
        best: _Waiter | None = None
        best_key: tuple[int, int, int] | None = None
        for waiter in self._queue:
            if not self._may_start(waiter.priority):
                continue
            key = (0, 0, waiter.arrival) if waiter.passed >= self._max_overtakes else (1, waiter.priority,
                                                                                       waiter.arrival)
            if best_key is None or key < best_key:
                best, best_key = waiter, key
        return best

    def _release(self, priority: int = 0) -> None:
        """Free the slot of a call of this priority: hand it straight to the next waiter that may take it (see
        `_next_waiter`), or start the idle clock."""
        self._busy -= 1
        if self._is_low(priority):
            self._low_busy -= 1
        waiter = self._next_waiter()
        if waiter is None:
            self._pool._lane_changed(self)
            return
        for earlier in self._queue:  # earlier arrivals that could have taken this slot were passed over
            if earlier.arrival < waiter.arrival and self._may_start(earlier.priority):
                earlier.passed += 1
        self._queue.remove(waiter)
        self._take(waiter.priority)
        waiter.granted = True
        waiter.event.set()

    def _retire(self) -> None:
        """Take no more calls; wake every waiter so that it retries on a new lane (or learns the pool closed)."""
        self._closed = True
        self._expires_at = None
        waiters, self._queue = self._queue, []
        for waiter in waiters:
            waiter.closed = True
            waiter.event.set()

    # ---- calls

    def _generate_engine(self) -> GenerateEngine:
        if self.kind != "generate" or not isinstance(self._engine, GenerateEngine):
            raise EngineError(f"model '{self._name}' is an embedding model; it cannot generate text")
        return self._engine

    async def prepare(self, messages: Sequence[Message] | str, max_tokens: int, *,
                      truncate: bool = False) -> Prepared:
        """Render and tokenize messages, or take a str as a raw prompt; refuse a prompt that does not fit, or cut it.

        A prompt longer than the context minus max_tokens is an error unless `truncate` keeps its end.
        """
        engine = self._generate_engine()
        if isinstance(engine, PreparingEngine):
            prompt = await engine.prepare(messages, max_tokens, truncate=truncate, model=self._name)
            return Prepared(prompt, prompt.tokens)
        if not isinstance(engine, TokenizingEngine):
            raise EngineError(f"model '{self._name}': its engine has neither a tokenizer nor a prepare method")
        ids = engine.encode(messages if isinstance(messages, str) else engine.render(messages))
        room = engine.context - max_tokens
        if len(ids) > room:
            if not truncate or room <= 0:
                raise ContextLengthError(
                    f"model '{self._name}': prompt of {len(ids)} tokens + max_tokens {max_tokens} = "
                    f"{len(ids) + max_tokens} tokens, more than its context of {engine.context} tokens; shorten the "
                    "prompt, lower max_tokens, raise the model's context, or set truncate: true")
            log.warning("prompt truncated", model=self._name, tokens=len(ids), kept=room)
            ids = ids[len(ids) - room:]  # keep the end: the question and the generation prompt
        return Prepared(ids, len(ids))

    def _count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens of texts with the lane's own tokenizer (blocking: run it in a worker thread)."""
        engine = self._engine
        if isinstance(engine, EmbeddingEngine):
            return sum(len(engine.token_spans(text)) for text in texts)
        if isinstance(engine, TokenizingEngine):
            return sum(len(engine.encode(text)) for text in texts)
        raise EngineError(f"model '{self._name}': its engine cannot count tokens locally")

    async def _stream_in_slot(self, prompt: Prepared, options: SamplingOptions,
                              model: str, started: float, priority: int = 0) -> AsyncGenerator[Chunk, None]:
        metrics = self._pool.metrics[model]  # counted under the declared name called, also on a shared lane
        metrics.requests += 1
        prompt_tokens = prompt.tokens or 0
        metrics.prompt_tokens += prompt_tokens
        self._prompt_tokens += prompt_tokens
        request_id = f"{self._name}-{self._pool.next_request_id()}"
        chunks = self._generate_engine().stream(prompt.payload, options, request_id, priority=priority)
        first: float | None = None
        cached = 0
        try:
            async for chunk in chunks:
                if chunk.cached_tokens > cached:  # the engine says it once the prompt is read; counted once
                    metrics.prompt_cached_tokens += chunk.cached_tokens - cached
                    self._cached_tokens += chunk.cached_tokens - cached
                    cached = chunk.cached_tokens
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
                 clock: Callable[[], float] = time.monotonic, max_overtakes: int = DEFAULT_MAX_OVERTAKES) -> None:
        self._planner = planner
        self._models = models  # declared name -> (kind, keep_alive seconds or None when pinned)
        self.budget_bytes = budget_bytes
        self.max_loaded = max_loaded
        self.max_queue = max_queue
        self.max_overtakes = max_overtakes
        self._clock = clock
        self._lanes: dict[Hashable, Lane] = {}  # on the books: loaded, or retired with the engine still closing
        self._by_name: dict[str, Lane] = {}  # lanes that take calls
        self._plans: dict[str, LanePlan] = {}
        self._load_lock = anyio.Lock()  # every load and unload holds it
        self._wake = anyio.Event()
        self._requests = 0
        self._closed = False
        self._draining = False
        self._waiting: set[anyio.CancelScope] = set()  # calls waiting for a slot; drain() refuses them
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

    @property
    def closed(self) -> bool:
        """The pool was closed: it loads and runs nothing more."""
        return self._closed

    @property
    def draining(self) -> bool:
        """drain() was called: the pool finishes the calls it runs and takes no new ones."""
        return self._draining

    def _check_open(self, name: str) -> None:
        if self._closed or self._draining:
            raise self._refusal_closed(name)

    def _refusal_closed(self, name: str) -> RuntimeClosedError:
        if self._closed:
            return RuntimeClosedError(f"model '{name}': the runtime is closed (shutting down or shut down) and "
                                      "runs nothing more; open a new Runtime")
        return RuntimeClosedError(f"model '{name}': the runtime is shutting down; it finishes the calls it runs "
                                  "and starts no new ones; retry on another server")

    def _check_declared(self, name: str) -> None:
        if name not in self._models:
            raise UnknownNameError(f"unknown model '{name}' (declared: {', '.join(self._models)})")

    # ---- finding and loading lanes

    def loaded(self, name: str) -> Lane | None:
        """The lane of a declared model if it is loaded now."""
        return self._by_name.get(name)

    async def lane(self, name: str) -> Lane:
        """The lane of a declared model, loading it first (and evicting idle lanes) if needed."""
        lane = await self._claim(name)
        self._unclaim(lane)
        return lane

    async def load(self, name: str, *, keep_alive: float | None = UNSET) -> Lane:
        """Load a declared model now, and (when given) set its lane's keep-alive; the idle clock starts now."""
        lane = await self._claim(name)
        if keep_alive is not UNSET:
            lane._keep_alive = keep_alive
        self._unclaim(lane)
        return lane

    async def plan(self, name: str) -> LanePlan:
        """What loading a declared model would cost (its source is resolved, and prepared, once)."""
        self._check_declared(name)
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = await self._planner(name)
        return plan

    async def _claim(self, name: str) -> Lane:
        """The lane of a model, claimed so that nothing unloads it until `_unclaim`; loads it when needed."""
        self._check_open(name)
        lane = self._by_name.get(name)
        if lane is None:
            self._check_declared(name)
            async with self._load_lock:  # one load at a time: loads compete for the same memory and cores
                self._check_open(name)
                lane = self._by_name.get(name)
                if lane is None:
                    lane = await self._load(name)
                lane._claims += 1  # before the lock is released: the reaper takes the lock to unload
                return lane
        lane._claims += 1
        return lane

    def _unclaim(self, lane: Lane) -> None:
        lane._claims -= 1
        self._lane_changed(lane)

    async def _load(self, name: str) -> Lane:
        """Load a model's lane (the load lock is held)."""
        plan = await self.plan(name)
        await self._flush_retired()
        shared = self._lanes.get(plan.key)
        if shared is not None:  # same weights and settings as a loaded lane: share it
            shared._names.append(name)
            self._by_name[name] = shared
            if self._models[name][1] is None:
                shared._keep_alive = None
                shared._expires_at = None  # an idle lane's running expiry would otherwise still reap it
            log.info("lane shared", model=name, lane=shared.name)
            return shared
        await self._make_room(name, plan)
        self._check_open(name)  # the pool may have begun closing while room was made
        t0 = time.perf_counter()
        # A load runs to its end even when its caller is cancelled, and its lane goes on the books at once:
        # an engine abandoned half-way would keep its process and memory with nobody to close it.
        with anyio.CancelScope(shield=True):
            engine = await plan.load()
            if self._closed:  # closed during the load: close() waits for us, and nothing may outlive it
                await engine.close()
                self._check_open(name)
            seconds = time.perf_counter() - t0
            lane = Lane(plan, engine, name=name, keep_alive=self._models[name][1], max_queue=self.max_queue,
                        pool=self, load_seconds=seconds, max_overtakes=self.max_overtakes)
            self._lanes[plan.key] = lane
            self._by_name[name] = lane
        metrics = self.metrics[name]
        metrics.loads += 1
        metrics.load_seconds += seconds
        log.info("lane loaded", model=name, seconds=round(seconds, 2), cost=plan.arithmetic())
        self._lane_changed(lane)
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
            retired = [lane for lane in self._lanes.values() if lane.closed]  # dropped while we evicted
            if retired:
                await self._unload(retired[0], reason="retired")
                continue
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

    # ---- unloading

    def _retire(self, lane: Lane) -> None:
        """Stop routing calls to a lane; it stays on the books until `_unload` has closed its engine."""
        lane._retire()
        for name in lane.names:
            if self._by_name.get(name) is lane:
                del self._by_name[name]

    async def _unload(self, lane: Lane, *, reason: str) -> None:
        """Retire a lane, close its engine, then take it off the books (the load lock is held)."""
        self._retire(lane)
        if self._lanes.get(lane.plan.key) is not lane:
            return  # already unloaded
        log.info("lane unloaded", model=lane.name, reason=reason)
        with anyio.CancelScope(shield=True):
            try:
                await lane.engine.close()
            except Exception as exc:  # a failing close must not keep the lane on the books for ever
                log.error("engine close failed", model=lane.name, error=str(exc))
        del self._lanes[lane.plan.key]  # only now is its memory free for another load
        self._wake.set()

    async def _flush_retired(self) -> None:
        """Finish unloading lanes that were retired (an engine death) but are still on the books."""
        for lane in [lane for lane in self._lanes.values() if lane.closed]:
            await self._unload(lane, reason="retired")

    async def unload(self, name: str) -> bool:
        """Unload a model's lane now if idle, else as soon as it goes idle; False if it was not loaded."""
        lane = self._by_name.get(name)
        if lane is None:
            return False
        lane._keep_alive = 0.0
        if lane.idle:
            with anyio.CancelScope(shield=True):
                async with self._load_lock:
                    if lane.idle:
                        await self._unload(lane, reason="unloaded on request")
        else:
            self._lane_changed(lane)
        return True

    async def drop(self, lane: Lane, *, reason: str) -> None:
        """Drop a lane whose engine died: its waiters retry on a fresh lane, loaded on the next call."""
        if lane.closed:
            return
        log.error("lane dropped", model=lane.name, reason=reason)
        self._retire(lane)
        with anyio.CancelScope(shield=True):
            async with self._load_lock:
                await self._unload(lane, reason=reason)

    # ---- using lanes

    async def _leased(self, name: str, keep_alive: float | None,
                      check: Callable[[Lane], Awaitable[Any]] | None = None,
                      priority: int = 0) -> tuple[Lane, Any]:
        """A lane of the model with one of its slots taken at `priority` (the caller releases it at the same
        priority), and what `check` said.

        `check` runs before the call queues, so a request that can never run fails at once. The lane is
        claimed from the moment it is found, so neither the reaper nor an eviction can take it meanwhile.
        """
        while True:
            lane = await self._claim(name)
            try:
                checked = await check(lane) if check is not None else None
                await self._admit(lane, name, keep_alive, priority)
            except _LaneClosed:
                continue  # retired under us (engine death, or the pool closing): look it up again
            finally:
                self._unclaim(lane)
            return lane, checked

    async def _admit(self, lane: Lane, name: str, keep_alive: float | None, priority: int = 0) -> None:
        """Take a slot on the lane, or wait for one; a call still waiting when drain() is called is refused."""
        self._check_open(name)
        with anyio.CancelScope() as waiting:
            self._waiting.add(waiting)
            try:
                await lane._acquire(keep_alive, priority)  # a cancelled waiter leaves the queue (or passes on its slot)
            finally:
                self._waiting.discard(waiting)
        if waiting.cancelled_caught:  # only drain() cancels this scope
            raise self._refusal_closed(name)

    def drain(self) -> int:
        """Refuse new calls and wake every call waiting for a slot with RuntimeClosedError; running calls go on.

        For a shutdown: what has not started can be retried elsewhere at once. Returns how many waiting calls
        were refused; close() still unloads the lanes.
        """
        self._draining = True
        waiting = list(self._waiting)
        for scope in waiting:
            scope.cancel()
        if waiting:
            log.info("pool draining", refused=len(waiting))
        return len(waiting)

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[Lane]:
        """Keep a model's lane loaded (not evicted) for the duration, without taking a slot."""
        lane = await self._claim(name)
        try:
            yield lane
        finally:
            self._unclaim(lane)

    async def stream(self, name: str, messages: Sequence[Message] | str, options: SamplingOptions, *,
                     truncate: bool = False, keep_alive: float | None = UNSET,
                     priority: int = 0) -> AsyncGenerator[Chunk, None]:
        """Stream a completion from a generate model (a str is a raw prompt); cancelling the consumer aborts it.

        `priority` orders the call in the lane's queue and in the engine's (lower first).
        """
        started, watch = time.perf_counter(), _CallWatch(name)
        try:
            lane, prompt = await self._leased(
                name, keep_alive, watch.checked(lambda lane: lane.prepare(messages, options.max_tokens,
                                                                          truncate=truncate)), priority)
            watch.admitted = time.time_ns()
            try:
                async with aclosing(lane._stream_in_slot(prompt, options, name, started, priority)) as chunks:
                    async for chunk in chunks:
                        watch.chunk(chunk)
                        yield chunk
            finally:
                lane._release(priority)
        finally:
            watch.done()

    async def generate(self, name: str, messages: Sequence[Message] | str, options: SamplingOptions, *,
                       truncate: bool = False, keep_alive: float | None = UNSET, priority: int = 0) -> Completion:
        """Generate a whole completion from a generate model (a str is a raw prompt); `priority` as in `stream`."""
        return await collect(self.stream(name, messages, options, truncate=truncate, keep_alive=keep_alive,
                                         priority=priority))

    async def embed(self, name: str, texts: Sequence[str], *, keep_alive: float | None = UNSET) -> np.ndarray:
        """Embed texts with an embedding model."""
        async def is_embedding(lane: Lane) -> EmbeddingEngine:
            if lane.kind != "embedding" or not isinstance(lane.engine, EmbeddingEngine):
                raise EngineError(f"model '{name}' is a generate model; it cannot embed text")
            return lane.engine

        started, watch = time.perf_counter(), _CallWatch(name)
        try:
            lane, engine = await self._leased(name, keep_alive, watch.checked(is_embedding))
        except BaseException:
            watch.done()
            raise
        watch.admitted = time.time_ns()
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
            lane._release()
            watch.done()

    async def count_tokens(self, name: str, texts: Sequence[str]) -> int:
        """How many tokens texts make in a model's own tokenizer, counted in a worker thread, off the event loop.

        The lane is held (loaded if needed) while it counts, without taking a slot.
        """
        async with self.hold(name) as lane:
            return await anyio.to_thread.run_sync(lane._count_tokens, list(texts))

    # ---- keep-alive

    def _lane_changed(self, lane: Lane) -> None:
        """Start the idle clock of a lane that just went idle, and wake the reaper."""
        if lane.idle and not lane.closed:
            lane._expires_at = None if lane.keep_alive is None else self._clock() + lane.keep_alive
        self._wake.set()

    async def reap_forever(self) -> None:
        """Unload idle lanes whose keep-alive ran out; runs until cancelled (the runtime's task group)."""
        while True:
            self._wake = anyio.Event()
            await self.reap()
            expiries = [lane.expires_at for lane in self._lanes.values()
                        if lane.idle and not lane.closed and lane.expires_at is not None]
            delay = max(0.0, min(expiries) - self._clock()) if expiries else None
            with anyio.move_on_after(delay):
                await self._wake.wait()

    def _expired(self, lane: Lane, now: float) -> bool:
        return (lane.idle and not lane.pinned and not lane.closed and lane.expires_at is not None
                and lane.expires_at <= now)

    async def reap(self) -> None:
        """Unload every idle lane whose keep-alive has run out."""
        now = self._clock()
        for lane in list(self._lanes.values()):
            if self._expired(lane, now):
                with anyio.CancelScope(shield=True):
                    async with self._load_lock:  # never unload in the middle of a load's arithmetic
                        if self._expired(lane, now):
                            await self._unload(lane, reason=f"idle for {format_duration(lane.keep_alive)}")

    # ---- reporting

    def ps(self) -> list[dict[str, Any]]:
        """One row per loaded lane: what `multilane ps` shows."""
        now_wall, now = time.time(), self._clock()
        rows = []
        for lane in self._lanes.values():
            if lane.closed:
                continue  # being unloaded
            if lane.pinned:
                expires: str | float | None = "forever"
            elif lane.expires_at is None:
                expires = None  # busy: the clock starts when it goes idle
            else:
                expires = now_wall + (lane.expires_at - now)
            kv = lane.plan.kv
            rows.append({
                "name": lane.name, "models": lane.names, "source": lane.plan.source, "kind": lane.kind,
                "device": getattr(lane.engine, "device", "cpu"),
                "dtype": getattr(lane.engine, "dtype", None) or lane.plan.dtype,
                "weights_bytes": lane.plan.weights_bytes, "kv_bytes": lane.plan.kv_bytes,
                "kv_blocks": kv.blocks if kv is not None else None,
                "kv_block_size": kv.block_size if kv is not None else None,
                "cost": lane.plan.arithmetic(), "busy": lane.busy, "slots": lane.parallel,
                "reserved_slots": lane.reserved_slots, "reserved_priority": lane.plan.reserved_priority,
                "queued": lane.queued,
                # JSON object keys are strings: the priorities are written as text, most urgent first
                "queued_by_priority": {str(p): n for p, n in lane.queued_by_priority().items()},
                "prompt_tokens": lane.prompt_tokens, "cached_tokens": lane.cached_tokens,
                "cache_hit_rate": lane.cached_tokens / lane.prompt_tokens if lane.prompt_tokens else None,
                "prefix_caching": getattr(lane.engine, "prefix_caching", None),
                "context": lane.plan.context, "loaded_at": lane.loaded_at,
                "expires_at": expires, "keep_alive": format_duration(lane.keep_alive),
            })
        return rows

    def usage(self) -> dict[str, Any]:
        """The budget, what the loaded lanes use of it, and the cap."""
        return {"budget_bytes": self.budget_bytes, "used_bytes": self._in_use(), "loaded": len(self._lanes),
                "max_loaded_models": self.max_loaded}

    async def close(self) -> None:
        """Refuse new calls, wake queued ones (they fail with RuntimeClosedError) and unload every lane.

        Waits for a load in progress and closes its engine too, even while being cancelled: nothing the
        pool started is left running.
        """
        self._closed = True
        for lane in list(self._lanes.values()):
            self._retire(lane)
        with anyio.CancelScope(shield=True):
            async with self._load_lock:
                for lane in list(self._lanes.values()):
                    await self._unload(lane, reason="runtime closed")
