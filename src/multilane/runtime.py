"""Runtime: the async API that composes spec, pool, indexes and the executor."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import structlog
from opentelemetry import trace
from opentelemetry.trace import Tracer, TracerProvider

from multilane.durations import parse_duration
from multilane.engines.base import Chunk, Completion, EmbeddingEngine, Message, SamplingOptions
from multilane.errors import (
    EngineError,
    JournalError,
    MultilaneError,
    ResumeError,
    RuntimeClosedError,
    UnknownNameError,
)
from multilane.evaluation.dataset import GoldSet
from multilane.journal import CacheCounts, CacheLayer, Journal, JournalLayer, LoadedRun, ReplayLayer, ResumeLayer
from multilane.journal import journal_path as spec_journal_path
from multilane.lanes import UNSET, Engine, Lane, LanePlan, Pool, calls_observed
from multilane.pipeline.executor import RunEvent, RunResult, execute
from multilane.planning import EngineFactory, auto_budget, has_gpu, plan_model, plan_with_factory
from multilane.progress import ProgressCallback, ProgressUpdate, reporting, step
from multilane.progress import current as current_progress
from multilane.project import load_spec
from multilane.retrieval import OpenedIndex, open_index
from multilane.sources import multilane_home
from multilane.spec import PipelineSpec, Spec
from multilane.steps import Codec, Layer, Scope, Step, StepKind, canonical_json, model_attrs
from multilane.tracing import (
    TracedStep,
    TraceLayer,
    capture_content,
    export_provider,
    index_span,
    tracer_of,
    tracing_off,
)

if TYPE_CHECKING:
    from multilane.agents import Agent, AgentResult
    from multilane.evaluation.runner import EvalResult

log = structlog.get_logger(__name__)



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


_RUN_OUTPUT: Codec[RunResult] = Codec(lambda result: result.output)  # what the journal keeps of a finished run


async def _offline_engines(name: str, spec: Spec) -> Engine:
    raise EngineError(f"this runtime is offline (it replays recorded runs) and loads no model; model '{name}' "
                      "was asked for")


class Runtime:
    """Runs a pipeline file's pipelines on resident models; use it as `async with Runtime.from_file(...)`.

    Runs are journaled (`runtime.journal`, or `journal=` a path or "off"), so they can be looked at, resumed
    and replayed. An `offline` runtime loads no model: it is for replays.
    `progress` receives the progress of long work (GGUF conversions, model loads, index builds); without it,
    progress goes to the callback of the calling context (`multilane.progress.reporting`), if any.
    Every run is traced (see `multilane.tracing`) to `tracer_provider`, or else to the exporter that
    `runtime.tracing` or the OTEL_* variables name, or else to the global tracer provider (a no-op until set).
    """

    def __init__(self, spec: Spec, *, engines: EngineFactory | None = None, index_root: Path | None = None,
                 progress: ProgressCallback | None = None, journal: str | os.PathLike[str] | None = None,
                 offline: bool = False, tracer_provider: TracerProvider | None = None) -> None:
        self.spec = spec
        self.offline = offline
        self._engine_factory = _offline_engines if offline else engines
        if journal is None:
            self._journal_file = spec_journal_path(spec)
        else:
            self._journal_file = None if os.fspath(journal) == "off" else Path(journal).expanduser().absolute()
        self._journal: Journal | None = None
        self._cache: CacheLayer | None = None
        self.cache_counts: dict[str, CacheCounts] = {}  # cache hits and misses by model, for metrics
        self._resuming: set[str] = set()
        self._index_root = index_root or multilane_home() / "indexes"
        self._progress = progress
        runtime = spec.runtime
        self._pool = Pool(self._plan, models={name: (m.kind, m.keep_alive_seconds) for name, m in spec.models.items()},
                          budget_bytes=runtime.memory_budget_bytes, max_loaded=runtime.max_loaded_models,
                          max_queue=runtime.max_queue, max_overtakes=runtime.max_overtakes)
        self._indexes: dict[str, OpenedIndex] = {}
        self._index_locks: dict[str, anyio.Lock] = {}
        self._task_group: anyio.abc.TaskGroup | None = None  # entered by __aenter__, exited by __aexit__ only
        self._background: list[anyio.CancelScope] = []  # the reaper's and the journal writer's
        self._closed: anyio.Event | None = None  # set once close() has finished
        self._agents: Mapping[str, Agent] | None = dict(spec.agents) if spec.agents else None
        self._tracer_provider = tracer_provider
        self._exporting: Any = None  # the SDK tracer provider the runtime built to export, shut down on close
        self._trace: TraceLayer | None = None

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
        group = anyio.create_task_group()
        await group.__aenter__()
        self._task_group, self._background, self._closed = group, [], None
        self._start_background(self._pool.reap_forever)
        try:
            self._open_tracing()
            await self._open_journal()
            for name, model in self.spec.models.items():  # pinned and preloaded models load at start
                if (model.preload or model.keep_alive_seconds is None) and not self.offline:
                    await self._pool.lane(name)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.close()
        finally:
            # The task group can only be left by the task that entered it, from where it entered it: here.
            group, self._task_group = self._task_group, None
            if group is not None:
                await group.__aexit__(None, None, None)

    async def close(self) -> None:
        """Stop every engine, write what the journal has queued and stop the background tasks.

        Any task may call it, any number of times: each call returns once everything has stopped, and calls
        made afterwards raise RuntimeClosedError. The end of the `async with` block closes it too.
        """
        if self._closed is not None:
            await self._closed.wait()
            return
        self._closed = anyio.Event()
        journal, self._journal = self._journal, None
        exporting, self._exporting, self._trace = self._exporting, None, None
        self._indexes.clear()
        try:
            await self._pool.close()
        finally:
            try:
                if journal is not None:
                    await journal.close()
                if exporting is not None:  # send the spans still batched before the process may exit
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(exporting.shutdown)
            finally:
                # Only the background tasks are cancelled, each in its own scope: cancelling the task group's
                # scope would cancel the block of whoever opened the runtime, and only its owner may leave it.
                for scope in self._background:
                    scope.cancel()
                self._closed.set()

    def _start_background(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` in the runtime's task group until it returns or close() stops it."""
        assert self._task_group is not None
        scope = anyio.CancelScope()
        self._background.append(scope)

        async def run() -> None:
            with scope:
                await work()

        self._task_group.start_soon(run)

    def _open_tracing(self) -> None:
        """Choose where the runtime's spans go: the given provider, the configured exporter, or the global provider."""
        setting = self.spec.runtime.tracing
        provider = self._tracer_provider
        if provider is None:
            if tracing_off(setting):
                return
            provider = self._exporting = export_provider(setting)
        self._trace = TraceLayer(tracer_of(provider), content=capture_content(setting))

    @property
    def tracer(self) -> Tracer | None:
        """The tracer the runtime's spans go to while it is open (None when tracing is off), for the server's spans."""
        return self._trace.tracer if self._trace is not None else None

    async def _open_journal(self) -> None:
        """Open the journal (its writer runs in the runtime's task group) and the call cache over it."""
        if self._journal_file is not None:
            journal = Journal(self._journal_file, durable=self.spec.runtime.durable)
            await journal.open()
            self._start_background(journal.write_forever)
            self._journal = journal
        self._cache = CacheLayer(identity=self._model_identity, wanted=lambda model: self.spec.model(model).cache,
                                 counts=self.cache_counts, journal=self._journal)

    async def _model_identity(self, name: str) -> str:
        """What makes a model's output what it is (weights and engine settings), for cache keys."""
        return canonical_json((await self._pool.plan(name)).key)

    @property
    def journal(self) -> Journal | None:
        """The run journal, or None when it is off (or the runtime is not open)."""
        return self._journal

    def _check_open(self) -> None:
        if self._closed is not None:
            raise RuntimeClosedError("the runtime is closed (shutting down or shut down) and runs nothing more; "
                                     "open a new Runtime")
        if self._task_group is None:
            raise MultilaneError("the runtime is not open; use `async with Runtime(...) as rt:`")

    async def _plan(self, name: str) -> LanePlan:
        """Plan a model's lane, reporting the preparation of its source and, later, its load as progress."""
        with reporting(self._progress):
            plan = await self._plan_lane(name)
        load, progress = plan.load, self._progress

        async def load_reporting() -> Engine:
            with reporting(progress), step(f"load:{name}", f"loading model '{name}'"):
                return await load()

        return dataclasses.replace(plan, load=load_reporting)

    async def _plan_lane(self, name: str) -> LanePlan:
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
                       raw: bool = False, priority: int = 0) -> Completion:
        """Generate a completion of a chat (or of one user message) with a declared generate model.

        With `raw=True`, `messages` is a prompt string tokenized as is, without the chat template. `priority`
        orders the call among those waiting for the model's slots: lower first (default 0).
        """
        self._check_open()
        prompt, options = _as_prompt(messages, raw), options or SamplingOptions()
        traced = self._direct("model", model_attrs(model, prompt, options, truncate=truncate, cache=None))
        if traced is None:
            return await self._pool.generate(model, prompt, options, truncate=truncate,
                                             keep_alive=_keep_alive(keep_alive), priority=priority)
        try:
            with trace.use_span(traced.span, record_exception=False, set_status_on_exception=False), \
                    traced.observing():
                done = await self._pool.generate(model, prompt, options, truncate=truncate,
                                                 keep_alive=_keep_alive(keep_alive), priority=priority)
        except BaseException as exc:
            traced.failed(exc)
            raise
        traced.succeeded(done)
        return done

    def _direct(self, kind: StepKind, attrs: dict[str, Any]) -> TracedStep | None:
        """The span of a model call made outside a run (an API request, a script), when tracing is on.

        A call made inside a run's step is part of that step's span already (its lane figures go there).
        """
        if self._trace is None or calls_observed():
            return None
        return self._trace.start(Step(kind, "", "", attrs, leaf=True))

    async def generate_stream(self, model: str, messages: Sequence[Message] | str,
                              options: SamplingOptions | None = None, *, truncate: bool = False,
                              keep_alive: str | float | None = None, raw: bool = False,
                              priority: int = 0) -> AsyncGenerator[Chunk, None]:
        """Stream a completion chunk by chunk (`raw` and `priority` as in `generate`); leaving the loop early
        aborts the request."""
        self._check_open()
        prompt, options = _as_prompt(messages, raw), options or SamplingOptions()
        traced = self._direct("model", model_attrs(model, prompt, options, truncate=truncate, cache=None))
        chunks = self._pool.stream(model, prompt, options, truncate=truncate, keep_alive=_keep_alive(keep_alive),
                                   priority=priority)
        async with aclosing(chunks):  # a caller leaving early aborts the request before the slot is reused
            if traced is None:
                async for chunk in chunks:
                    yield chunk
                return
            # The span is never made the current one here, nor the observer left set: between two chunks the
            # consumer runs in this context, maybe in another task. The lane takes its observer on the first.
            seen: list[Chunk] = []
            try:
                with traced.observing():
                    first = await anext(chunks, None)
                if first is not None:
                    seen.append(first)
                    yield first
                    async for chunk in chunks:
                        seen.append(chunk)
                        yield chunk
            except BaseException as exc:
                try:
                    await chunks.aclose()  # the lane tells the span how the call went before the span ends
                finally:
                    traced.failed(exc)
                raise
            traced.succeeded(Completion("".join(c.text for c in seen), max((c.prompt_tokens for c in seen), default=0),
                                        sum(c.tokens for c in seen),
                                        next((c.finish_reason for c in reversed(seen) if c.finish_reason), None),
                                        cached_tokens=max((c.cached_tokens for c in seen), default=0)))

    async def embed(self, model: str, texts: Sequence[str], *,
                    keep_alive: str | float | None = None) -> np.ndarray:
        """Embed texts with a declared embedding model, as L2-normalised float32 rows."""
        self._check_open()
        traced = self._direct("embed", {"model": model, "texts": len(texts)})
        if traced is None:
            return await self._pool.embed(model, texts, keep_alive=_keep_alive(keep_alive))
        try:
            with trace.use_span(traced.span, record_exception=False, set_status_on_exception=False), \
                    traced.observing():
                vectors = await self._pool.embed(model, texts, keep_alive=_keep_alive(keep_alive))
        except BaseException as exc:
            traced.failed(exc)
            raise
        traced.succeeded(vectors)
        return vectors

    # ---- indexes and pipelines

    async def index(self, name: str, *, rebuild: bool = False) -> OpenedIndex:
        """Open a declared index: reuse its saved build when the documents are unchanged, else (re)build it.

        An index of a `corpus` exports that corpus first (once; see `multilane.corpora`).
        """
        self._check_open()
        declared = self.spec.index(name)
        opened = self._indexes.get(name)
        if opened is not None and not rebuild:
            return opened
        lock = self._index_locks.setdefault(name, anyio.Lock())
        async with lock:
            opened = self._indexes.get(name)
            if opened is None or rebuild:
                patterns, base_dir = list(declared.document_globs), self.spec.base_dir
                if declared.corpus is not None:
                    from multilane.corpora import CORPUS_PATTERNS, corpus_folder

                    patterns, base_dir = list(CORPUS_PATTERNS), await anyio.to_thread.run_sync(
                        corpus_folder, declared.corpus)
                with reporting(self._progress), _IndexProgress(name) as embedded, \
                        index_span(self.tracer, name) as traced:
                    async with self._pool.hold(declared.embedder) as lane:
                        traced.held(lane)
                        embedder = _LaneEmbedder(self._pool, declared.embedder, lane.engine)  # type: ignore[arg-type]
                        opened = await open_index(
                            name, patterns=patterns, base_dir=base_dir,
                            embedder=embedder, chunk_tokens=declared.chunk_tokens,
                            chunk_overlap=declared.chunk_overlap, root=self._index_root / self._index_folder(name),
                            rebuild=rebuild, headings=declared.chunk_headings,
                            bm25=(declared.bm25.k1, declared.bm25.b), window_tokens=declared.window_tokens,
                            progress=embedded.report)
                    traced.opened(opened)
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
        bound = declared.check_inputs({**(inputs or {}), **kwargs}, pipeline=pipeline)
        return await self._execute(pipeline, declared, bound, [*self._tracing(), *self._layers()])

    async def resume(self, run_id: str, *, force: bool = False) -> RunResult:
        """Finish a journaled run that was interrupted (or failed): its finished stages, items, agent steps and
        tool calls are read from the journal, not run again.

        Refused (ResumeError) when the run finished, still runs in a live process, or was started with a
        different version of the pipeline file; `force=True` resumes anyway, with the file as it is now.
        """
        self._check_open()
        loaded = await self._load_run(run_id, "resume")
        run = loaded.run
        if run.status == "finished":
            raise ResumeError(f"run '{run_id}' already finished; `multilane runs show {run_id}` shows its output, "
                              f"and `multilane runs replay {run_id}` runs it again from its recording")
        here = run.pid == os.getpid() and run.host == socket.gethostname()
        if run_id in self._resuming or (run.status == "running" and (here or not force)):
            raise ResumeError(f"run '{run_id}' is still running (process {run.pid} on {run.host}); resume it once "
                              "that process is gone" + ("" if here else ", or force it if you know it is"))
        if run.spec_hash != self.spec.digest and not force:
            raise ResumeError(
                f"run '{run_id}' was started with a different version of {run.spec_file or 'its pipeline file'} "
                f"(sha256 {run.spec_hash[:12]}, now {self.spec.digest[:12]}); resume with force=True (--force) to "
                "keep its finished steps and run the rest with the file as it is now")
        declared = self.spec.pipeline(run.pipeline)
        bound = declared.check_inputs(run.inputs, pipeline=run.pipeline)
        log.info("resuming run", run_id=run_id, pipeline=run.pipeline, attempt=run.attempts + 1,
                 finished_steps=sum(step.ok for step in loaded.steps.values()))
        self._resuming.add(run_id)
        try:
            layers = [*self._tracing(), ResumeLayer(loaded.steps), *self._layers(attempt=run.attempts + 1)]
            return await self._execute(run.pipeline, declared, bound, layers, run_id)
        finally:
            self._resuming.discard(run_id)

    async def replay(self, run_id: str) -> RunResult:
        """Run a journaled run again with its recorded model, retrieval and tool outputs, calling no model.

        Templates, output parsing and agent loops run as the pipeline file says now, so a change can be tried
        against a real past run; a call the recording does not have is a ReplayError. Nothing is journaled.
        """
        self._check_open()
        loaded = await self._load_run(run_id, "replay")
        run = loaded.run
        if run.spec_hash != self.spec.digest:
            log.warning("replaying with a changed pipeline file", run_id=run_id, file=run.spec_file)
        declared = self.spec.pipeline(run.pipeline)
        bound = declared.check_inputs(run.inputs, pipeline=run.pipeline)
        return await self._execute(run.pipeline, declared, bound, [*self._tracing(), ReplayLayer(run_id, loaded.steps)],
                                   run_id)

    async def _load_run(self, run_id: str, purpose: str) -> LoadedRun:
        if self._journal is None:
            raise JournalError(f"cannot {purpose} run '{run_id}': this runtime has no journal "
                               f"({'runtime.journal is off' if self._journal_file is None else 'it is closed'})")
        return await self._journal.load(run_id)

    def _tracing(self) -> list[Layer]:
        """The trace layer, outermost: its spans cover steps that a later layer answers (resume, replay, cache)."""
        return [self._trace] if self._trace is not None else []

    def _layers(self, *, attempt: int = 1) -> list[Layer]:
        """The layers of a run's steps: the journal records them, the cache answers repeated model calls."""
        layers: list[Layer] = []
        if self._journal is not None:
            layers.append(JournalLayer(self._journal, attempt=attempt))
        if self._cache is not None:
            layers.append(self._cache)
        return layers

    async def _execute(self, pipeline: str, declared: PipelineSpec, bound: dict[str, Any], layers: list[Layer],
                       run_id: str | None = None, sink: Callable[[RunEvent], Awaitable[None]] | None = None,
                       ) -> RunResult:
        """Execute a run as the step `run`, under which every stage and call is a step through `layers`."""
        scope = Scope(run_id or uuid.uuid4().hex[:12], layers=layers)
        attrs = {"pipeline": pipeline, "inputs": bound, "stages": list(declared.stages), "spec_hash": self.spec.digest,
                 "spec_file": str(self.spec.path.absolute()) if self.spec.path is not None else None}
        return await scope.run("run", lambda: execute(pipeline, declared, bound, self, sink=sink, scope=scope),
                               attrs=attrs, codec=_RUN_OUTPUT)

    async def evaluate(self, pipeline: str, dataset: GoldSet | str | os.PathLike[str], *, concurrency: int = 8,
                       retrieve_stage: str | None = None, answer_stage: str | None = None,
                       question_input: str | None = None,
                       progress: Callable[[int, int], None] | None = None) -> EvalResult:
        """Run a gold set's questions through a pipeline, `concurrency` at a time, and score retrieval and answers.

        Which stage retrieves and which answers come from the arguments or the gold set's "eval" record; see
        `multilane.evaluation.runner` for what each number means.
        """
        from multilane.evaluation.runner import evaluate

        self._check_open()
        source = dataset if isinstance(dataset, GoldSet) else Path(dataset)
        return await evaluate(self, pipeline, source, concurrency=concurrency, retrieve_stage=retrieve_stage,
                              answer_stage=answer_stage, question_input=question_input, progress=progress)

    def agent(self, name: str) -> Agent:
        """Return an agent defined under the project's agents/ folder (or an allowed module) by name."""
        if self._agents is None:
            from multilane.project import load_agents

            self._agents = load_agents(self.spec)
        if name not in self._agents:
            raise UnknownNameError(f"unknown agent '{name}' (agents: {', '.join(sorted(self._agents)) or 'none'})")
        return self._agents[name]

    async def run_agent(self, agent: str | Agent, task: str, *, priority: int = 0) -> AgentResult:
        """Run an agent (by name, or an Agent object) on a task until it answers; see AgentResult.

        Its model calls (and its sub-agents') wait for slots at `priority`. Raises UnknownNameError before
        anything runs when the agent (or a sub-agent) names a model or index that the pipeline file does not
        declare.
        """
        from multilane.agents import run_agent
        from multilane.project import check_agent

        self._check_open()
        resolved = self.agent(agent) if isinstance(agent, str) else agent
        problems = check_agent(resolved, self.spec)  # an agent defined in a script was never checked
        if problems:
            raise UnknownNameError("; ".join(problems))
        layers = [*self._tracing(), *([self._cache] if self._cache is not None else [])]
        scope = Scope(uuid.uuid4().hex[:12], layers=layers).child("agent")
        return await run_agent(resolved, task, self, scope=scope, priority=priority)

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
                    await self._execute(pipeline, declared, bound, [*self._tracing(), *self._layers()],
                                        sink=send.send)
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


class _IndexProgress:
    """Reports the chunks an index build embeds, as one piece of work; nothing when the saved index is reused."""

    def __init__(self, name: str) -> None:
        self._key, self._description = f"index:{name}", f"embedding index '{name}'"
        self._callback = current_progress()
        self._last: ProgressUpdate | None = None

    def report(self, done: int, total: int) -> None:
        if self._callback is not None:
            self._last = ProgressUpdate(self._key, self._description, done, total, finished=done >= total)
            self._callback(self._last)

    def __enter__(self) -> _IndexProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        last = self._last
        if last is not None and not last.finished and self._callback is not None:  # the build failed midway
            self._callback(dataclasses.replace(last, finished=True, failed=True))


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
