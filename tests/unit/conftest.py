"""Shared fixtures of the unit tests: the anyio backend, specs from YAML text, and runtimes on fake engines."""

from __future__ import annotations

import itertools
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from trio.testing import MockClock

from multilane import Runtime, SamplingOptions, Spec, parse_spec
from multilane.engines.base import Chunk
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
def _reset_structlog() -> Iterator[None]:
    """The CLI and some tests configure structlog globally; give every test the defaults back."""
    yield
    structlog.reset_defaults()


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

    def __init__(self, reply: str = "fake reply", *, before_hold: int = 1) -> None:
        super().__init__(reply)
        self.before_hold = before_hold
        self.holding = anyio.Event()
        self.release = anyio.Event()

    async def stream(self, prompt_ids: Sequence[int], options: SamplingOptions,
                     request_id: str) -> AsyncIterator[Chunk]:
        """Stream as the fake does, holding after `before_hold` chunks until released."""
        async with aclosing(super().stream(prompt_ids, options, request_id)) as chunks:
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
