"""Fan-in: concurrent calls reach one engine together; embeddings and searches coalesce into batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from multilane import InputError, SamplingOptions
from multilane.retrieval import open_index
from multilane.testing import FakeEmbeddingEngine, FakeGenerateEngine

pytestmark = pytest.mark.anyio

CHAT = """
models:
  assistant: {kind: generate, source: ./assistant, parallel: 16}
"""


@pytest.mark.virtual_clock  # token delays take virtual time: the order is exact
async def test_sixteen_concurrent_calls_reach_the_engine_together(fake_runtime: Any) -> None:
    engine = FakeGenerateEngine("a b c d", token_delay=0.01)
    rt, _ = fake_runtime(CHAT, assistant=engine)
    async with rt:
        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(rt.generate, "assistant", f"question {i}", SamplingOptions(max_tokens=4))

    assert len(engine.calls) == 16
    last_start = max(call.started for call in engine.calls)
    first_end = min(call.finished for call in engine.calls if call.finished is not None)
    assert last_start < first_end  # every call was inside the engine before any finished: one batch


@pytest.mark.virtual_clock  # token delays take virtual time: the order is exact
async def test_calls_past_the_slots_wait_and_then_run(fake_runtime: Any) -> None:
    engine = FakeGenerateEngine("a b c d", token_delay=0.01)
    rt, _ = fake_runtime(CHAT.replace("parallel: 16", "parallel: 4"), assistant=engine)
    async with rt:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(rt.generate, "assistant", f"question {i}", SamplingOptions(max_tokens=4))

    starts = sorted(call.started for call in engine.calls)
    ends = sorted(call.finished for call in engine.calls if call.finished is not None)
    assert starts[3] < ends[0] <= starts[4]  # four at once; the fifth started only when a slot was freed


class CountingEmbedder(FakeEmbeddingEngine):
    """A fake embedder whose embed is micro-batched the way the real engine's is."""

    def __init__(self) -> None:
        super().__init__()
        from multilane.batching import MicroBatcher

        self.batcher: MicroBatcher[str, np.ndarray] = MicroBatcher(self._batch, max_batch_size=64, max_wait=0.005)
        self.encodes: list[int] = []

    async def _batch(self, texts: list[str]) -> list[np.ndarray]:
        self.encodes.append(len(texts))
        return list(await super().embed(texts))

    async def embed(self, texts: Any) -> np.ndarray:
        return np.stack(await self.batcher.submit_many(list(texts)))


async def test_concurrent_searches_on_one_index_run_as_one_multi_query_search(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    topics = ["otters sleep holding hands", "lava is magma at the surface", "yeast makes dough rise"]
    for i, text in enumerate(topics):
        (tmp_path / "docs" / f"{i}.md").write_text(f"# Note {i}\n\n{text}\n")
    embedder = CountingEmbedder()
    index = await open_index("notes", patterns=["docs/*.md"], base_dir=tmp_path, embedder=embedder,
                             chunk_tokens=32, chunk_overlap=4, root=tmp_path / "indexes")
    results: dict[int, Any] = {}

    async def search(i: int) -> None:
        results[i] = await index.search([topics[i % 3]], top_k=1 + i % 2)

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(search, i)

    stats = index.batcher.stats()
    assert stats.items == 30 and stats.batches < 5  # 30 searches, a handful of FAISS calls
    for i, hits in results.items():
        assert len(hits[0]) == 1 + i % 2  # each caller got its own top_k
        assert hits[0][0].chunk.source == f"docs/{i % 3}.md"  # and its own query's best match
    assert max(embedder.encodes[1:]) > 1  # the query embeddings were batched too


async def test_a_bad_search_fails_alone(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\notters and seals\n")
    index = await open_index("notes", patterns=["docs/*.md"], base_dir=tmp_path, embedder=FakeEmbeddingEngine(),
                             chunk_tokens=32, chunk_overlap=4, root=tmp_path / "indexes")
    outcomes: dict[str, Any] = {}

    async def good() -> None:
        outcomes["good"] = await index.search(["otters"], top_k=1)

    async def bad() -> None:
        try:
            await index.search(["otters"], top_k=0)
        except InputError as exc:
            outcomes["bad"] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(good)
        tg.start_soon(bad)
    assert isinstance(outcomes["bad"], InputError) and "top_k" in str(outcomes["bad"])
    assert outcomes["good"][0][0].chunk.source == "docs/a.md"
