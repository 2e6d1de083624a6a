"""The live lanes page at `/` and the JSON it reads, `GET /v1/lanes`: lanes, slots, queues, memory, tokens/s, runs.

The page is static HTML, CSS and JavaScript shipped in the package (no build step, nothing fetched from
elsewhere) and holds no data: everything it shows comes from /v1/lanes, which needs the API key when the
server has one. The page asks for the key once and keeps it in the tab's sessionStorage.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request, Response

from multilane.lanes import LaneMetrics
from multilane.runtime import Runtime
from multilane.server.common import json_response, runtime_of
from multilane.server.recent_runs import RecentRuns

router = APIRouter(tags=["lanes"])

RATE_WINDOW = 10.0  # seconds of counters that tokens/s is measured over
SAMPLE_INTERVAL = 1.0

# The page may load its own script and style and talk to its own server, and nothing else.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC_PATHS = ("/static/",)
"""Where the page's script and style are served; like the page, open without the API key."""


class TokenRates:
    """Tokens and calls per second of each declared model, from the pool's counters over the last `window` seconds."""

    def __init__(self, metrics: Mapping[str, LaneMetrics], *, window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self.window = window
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()

    def sample(self) -> None:
        """Read the counters now; keep samples back to the window's start, and one before it as the base."""
        now = self._clock()
        counts = {name: (m.completion_tokens, m.requests) for name, m in self._metrics.items()}
        self._samples.append((now, counts))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rates(self) -> dict[str, tuple[float, float]]:
        """Per model: (tokens per second, calls per second), between the oldest kept sample and the newest."""
        if len(self._samples) < 2:
            return {name: (0.0, 0.0) for name in self._metrics}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        span = t1 - t0
        out: dict[str, tuple[float, float]] = {}
        for name, (tokens, calls) in last.items():
            before = first.get(name, (0, 0))
            out[name] = ((tokens - before[0]) / span, (calls - before[1]) / span) if span > 0 else (0.0, 0.0)
        return out

    async def sample_forever(self, interval: float = SAMPLE_INTERVAL) -> None:
        """Sample every `interval` seconds until cancelled, so the rates never depend on who asks when."""
        while True:
            self.sample()
            await anyio.sleep(interval)


@asynccontextmanager
async def sampling(rates: TokenRates) -> AsyncIterator[None]:
    """Sample the counters in the background for the duration (the app's lifespan)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(rates.sample_forever)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()


async def lanes_snapshot(runtime: Runtime, rates: TokenRates, runs: RecentRuns, *,
                         runs_limit: int = 20) -> dict[str, Any]:
    """What the lanes page shows: the budget, each loaded lane, each declared model's counters, the latest runs."""
    rates.sample()
    per_model = rates.rates()
    pool = runtime.pool
    now = time.time()
    lanes = []
    for row in runtime.ps():
        names = [name for name in row["models"] if name in pool.metrics]
        expires = row["expires_at"]
        lanes.append({
            **row,
            "memory_bytes": row["weights_bytes"] + row["kv_bytes"],
            "max_queue": pool.max_queue,
            "expires_in": max(0.0, float(expires) - now) if isinstance(expires, int | float) else None,
            "requests": sum(pool.metrics[name].requests for name in names),
            "prompt_tokens": sum(pool.metrics[name].prompt_tokens for name in names),
            "completion_tokens": sum(pool.metrics[name].completion_tokens for name in names),
            "tokens_per_second": round(sum(per_model.get(name, (0.0, 0.0))[0] for name in names), 2),
            "requests_per_second": round(sum(per_model.get(name, (0.0, 0.0))[1] for name in names), 3),
        })
    models = []
    for name, declared in runtime.spec.models.items():
        lane = pool.loaded(name)
        counters = pool.metrics[name]
        tokens_per_second, requests_per_second = per_model.get(name, (0.0, 0.0))
        models.append({
            "name": name, "kind": declared.kind, "loaded": lane is not None,
            "lane": lane.name if lane is not None else None, "keep_alive": str(declared.keep_alive),
            "requests": counters.requests, "rejected": counters.rejected, "failures": counters.failures,
            "prompt_tokens": counters.prompt_tokens, "completion_tokens": counters.completion_tokens,
            "loads": counters.loads, "evictions": counters.evictions,
            "load_seconds": round(counters.load_seconds, 3),
            "tokens_per_second": round(tokens_per_second, 2), "requests_per_second": round(requests_per_second, 3),
        })
    return {
        "object": "multilane.lanes",
        "time": now,
        "file": runtime.spec.path.name if runtime.spec.path else None,
        "rate_window_seconds": rates.window,
        "usage": pool.usage(),
        "lanes": lanes,
        "models": models,
        "runs": [run.to_dict() for run in await runs.recent(runs_limit)],
    }


@router.get("/v1/lanes")
async def lanes(request: Request, runs: int = Query(20, ge=0, le=200)) -> Response:
    """The loaded lanes (slots, queue, memory, keep-alive, tokens/s), every declared model's counters, recent runs."""
    state = request.app.state
    return json_response(await lanes_snapshot(runtime_of(request), state.token_rates, state.recent_runs,
                                              runs_limit=runs))


_PAGE = files("multilane.server") / "static" / "index.html"


@router.get("/", include_in_schema=False)
async def page() -> Response:
    """The live lanes page (open: it holds no data; what it shows comes from /v1/lanes)."""
    return Response(_PAGE.read_bytes(), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})
