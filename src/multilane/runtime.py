"""Runtime: the async API that composes spec, pool, indexes and the executor."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import structlog

from multilane.durations import parse_duration
from multilane.engines.base import Chunk, Completion, EmbeddingEngine, Message, SamplingOptions
from multilane.errors import MultilaneError, UnknownNameError
from multilane.lanes import UNSET, Lane, LanePlan, Pool
from multilane.pipeline.executor import RunEvent, RunResult, execute
from multilane.planning import EngineFactory, auto_budget, has_gpu, plan_model, plan_with_factory
from multilane.retrieval import OpenedIndex, open_index
from multilane.sources import multilane_home
from multilane.spec import Spec, load_spec

if TYPE_CHECKING:
    from multilane.agents import Agent, AgentResult

log = structlog.get_logger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""Called with (index name, chunks embedded, chunks in all) while an index builds."""


class _LaneEmbedder:
    """An index's view of its embedding model: embeds through the pool, so slots and keep-alive apply."""

    def __init__(self, pool: Pool, name: str, engine: EmbeddingEngine) -> None:
        self._pool = pool
        self._name = name
        self._engine = engine
        self.identity = engine.identity
        self.device = engine.device
        self.dimension = engine.dimension
        self.max_tokens = engine.max_tokens

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await self._pool.embed(self._name, texts)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self._engine.token_spans(text)

    async def close(self) -> None:
        return None


class Runtime:
    """Runs a pipeline file's pipelines on resident models; use it as `async with Runtime.from_file(...)`."""

    def __init__(self, spec: Spec, *, engines: EngineFactory | None = None, index_root: Path | None = None,
                 progress: ProgressCallback | None = None) -> None:
        self.spec = spec
        self._engine_factory = engines
        self._index_root = index_root or multilane_home() / "indexes"
        self._progress = progress
        runtime = spec.runtime
        self._pool = Pool(self._plan, models={name: (m.kind, m.keep_alive_seconds) for name, m in spec.models.items()},
                          budget_bytes=runtime.memory_budget_bytes, max_loaded=runtime.max_loaded_models,
                          max_queue=runtime.max_queue)
        self._indexes: dict[str, OpenedIndex] = {}
        self._index_locks: dict[str, anyio.Lock] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._agents: Mapping[str, Agent] | None = dict(spec.agents) if spec.agents else None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> Runtime:
        """Load and validate a pipeline file; raises SpecError naming file, line and field."""
        return cls(load_spec(path), **kwargs)

    @property
    def pool(self) -> Pool:
        """The lanes: budget, cap, queue and metrics."""
        return self._pool

    async def __aenter__(self) -> Runtime:
        if self._pool.budget_bytes is None:
            self._pool.budget_bytes = auto_budget(gpu=self._engine_factory is None and has_gpu())
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._pool.reap_forever)
        try:
            for name, model in self.spec.models.items():  # pinned and preloaded models load at start
                if model.preload or model.keep_alive_seconds is None:
                    await self._pool.lane(name)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every engine; the runtime cannot run anything afterwards."""
        group, self._task_group = self._task_group, None
        self._indexes.clear()
        try:
            await self._pool.close()
        finally:
            if group is not None:
                group.cancel_scope.cancel()
                await group.__aexit__(None, None, None)

    def _check_open(self) -> None:
        if self._task_group is None:
            raise MultilaneError("the runtime is not open; use `async with Runtime(...) as rt:`")

    async def _plan(self, name: str) -> LanePlan:
        if self._engine_factory is None:
            return await plan_model(name, self.spec)
        return plan_with_factory(name, self.spec, self._engine_factory)

    # ---- models

    async def load(self, model: str, *, keep_alive: str | float | None = None) -> Lane:
        """Load a declared model now; it stays for its keep_alive (or the one given here) once idle."""
        self._check_open()
        return await self._pool.load(model, keep_alive=_keep_alive(keep_alive))

    async def plan(self, model: str) -> LanePlan:
        """What loading a model would cost (weights, KV cache) and which lane it would share, loading nothing."""
        return await self._pool.plan(model)

    async def unload(self, model: str) -> bool:
        """Unload a model now, or as soon as its running calls finish; False if it was not loaded."""
        self._check_open()
        self.spec.model(model)
        return await self._pool.unload(model)

    def ps(self) -> list[dict[str, Any]]:
        """The loaded lanes: model, source, device, memory, slots busy/total, queue, context, expiry."""
        return self._pool.ps()

    async def generate(self, model: str, messages: Sequence[Message] | str, options: SamplingOptions | None = None,
                       *, truncate: bool = False, keep_alive: str | float | None = None,
                       raw: bool = False) -> Completion:
        """Generate a completion of a chat (or of one user message) with a declared generate model.

        With `raw=True`, `messages` is a prompt string tokenized as is, without the chat template.
        """
        self._check_open()
        return await self._pool.generate(model, _as_prompt(messages, raw), options or SamplingOptions(),
                                         truncate=truncate, keep_alive=_keep_alive(keep_alive))

    async def generate_stream(self, model: str, messages: Sequence[Message] | str,
                              options: SamplingOptions | None = None, *, truncate: bool = False,
                              keep_alive: str | float | None = None, raw: bool = False) -> AsyncGenerator[Chunk, None]:
        """Stream a completion chunk by chunk (`raw` as in `generate`); leaving the loop early aborts the request."""
        self._check_open()
        chunks = self._pool.stream(model, _as_prompt(messages, raw), options or SamplingOptions(),
                                   truncate=truncate, keep_alive=_keep_alive(keep_alive))
        async with aclosing(chunks):  # a caller leaving early aborts the request before the slot is reused
            async for chunk in chunks:
                yield chunk

    async def embed(self, model: str, texts: Sequence[str], *,
                    keep_alive: str | float | None = None) -> np.ndarray:
        """Embed texts with a declared embedding model, as L2-normalised float32 rows."""
        self._check_open()
        return await self._pool.embed(model, texts, keep_alive=_keep_alive(keep_alive))

    # ---- indexes and pipelines

    async def index(self, name: str, *, rebuild: bool = False) -> OpenedIndex:
        """Open a declared index: reuse its saved build when the documents are unchanged, else (re)build it."""
        self._check_open()
        declared = self.spec.index(name)
        opened = self._indexes.get(name)
        if opened is not None and not rebuild:
            return opened
        lock = self._index_locks.setdefault(name, anyio.Lock())
        async with lock:
            opened = self._indexes.get(name)
            if opened is None or rebuild:
                async with self._pool.hold(declared.embedder) as lane:
                    embedder = _LaneEmbedder(self._pool, declared.embedder, lane.engine)  # type: ignore[arg-type]
                    progress = self._progress
                    opened = await open_index(
                        name, patterns=list(declared.document_globs), base_dir=self.spec.base_dir,
                        embedder=embedder, chunk_tokens=declared.chunk_tokens,
                        chunk_overlap=declared.chunk_overlap, root=self._index_root / self._index_folder(name),
                        rebuild=rebuild,
                        progress=(lambda done, total: progress(name, done, total)) if progress else None)
                self._indexes[name] = opened
                log.info("index ready", index=name, status=opened.status, chunks=opened.chunks,
                         documents=opened.documents, device=opened.device)
        return opened

    def _index_folder(self, name: str) -> str:
        """One folder per pipeline file and index name, so two projects never share an index by accident."""
        origin = str(self.spec.path.resolve() if self.spec.path else self.spec.base_dir.resolve())
        return hashlib.sha256(f"{origin}\0{name}".encode()).hexdigest()[:12]

    async def run(self, pipeline: str, inputs: Mapping[str, Any] | None = None, /, **kwargs: Any) -> RunResult:
        """Run a declared pipeline with inputs (a mapping, keywords, or both) and return its result."""
        self._check_open()
        declared = self.spec.pipeline(pipeline)
        return await execute(pipeline, declared, {**(inputs or {}), **kwargs}, self)

    def agent(self, name: str) -> Agent:
        """Return an agent defined under the project's agents/ folder (or an allowed module) by name."""
        if self._agents is None:
            from multilane.agents import load_agents

            self._agents = load_agents(self.spec)
        if name not in self._agents:
            raise UnknownNameError(f"unknown agent '{name}' (agents: {', '.join(sorted(self._agents)) or 'none'})")
        return self._agents[name]

    async def run_agent(self, agent: str | Agent, task: str) -> AgentResult:
        """Run an agent (by name, or an Agent object) on a task until it answers; see AgentResult."""
        from multilane.agents import run_agent

        self._check_open()
        return await run_agent(self.agent(agent) if isinstance(agent, str) else agent, task, self)

    @asynccontextmanager
    async def stream(self, pipeline: str, inputs: Mapping[str, Any] | None = None, /,
                     **kwargs: Any) -> AsyncGenerator[AsyncIterator[RunEvent], None]:
        """Run a pipeline as `run` does, as a context that yields its events (stages, generated text).

        `async with rt.stream("ask", question=q) as events: async for event in events: ...`. The last event
        is `run_finished` (with the output); after `run_failed` the loop raises the error. Leaving the block
        early cancels the run and aborts its engine requests.
        """
        self._check_open()
        declared = self.spec.pipeline(pipeline)
        bound = declared.check_inputs({**(inputs or {}), **kwargs}, pipeline=pipeline)
        send, receive = anyio.create_memory_object_stream[RunEvent](max_buffer_size=math.inf)
        failure: list[MultilaneError] = []

        async def produce() -> None:
            async with send:
                try:
                    await execute(pipeline, declared, bound, self, sink=send.send)
                except MultilaneError as exc:
                    failure.append(exc)

        async def events() -> AsyncIterator[RunEvent]:
            async for event in receive:
                yield event
            if failure:
                raise failure[0]

        raised: Exception | None = None
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(produce)
            try:
                yield events()
            except Exception as exc:  # re-raised below as itself, not wrapped in the task group's ExceptionGroup
                raised = exc
            finally:
                tg.cancel_scope.cancel()
        if raised is not None:
            raise raised


def _as_messages(messages: Sequence[Message] | str) -> list[Message]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def _as_prompt(messages: Sequence[Message] | str, raw: bool) -> list[Message] | str:
    if raw:
        if not isinstance(messages, str):
            raise MultilaneError("raw=True takes a prompt string, not messages")
        return messages
    return _as_messages(messages)


def _keep_alive(value: str | float | None) -> Any:
    """A per-call keep_alive in seconds (None when pinned by -1); not given (None) leaves the lane's own."""
    if value is None:
        return UNSET
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise MultilaneError(f"keep_alive: {exc}") from exc
