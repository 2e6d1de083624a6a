"""The recent pipeline runs that the lanes page shows: each run's stage timeline, kept in a bounded buffer.

The page reads runs through `RecentRuns`, one method, so that a run journal can stand in for the buffer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from multilane.pipeline.executor import RunEvent, RunResult
from multilane.spec import AgentStage, EmbedStage, GenerateStage, RetrieveStage, Spec


@dataclass(frozen=True)
class StageSpan:
    """One stage on a run's timeline: when it started (seconds after the run did), for how long, how it ended."""

    stage: str
    kind: str
    start: float
    seconds: float
    ok: bool = True
    tokens: int | None = None  # tokens it generated, for stages that generate
    model: str | None = None  # the model it calls (a retrieve stage: its index's embedder), when known

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {"stage": self.stage, "kind": self.kind, "model": self.model, "start": round(self.start, 4),
                "seconds": round(self.seconds, 4), "ok": self.ok, "tokens": self.tokens}


@dataclass(frozen=True)
class RunSummary:
    """A finished or failed pipeline run: when it started (epoch seconds), how long it took, its stages."""

    run_id: str | None
    pipeline: str
    status: str  # "finished" | "failed"
    started_at: float
    seconds: float
    stages: tuple[StageSpan, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {"run_id": self.run_id, "pipeline": self.pipeline, "status": self.status,
                "started_at": self.started_at, "seconds": round(self.seconds, 4), "error": self.error,
                "stages": [span.to_dict() for span in self.stages]}


class RecentRuns(Protocol):
    """Where the lanes page reads the latest runs: this server's memory now, a run journal later."""

    async def recent(self, limit: int) -> list[RunSummary]:
        """The latest `limit` runs, newest first."""
        ...


class RecentRunBuffer:
    """The last `size` runs that this server finished or saw fail, in memory."""

    def __init__(self, size: int = 50) -> None:
        self._runs: deque[RunSummary] = deque(maxlen=size)

    def record(self, run: RunSummary) -> None:
        """Keep a run, dropping the oldest one when full."""
        self._runs.append(run)

    async def recent(self, limit: int) -> list[RunSummary]:
        """The latest `limit` runs, newest first."""
        return list(reversed(self._runs))[:max(0, limit)]


def _tokens(result: Any) -> int | None:
    """Tokens a stage generated: its own count, or its for_each items' counts added up."""
    if not isinstance(result, dict):
        return None
    count = result.get("completion_tokens")
    if isinstance(count, int):
        return count
    items = result.get("items")
    known = [c for c in (_tokens(item) for item in items) if c is not None] if isinstance(items, list) else []
    return sum(known) if known else None


def stage_models(spec: Spec, pipeline: str) -> dict[str, tuple[str, str | None]]:
    """Each stage's kind and the model it calls: its own, its index's embedder, or its agent's (when loaded)."""
    out: dict[str, tuple[str, str | None]] = {}
    for name, stage in spec.pipeline(pipeline).stages.items():
        model: str | None = None
        if isinstance(stage, EmbedStage | GenerateStage):
            model = stage.model
        elif isinstance(stage, RetrieveStage):
            model = spec.index(stage.index).embedder
        elif isinstance(stage, AgentStage) and spec.agents:
            agent = spec.agents.get(stage.agent)
            model = agent.model if agent is not None else None
        out[name] = (stage.kind, model)
    return out


def summarize(result: RunResult, spec: Spec) -> RunSummary:
    """The timeline of a finished run, from its stage events (offsets from the first stage's start)."""
    stages = stage_models(spec, result.pipeline)
    base = min((event.started for event in result.events), default=0.0)
    spans = tuple(
        StageSpan(event.stage, stages.get(event.stage, ("", None))[0], event.started - base,
                  event.finished - event.started, event.ok, _tokens(result.stages.get(event.stage)),
                  stages.get(event.stage, ("", None))[1])
        for event in result.events)
    return RunSummary(result.run_id, result.pipeline, "finished", time.time() - result.seconds, result.seconds, spans)


@dataclass
class RunTimeline:
    """Builds a run's summary from its streamed events, timing them as they arrive."""

    pipeline: str
    spec: Spec
    clock: Callable[[], float] = time.perf_counter
    run_id: str | None = None
    _started: float = 0.0
    _started_at: float = field(default_factory=time.time)
    _stages: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    _open: dict[str, float] = field(default_factory=dict)
    _spans: list[StageSpan] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._started = self.clock()
        self._stages = stage_models(self.spec, self.pipeline)

    def observe(self, event: RunEvent) -> RunSummary | None:
        """Take in one event; the run's summary once it finished or failed, else None."""
        now = self.clock() - self._started
        self.run_id = event.run_id
        stage = event.stage
        if event.type == "stage_started" and stage is not None:
            self._open[stage] = now
        elif event.type in ("stage_finished", "stage_failed") and stage is not None and stage in self._open:
            start = self._open.pop(stage)
            kind, model = self._stages.get(stage, ("", None))
            ok = event.type == "stage_finished"
            self._spans.append(StageSpan(stage, kind, start, now - start, ok,
                                         _tokens(event.data.get("result")) if ok else None, model))
        elif event.type == "run_finished":
            return self._summary("finished", now, None)
        elif event.type == "run_failed":
            return self._summary("failed", now, str(event.data.get("error", "")))
        return None

    def failed(self, error: str) -> RunSummary:
        """The summary of a run that ended with an error no event told of."""
        return self._summary("failed", self.clock() - self._started, error)

    def _summary(self, status: str, seconds: float, error: str | None) -> RunSummary:
        spans = tuple(sorted(self._spans, key=lambda span: span.start))
        return RunSummary(self.run_id, self.pipeline, status, self._started_at, seconds, spans, error)
