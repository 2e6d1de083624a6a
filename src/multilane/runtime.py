"""Runtime: the async API that composes spec, pool, indexes and the executor."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import structlog

from multilane.errors import EngineError, MultilaneError
from multilane.lanes import Engine, Lane, Pool
from multilane.pipeline.executor import RunResult, execute
from multilane.retrieval import OpenedIndex, open_index
from multilane.sources import multilane_home, resolve_source
from multilane.spec import Spec, load_spec

log = structlog.get_logger(__name__)

EngineFactory = Callable[[str, Spec], Awaitable[Engine]]
"""Makes the engine of a declared model (name, spec); the default loads real weights."""

ProgressCallback = Callable[[str, int, int], None]
"""Called with (index name, chunks embedded, chunks in all) while an index builds."""


async def load_engine(name: str, spec: Spec) -> Engine:
    """Resolve a model's source and start its engine: vLLM for generate models, sentence-transformers for embeddings."""
    model = spec.model(name)
    prepared = await anyio.to_thread.run_sync(lambda: resolve_source(model.source, base_dir=spec.base_dir))
    if model.kind == "embedding":
        from multilane.engines.sentence_transformers import SentenceTransformerEngine

        return await SentenceTransformerEngine.load(str(prepared.path), identity=prepared.identity,
                                                    batch_size=model.batch_size)
    from multilane.engines.vllm import VLLMEngine
    from multilane.memory import footprint

    context = model.context or 2048
    kv_bytes = footprint(prepared.path, model.dtype).kv_bytes(model.parallel, context)
    return await VLLMEngine.load(str(prepared.path), identity=prepared.identity, context=context,
                                 parallel=model.parallel, dtype=model.dtype, kv_cache_bytes=kv_bytes,
                                 options=model.engine)


class Runtime:
    """Runs a pipeline file's pipelines on resident models; use it as `async with Runtime.from_file(...)`."""

    def __init__(self, spec: Spec, *, engines: EngineFactory | None = None, index_root: Path | None = None,
                 progress: ProgressCallback | None = None) -> None:
        self.spec = spec
        self._engine_factory = engines or load_engine
        self._index_root = index_root or multilane_home() / "indexes"
        self._progress = progress
        self._pool = Pool({name: m.kind for name, m in spec.models.items()}, self._load)
        self._indexes: dict[str, OpenedIndex] = {}
        self._index_locks: dict[str, anyio.Lock] = {}
        self._open = False

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> Runtime:
        """Load and validate a pipeline file; raises SpecError naming file, line and field."""
        return cls(load_spec(path), **kwargs)

    async def __aenter__(self) -> Runtime:
        self._open = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every engine; the runtime cannot run anything afterwards."""
        self._open = False
        self._indexes.clear()
        await self._pool.close()

    def _check_open(self) -> None:
        if not self._open:
            raise MultilaneError("the runtime is not open; use `async with Runtime(...) as rt:`")

    async def _load(self, name: str) -> Engine:
        engine = await self._engine_factory(name, self.spec)
        expected = self.spec.model(name).kind
        from multilane.engines.base import EmbeddingEngine, GenerateEngine

        if not isinstance(engine, EmbeddingEngine if expected == "embedding" else GenerateEngine):
            await engine.close()
            raise EngineError(f"the engine made for model '{name}' is not a {expected} engine")
        return engine

    async def lane(self, name: str) -> Lane:
        """The lane of a declared model, loaded on first use."""
        self._check_open()
        return await self._pool.lane(name)

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
                embedder = await self.lane(declared.embedder)
                progress = self._progress
                opened = await open_index(
                    name, patterns=list(declared.document_globs), base_dir=self.spec.base_dir,
                    embedder=embedder.engine,  # type: ignore[arg-type]
                    chunk_tokens=declared.chunk_tokens, chunk_overlap=declared.chunk_overlap,
                    root=self._index_root / self._index_folder(name), rebuild=rebuild,
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

    def ps(self) -> list[dict[str, Any]]:
        """The loaded lanes."""
        return self._pool.ps()
