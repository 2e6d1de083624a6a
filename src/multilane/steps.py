"""The one seam every recorded part of a run goes through: a step with a call path, wrapped by layers.

A run is a tree of steps: the run, its stages, a `for_each` stage's items, an agent, its steps, their tool
calls, and the leaves that reach a model or an index (`model`, `embed`, `search`). A step's call path names
its place in that tree the same way each time the run is executed (`stage:research/item:2/agent/step:1/tool:0`),
so the journal records it under that key, a resumed or replayed run looks its result up by it, and a tracer
can open a span for it. Layers wrap a step's call, outermost first; each may call `proceed()` or answer itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, cast

from multilane.engines.base import Completion, Message, SamplingOptions

__all__ = [
    "COMPLETION",
    "JSON",
    "Codec",
    "Layer",
    "Proceed",
    "Scope",
    "Step",
    "StepKind",
    "canonical_json",
    "completion_from_json",
    "model_attrs",
]

T = TypeVar("T")

StepKind = Literal["run", "stage", "item", "agent", "agent_step", "tool", "model", "embed", "search"]

Proceed = Callable[[], Awaitable[Any]]
"""Runs the step itself (or the next layer in)."""


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces, so that equal values give equal text (and equal hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass(frozen=True)
class Codec(Generic[T]):
    """How a step's result becomes JSON for the journal, and back; without `decode` it is recorded, never reused."""

    encode: Callable[[T], Any]
    decode: Callable[[Any], T] | None = None


def _same(value: Any) -> Any:
    return value


JSON: Codec[Any] = Codec(_same, _same)
"""For results that are JSON already (stage and item results)."""


def completion_from_json(data: Mapping[str, Any]) -> Completion:
    """A Completion from its journaled dict; fields it does not know (from a newer version) are left out."""
    names = {f.name for f in dataclasses.fields(Completion)}
    return Completion(**{key: value for key, value in data.items() if key in names})


COMPLETION: Codec[Completion] = Codec(dataclasses.asdict, completion_from_json)


@dataclass(frozen=True)
class Step:
    """One recorded part of a run: its kind, its call path in the run, and what went into it (JSON-ready)."""

    kind: StepKind
    run_id: str
    path: str  # "" for the run itself
    attrs: Mapping[str, Any]
    codec: Codec[Any] = JSON
    leaf: bool = False  # reaches a model, an index or a plain tool: a replay answers it from the recording

    @property
    def input_hash(self) -> str:
        """A hash of what went in: a recorded result is reused only for the same inputs."""
        return hashlib.sha256(canonical_json(self.attrs).encode()).hexdigest()[:32]


class Layer(Protocol):
    """Something that wraps every step of a run: the journal, resume, replay, the cache (and tracing)."""

    async def around(self, step: Step, proceed: Proceed) -> Any:
        """Run the step by calling `proceed()`, or answer it without calling it."""
        ...


@dataclass(frozen=True)
class Scope:
    """Where a run is in its tree of steps, and the layers its steps go through.

    `cache` is the nearest stage's `cache` setting (None: each model's own decides); children inherit it.
    """

    run_id: str
    path: tuple[str, ...] = ()
    layers: Sequence[Layer] = field(default=(), repr=False)
    cache: bool | None = None

    @property
    def key(self) -> str:
        """The call path as text: `stage:answer/model`."""
        return "/".join(self.path)

    def child(self, part: str, *, cache: bool | None = None) -> Scope:
        """The scope of a step nested in this one; `cache`, when given, replaces the inherited setting."""
        return dataclasses.replace(self, path=(*self.path, part), cache=self.cache if cache is None else cache)

    def derived_id(self) -> str:
        """An id for whatever runs at this path, the same each time the run executes (an agent's run id)."""
        return hashlib.sha256(f"{self.run_id}/{self.key}".encode()).hexdigest()[:12]

    async def run(self, kind: StepKind, proceed: Callable[[], Awaitable[T]], *, attrs: Mapping[str, Any] | None = None,
                  codec: Codec[T] = JSON, leaf: bool = False) -> T:
        """Run a step at this scope's path through every layer, outermost first."""
        step = Step(kind, self.run_id, self.key, attrs or {}, codec, leaf)
        call: Proceed = proceed
        for layer in reversed(self.layers):
            call = _wrap(layer, step, call)
        return cast(T, await call())

    async def generate(self, model: str, messages: Sequence[Message] | str, options: SamplingOptions,
                       call: Callable[[], Awaitable[Completion]], *, truncate: bool = False) -> Completion:
        """Make a model call as the `model` step under this scope; `call` is what reaches the engine."""
        attrs = model_attrs(model, messages, options, truncate=truncate, cache=self.cache)
        return await self.child("model").run("model", call, attrs=attrs, codec=COMPLETION, leaf=True)


def _wrap(layer: Layer, step: Step, proceed: Proceed) -> Proceed:
    async def call() -> Any:
        return await layer.around(step, proceed)

    return call


def model_attrs(model: str, messages: Sequence[Message] | str, options: SamplingOptions, *, truncate: bool,
                cache: bool | None) -> dict[str, Any]:
    """What goes into a model call, as the journal records it and the cache keys it."""
    sampling = dataclasses.asdict(options)
    schema = sampling.pop("json_schema")
    return {"model": model, "messages": messages if isinstance(messages, str) else list(messages),
            "options": sampling, "schema": schema, "truncate": truncate, "cache": cache}
