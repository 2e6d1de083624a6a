"""Shared fixtures of the unit tests: the anyio backend, specs from YAML text, and runtimes on fake engines."""

from __future__ import annotations

import itertools
import logging
import os
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog
from trio.testing import MockClock

from multilane import Runtime, SamplingOptions, Spec, parse_spec
from multilane.engines.base import Chunk
from multilane.logs import LOGGER, route_to_logging
from multilane.server import create_app
from multilane.testing import FakeEmbeddingEngine, FakeGenerateEngine

Engine = FakeGenerateEngine | FakeEmbeddingEngine


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """asyncio; a test marked `virtual_clock` runs on trio with a mock clock that jumps whenever every task
    waits, so its sleeps and timeouts take no wall time and durations can be asserted exactly."""
    if request.node.get_closest_marker("virtual_clock"):
        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return "asyncio"


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test gets its own MULTILANE_HOME, so runs are journaled under tmp_path, never in the user's cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("MULTILANE_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """The CLI and some tests configure structlog and logging globally; give every test the library's defaults back.

    `multilane -vv` also turns the libraries underneath loud through the environment: that is undone too.
    """
    root, package, vllm = logging.getLogger(), logging.getLogger(LOGGER), logging.getLogger("vllm")
    handlers, vllm_handlers, levels = list(root.handlers), list(vllm.handlers), (root.level, package.level)
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
    vllm.handlers[:] = vllm_handlers
    structlog.reset_defaults()
    route_to_logging()
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(levels[0])
    package.setLevel(levels[1])


class FakeEngines:
    """An engine factory for `Runtime(engines=...)` that hands out fakes and counts how often each model loads."""

    def __init__(self, spec: Spec, engines: dict[str, Engine]) -> None:
        self.engines: dict[str, Engine] = {}
        for name, model in spec.models.items():
            default: Engine = FakeGenerateEngine() if model.kind == "generate" else FakeEmbeddingEngine()
            self.engines[name] = engines.get(name, default)
        self.loads: Counter[str] = Counter()

    async def __call__(self, name: str, spec: Spec) -> Any:
        self.loads[name] += 1
        return self.engines[name]

    def __getitem__(self, name: str) -> Any:
        return self.engines[name]


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[[str], Spec]:
    """Parse dedented pipeline YAML with tmp_path as its folder."""

    def make(text: str) -> Spec:
        return parse_spec(textwrap.dedent(text), file="t.yaml", base_dir=tmp_path)

    return make


@pytest.fixture
def fake_runtime(tmp_path: Path, make_spec: Callable[[str], Spec]) -> Callable[..., tuple[Runtime, FakeEngines]]:
    """Make a Runtime over pipeline YAML whose models are fakes: pass engines by model name to choose them."""

    def make(text: str, **engines: Engine) -> tuple[Runtime, FakeEngines]:
        spec = make_spec(text)
        factory = FakeEngines(spec, engines)
        return Runtime(spec, engines=factory, index_root=tmp_path / "indexes"), factory

    return make


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    """Three tiny markdown documents under tmp_path/docs."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "otters.md").write_text("# Otters\n\nSea otters hold hands while sleeping so they do not drift apart.\n")
    (folder / "volcanoes.md").write_text("# Volcanoes\n\nMagma that reaches the surface is called lava.\n")
    (folder / "bread.md").write_text("# Bread\n\nYeast ferments sugar and the dough rises before baking.\n")
    return folder


class HeldEngine(FakeGenerateEngine):
    """A fake generate engine whose calls stream their first `before_hold` tokens, then hold until `release`.

    `holding` is set when a call holds, so a test knows a request is mid-stream without sleeping.
    """

    def __init__(self, reply: str = "fake reply", *, before_hold: int = 1, **options: Any) -> None:
        super().__init__(reply, **options)
        self.before_hold = before_hold
        self.holding = anyio.Event()
        self.release = anyio.Event()

    async def stream(self, prompt_ids: Sequence[int], options: SamplingOptions, request_id: str, *,
                     priority: int = 0) -> AsyncIterator[Chunk]:
        """Stream as the fake does, holding after `before_hold` chunks until released."""
        async with aclosing(super().stream(prompt_ids, options, request_id, priority=priority)) as chunks:
            for sent in itertools.count():
                if sent == self.before_hold:
                    self.holding.set()
                    await self.release.wait()
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                yield chunk


@pytest.fixture
def held() -> Callable[..., HeldEngine]:
    """Make a HeldEngine (inside the test, where its events can be created)."""
    return HeldEngine


SERVER_SPEC = """
models:
  assistant: {kind: generate, source: ./assistant, parallel: 2}
  embedder: {kind: embedding, source: ./embedder}
runtime: {max_queue: 1}
pipelines:
  echo:
    description: Answers a question.
    inputs: {question: str}
    stages:
      answer: {kind: reason, model: assistant, prompt: "Question: {{ inputs.question }}", max_tokens: 64}
    output: "{{ stages.answer.text }}"
"""
"""The pipeline file of the server tests: a generate and an embedding model, a queue of 1, one pipeline."""


@pytest.fixture
def server_spec() -> str:
    """SERVER_SPEC, for tests that vary it."""
    return SERVER_SPEC


@dataclass
class Served:
    """An app over fake engines, with an httpx client on it."""

    client: httpx.AsyncClient
    runtime: Runtime
    engines: Any
    app: Any


@pytest.fixture
def serve(fake_runtime: Callable[..., tuple[Runtime, Any]]) -> Callable[..., Any]:
    """Open an app over a fake runtime (its lifespan opens the runtime) with an httpx client on it."""

    @asynccontextmanager
    async def make(spec: str = SERVER_SPEC, *, api_key: str | None = None, max_body_bytes: int = 4 * 1024 * 1024,
                   **engines: Any) -> AsyncIterator[Served]:
        rt, factory = fake_runtime(spec, **engines)
        app = create_app(rt, api_key=api_key, max_body_bytes=max_body_bytes)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                yield Served(client, rt, factory, app)

    return make
