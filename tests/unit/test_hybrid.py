"""Front matter, heading paths, the persisted keyword index, and dense/keyword/hybrid search with filters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest

from multilane.corpora import python_reference_topics
from multilane.errors import IndexBuildError, InputError
from multilane.retrieval import Document, OpenedIndex, chunk_document, collect_documents, open_index
from multilane.retrieval.filters import DocumentFilter, path_matches
from multilane.retrieval.ingest import heading_paths, read_front_matter, window_parents
from multilane.testing import FakeEmbeddingEngine

DOCS = {
    "history/lighthouse.md": "---\ntags: [lighthouse, history]\nyear: 1887\n---\n# Cape Orrin Lighthouse\n"
                             "Tamsin Holloway built the lighthouse tower of granite in 1887.\n",
    "history/wreck.md": "---\ntags: [history]\nyear: 1922\n---\n# The Wreck\n"
                        "The steamer struck the Gullstone reef near the lighthouse in a January gale.\n",
    "nature/puffins.md": "---\ntags: [birds]\n---\n# Puffins\nPuffins nest in burrows on the cliffs near the "
                         "lighthouse and dive for sand eels.\n",
    "visiting/ferry.md": "# Ferry\nThe ferry MV_Skarra sails to the island at dawn; ring VHF channel 14.\n",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def write(base: Path, docs: dict[str, str] = DOCS) -> None:
    for name, text in docs.items():
        path = base / "docs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


async def open_docs(base: Path, embedder: Any | None = None, **overrides: Any) -> OpenedIndex:
    options: dict[str, Any] = {"patterns": ["docs/**/*.md"], "base_dir": base, "chunk_tokens": 64,
                               "embedder": embedder or FakeEmbeddingEngine(), "chunk_overlap": 0,
                               "root": base / "indexes"}
    options.update(overrides)
    return await open_index("docs", **options)


def sources(hits: Any) -> list[str]:
    return [hit.chunk.source.removeprefix("docs/") for hit in hits]


# --- front matter and headings ------------------------------------------------------------------------------


def test_front_matter_is_metadata_and_the_body_follows_it(tmp_path: Path) -> None:
    write(tmp_path)
    docs = {doc.path: doc for doc in collect_documents(["docs/**/*.md"], tmp_path)}
    lighthouse = docs["docs/history/lighthouse.md"]
    assert lighthouse.meta == {"tags": ["lighthouse", "history"], "year": 1887}
    assert lighthouse.body.startswith("# Cape Orrin Lighthouse\n")
    assert docs["docs/visiting/ferry.md"].meta == {}
    assert docs["docs/visiting/ferry.md"].body_start == 0


def test_front_matter_is_never_chunked(tmp_path: Path) -> None:
    write(tmp_path)
    [doc] = [d for d in collect_documents(["docs/**/*.md"], tmp_path) if d.path.endswith("lighthouse.md")]
    spans = [(s + doc.body_start, e + doc.body_start) for s, e in FakeEmbeddingEngine().token_spans(doc.body)]
    chunks = chunk_document(doc, spans, 4, 0)
    assert chunks[0].text.startswith("# Cape Orrin")
    assert all("tags:" not in chunk.text for chunk in chunks)
    assert all(doc.text[c.start:c.end] == c.text for c in chunks)


@pytest.mark.parametrize(("text", "message"), [
    ("---\ntags: [a\n---\nbody", "x.md:3: the front matter is not valid YAML"),
    ("---\n- a\n- b\n---\nbody", "x.md:2: the front matter must be a YAML mapping"),
])
def test_bad_front_matter_names_the_file_and_line(text: str, message: str) -> None:
    with pytest.raises(IndexBuildError, match=message):
        read_front_matter(text, "x.md")


def test_heading_paths_follow_sections_and_skip_code_and_doctests() -> None:
    text = ("# Compound statements\nIntro.\n\n## The try statement\nText.\n\n```\n# not a heading\n```\n\n"
            "   >>> # a doctest comment\n\n### except clause\nMore.\n\n## The with statement\nEnd.\n")
    offsets, paths = heading_paths(text)
    assert paths == ["Compound statements", "Compound statements > The try statement",
                     "Compound statements > The try statement > except clause",
                     "Compound statements > The with statement"]
    assert [text[o:].split("\n")[0] for o in offsets] == [
        "# Compound statements", "## The try statement", "### except clause", "## The with statement"]


def test_chunks_carry_their_heading_path_only_when_asked() -> None:
    text = "# Guide\nIntro words here.\n## Ferry\nThe ferry sails at dawn daily.\n"
    doc = Document(path="g.md", text=text, sha256="x")
    spans = FakeEmbeddingEngine().token_spans(text)
    with_headings = chunk_document(doc, spans, 4, 0, headings=True)
    assert [c.heading for c in with_headings] == ["Guide", "Guide", "Guide > Ferry", "Guide > Ferry"]
    assert with_headings[3].indexed_text == f"Guide > Ferry\n\n{with_headings[3].text}"
    assert all(c.heading == "" and c.indexed_text == c.text for c in chunk_document(doc, spans, 4, 0))


@pytest.mark.anyio
async def test_headings_change_the_fingerprint_and_are_persisted(tmp_path: Path) -> None:
    write(tmp_path)
    plain = await open_docs(tmp_path)
    headed = await open_docs(tmp_path, headings=True)
    assert headed.status == "rebuilt" and headed.fingerprint != plain.fingerprint
    reopened = await open_docs(tmp_path, headings=True)
    assert reopened.status == "reused"
    assert {c.heading for c in reopened.index.chunks} >= {"Cape Orrin Lighthouse", "Puffins"}
    assert json.loads((reopened.path / "manifest.json").read_text())["headings"] is True


# --- the keyword index beside the FAISS index ---------------------------------------------------------------


@pytest.mark.anyio
async def test_a_build_writes_the_keyword_index_before_its_manifest_and_a_reopen_loads_it(tmp_path: Path) -> None:
    write(tmp_path)
    built = await open_docs(tmp_path)
    assert built.keyword_status == "built"
    assert (built.path / "keyword" / "keyword.json").is_file()
    manifest = json.loads((built.path / "manifest.json").read_text())
    assert manifest["keyword"]["folder"] == "keyword" and manifest["keyword"]["tokenizer"]
    assert (built.path / "keyword").stat().st_mtime <= (built.path / "manifest.json").stat().st_mtime

    embedder = FakeEmbeddingEngine()
    reopened = await open_docs(tmp_path, embedder)
    assert reopened.status == "reused" and reopened.keyword_status == "not loaded"
    [hits] = await reopened.search(["MV_Skarra"], 2, mode="keyword")
    assert sources(hits) == ["visiting/ferry.md"]
    assert reopened.keyword_status == "loaded"
    assert embedder.calls == []  # a keyword search embeds nothing


@pytest.mark.anyio
@pytest.mark.parametrize("damage", ["missing", "other rules"])
async def test_an_unusable_keyword_index_is_rebuilt_in_memory_and_the_build_is_left_alone(
        tmp_path: Path, damage: str) -> None:
    write(tmp_path)
    built = await open_docs(tmp_path)
    folder = built.path / "keyword"
    if damage == "missing":
        shutil.rmtree(folder)
    else:
        meta = json.loads((folder / "keyword.json").read_text())
        (folder / "keyword.json").write_text(json.dumps({**meta, "tokenizer": "older-rules"}))
    before = sorted(p.name for p in built.path.rglob("*"))

    reopened = await open_docs(tmp_path)
    [hits] = await reopened.search(["VHF channel 14"], 1, mode="keyword")

    assert reopened.status == "reused"  # the embeddings are still good
    assert reopened.keyword_status == "rebuilt in memory"
    assert sources(hits) == ["visiting/ferry.md"]
    assert sorted(p.name for p in reopened.path.rglob("*")) == before  # a committed build is never written


@pytest.mark.anyio
async def test_other_bm25_parameters_rebuild_the_keyword_index_in_memory_and_keep_the_embeddings(
        tmp_path: Path) -> None:
    write(tmp_path)
    built = await open_docs(tmp_path)
    manifest = json.loads((built.path / "manifest.json").read_text())
    assert (manifest["keyword"]["k1"], manifest["keyword"]["b"]) == (0.9, 0.4)
    before = sorted(p.name for p in built.path.rglob("*"))

    reopened = await open_docs(tmp_path, bm25=(1.2, 0.75))
    words = await reopened.keyword_index()

    assert reopened.status == "reused" and reopened.keyword_status == "rebuilt in memory"
    assert (words.k1, words.b) == (1.2, 0.75)
    assert sorted(p.name for p in reopened.path.rglob("*")) == before
    again = await open_docs(tmp_path)
    assert (await again.keyword_index()).b == 0.4 and again.keyword_status == "loaded"
    with pytest.raises(IndexBuildError, match="index 'docs': BM25's b must be from 0 to 1, got 2"):
        await open_docs(tmp_path, bm25=(0.9, 2))


@pytest.mark.anyio
async def test_concurrent_keyword_searches_batch(tmp_path: Path) -> None:
    write(tmp_path)
    opened = await open_docs(tmp_path)
    await opened.keyword_index()
    results: dict[int, list[str]] = {}

    async def one(i: int, query: str) -> None:
        [hits] = await opened.search([query], 1, mode="keyword")
        results[i] = sources(hits)

    queries = ["puffins burrows", "Gullstone reef", "MV_Skarra", "granite tower"] * 8
    async with anyio.create_task_group() as tg:
        for i, query in enumerate(queries):
            tg.start_soon(one, i, query)

    expected = {"puffins burrows": "nature/puffins.md", "Gullstone reef": "history/wreck.md",
                "MV_Skarra": "visiting/ferry.md", "granite tower": "history/lighthouse.md"}
    assert all(results[i] == [expected[q]] for i, q in enumerate(queries))
    stats = opened.keyword_batcher.stats()
    assert stats.items == len(queries) and stats.largest_batch > 1


# --- modes, fusion, filters and the per-document cap ---------------------------------------------------------


@pytest.mark.anyio
async def test_hybrid_fuses_dense_and_keyword_rankings(tmp_path: Path) -> None:
    write(tmp_path)
    opened = await open_docs(tmp_path)
    query = "which island ferry needs VHF channel 14"
    [dense] = await opened.search([query], 4)
    [words] = await opened.search([query], 4, mode="keyword")
    [hybrid] = await opened.search([query], 4, mode="hybrid")
    [keyword_only] = await opened.search([query], 4, mode="hybrid", weights=(0.0, 1.0))

    assert sources(hybrid)[0] == "visiting/ferry.md"
    assert sources(keyword_only) == sources(words)
    assert {h.chunk.id for h in hybrid} <= {h.chunk.id for h in dense} | {h.chunk.id for h in words}
    assert all(0 < hit.score <= 2 / 61 for hit in hybrid)  # reciprocal rank scores, k = 60
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
async def test_filters_keep_only_matching_documents_before_the_cut_to_top_k(tmp_path: Path, mode: str) -> None:
    write(tmp_path)
    opened = await open_docs(tmp_path, chunk_tokens=8)
    query = "lighthouse"

    [history] = await opened.search([query], 3, mode=mode, where=DocumentFilter(paths=("history/*",)))
    [tagged] = await opened.search([query], 3, mode=mode,
                                   where=DocumentFilter.from_mapping({"tags": "lighthouse", "year": 1887}))
    [birds] = await opened.search([query], 3, mode=mode, where=DocumentFilter.from_mapping({"tags": ["birds"]}))
    [nothing] = await opened.search([query], 3, mode=mode, where=DocumentFilter.from_mapping({"tags": "none"}))

    assert len(history) == 3 and set(sources(history)) <= {"history/lighthouse.md", "history/wreck.md"}
    lighthouse_chunks = sum(1 for c in opened.index.chunks if c.source.endswith("lighthouse.md"))
    assert lighthouse_chunks == 2 and len(tagged) == 2  # fewer than top_k match: all of them, no others
    assert set(sources(tagged)) == {"history/lighthouse.md"}
    assert birds and set(sources(birds)) == {"nature/puffins.md"}
    assert nothing == []


@pytest.mark.anyio
async def test_per_source_caps_the_hits_from_one_document(tmp_path: Path) -> None:
    write(tmp_path)
    opened = await open_docs(tmp_path, chunk_tokens=8)
    for mode in ("dense", "keyword", "hybrid"):
        [capped] = await opened.search(["lighthouse tower granite Holloway"], 3, mode=mode, per_source=1)
        assert len(capped) == 3 and len(set(sources(capped))) == 3, mode


@pytest.mark.anyio
async def test_bad_search_arguments_are_input_errors(tmp_path: Path) -> None:
    write(tmp_path)
    opened = await open_docs(tmp_path)
    with pytest.raises(InputError, match="unknown search mode 'sparse'"):
        await opened.search(["x"], 1, mode="sparse")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="per_source must be at least 1"):
        await opened.search(["x"], 1, per_source=0)
    with pytest.raises(InputError, match="top_k must be at least 1"):
        await opened.search(["x"], 0, mode="hybrid")


# --- windows: chunks ranked by their best small window ------------------------------------------------------

FILLER = " ".join(f"word{i}" for i in range(40))
WINDOW_DOCS = {
    # One sentence of this long chunk is about the ferry; the rest dilutes the chunk's embedding.
    "long.md": f"{FILLER} ferry dawn harbour {FILLER.replace('word', 'term')}\n",
    # This short chunk says less about the ferry, but all of it is about little else.
    "short.md": "ferry dawn other1 other2 other3 other4 other5 other6\n",
    "puffins.md": "puffins nest in burrows on the cliffs\n",
}


def test_each_window_stands_for_the_chunk_that_overlaps_it_most() -> None:
    [doc] = [Document(path="a.md", text=" ".join(f"w{i}" for i in range(20)), sha256="x")]
    spans = FakeEmbeddingEngine().token_spans(doc.text)
    chunks = chunk_document(doc, spans, 8, 2)  # tokens 0-7, 6-13, 12-19
    windows = chunk_document(doc, spans, 4, 1, first_id=100)  # tokens 0-3, 3-6, 6-9, 9-12, 12-15, 15-18, 18-19
    assert window_parents(windows, chunks) == [0, 0, 1, 1, 2, 2, 2]


@pytest.mark.anyio
async def test_windows_are_built_persisted_reused_and_part_of_the_fingerprint(tmp_path: Path) -> None:
    write(tmp_path, WINDOW_DOCS)
    plain = await open_docs(tmp_path, chunk_tokens=100)
    built = await open_docs(tmp_path, chunk_tokens=100, window_tokens=8)
    assert built.status == "rebuilt" and built.fingerprint != plain.fingerprint and plain.windows is None
    manifest = json.loads((built.path / "manifest.json").read_text())
    assert manifest["windows"] == {"tokens": 8, "overlap": 2, "count": 16, "index": "windows.faiss",
                                   "parents": "windows.npy"}
    assert built.windows is not None and built.windows.ntotal == 16

    embedder = FakeEmbeddingEngine()
    reopened = await open_docs(tmp_path, embedder, chunk_tokens=100, window_tokens=8)
    assert reopened.status == "reused" and embedder.calls == []  # nothing embedded again
    assert reopened.windows is not None
    assert [c.id for c in reopened.windows.chunks] == [c.id for c in built.windows.chunks]
    assert (await open_docs(tmp_path, chunk_tokens=100, window_tokens=12)).status == "rebuilt"
    with pytest.raises(IndexBuildError, match=r"window_tokens must be from 1 to chunk_tokens - 1 \(99\), got 100"):
        await open_docs(tmp_path, chunk_tokens=100, window_tokens=100)


@pytest.mark.anyio
async def test_a_damaged_windows_file_rebuilds_the_index(tmp_path: Path) -> None:
    write(tmp_path, WINDOW_DOCS)
    built = await open_docs(tmp_path, chunk_tokens=100, window_tokens=8)
    (built.path / "windows.npy").write_bytes(b"not an array")
    reopened = await open_docs(tmp_path, chunk_tokens=100, window_tokens=8)
    assert reopened.status == "rebuilt" and reopened.windows is not None and reopened.windows.ntotal == 16


@pytest.mark.anyio
async def test_dense_search_with_windows_ranks_a_chunk_by_its_best_window_too(tmp_path: Path) -> None:
    write(tmp_path, WINDOW_DOCS)
    embedder = FakeEmbeddingEngine(dimension=4096)
    plain = await open_docs(tmp_path, embedder, chunk_tokens=100)
    windowed = await open_docs(tmp_path, embedder, chunk_tokens=100, window_tokens=8)
    query = "ferry dawn harbour"

    [chunks_only] = await plain.search([query], 2)
    [windows_only] = await windowed.search([query], 2, weights=(0.0, 1.0, 1.0))
    [fused] = await windowed.search([query], 2, weights=(1.0, 1.0, 2.0))
    [switched_off] = await windowed.search([query], 2, weights=(1.0, 1.0, 0.0))

    assert sources(chunks_only) == ["short.md", "long.md"]  # the long chunk's one sentence is diluted
    assert sources(windows_only) == ["long.md", "short.md"]  # its window is all about the ferry
    assert sources(fused) == ["long.md", "short.md"]
    assert all(0 < hit.score <= 3 / 61 for hit in fused)  # reciprocal rank scores of the two rankings
    assert [(h.chunk.id, h.score) for h in switched_off] == [(h.chunk.id, h.score) for h in chunks_only]


@pytest.mark.anyio
async def test_hybrid_search_fuses_the_windows_ranking_as_a_third(tmp_path: Path) -> None:
    write(tmp_path, WINDOW_DOCS)
    windowed = await open_docs(tmp_path, FakeEmbeddingEngine(dimension=4096), chunk_tokens=100, window_tokens=8)
    query = "ferry dawn harbour"
    [without] = await windowed.search([query], 3, mode="hybrid", weights=(1.0, 1.0, 0.0))
    [fused] = await windowed.search([query], 3, mode="hybrid")
    [words] = await windowed.search([query], 3, mode="keyword")
    assert sources(words)[0] == "long.md" and sources(without)[0] == "short.md"  # a tie goes to dense's first
    assert sources(fused)[:2] == ["long.md", "short.md"]  # keyword and windows agree
    assert fused[0].score > without[0].score
    with pytest.raises(InputError, match=r"the weights of the rankings fused \(dense, keyword, windows\) are all 0"):
        await windowed.search([query], 3, mode="hybrid", weights=(0.0, 0.0, 0.0))
    with pytest.raises(InputError, match=r"weights are \(dense, keyword\[, windows\]\), got 1 values"):
        await windowed.search([query], 3, mode="hybrid", weights=(1.0,))


@pytest.mark.anyio
async def test_concurrent_window_searches_batch_and_return_distinct_chunks(tmp_path: Path) -> None:
    write(tmp_path, WINDOW_DOCS)
    windowed = await open_docs(tmp_path, FakeEmbeddingEngine(dimension=4096), chunk_tokens=100, window_tokens=8)
    results: list[list[str]] = []

    async def one(query: str) -> None:
        [hits] = await windowed.search([query], 3, weights=(0.0, 1.0, 1.0))
        results.append(sources(hits))

    async with anyio.create_task_group() as tg:
        for query in ["ferry dawn harbour", "puffins burrows", "word3 word4"] * 6:
            tg.start_soon(one, query)

    assert all(sorted(found) == ["long.md", "puffins.md", "short.md"] for found in results)  # each chunk once
    assert windowed.window_batcher.stats().largest_batch > 1


def test_path_globs_match_the_path_or_a_trailing_part_of_it() -> None:
    assert path_matches("../examples/data/history/wreck.md", "history/*")
    assert path_matches("history/wreck.md", "./history/*.md")
    assert path_matches("a/b/history/old/wreck.md", "history/*")  # * crosses folders, as in fnmatch
    assert not path_matches("../examples/data/nature/puffins.md", "history/*")
    assert not path_matches("prehistory/wreck.md", "history/*")  # only at a folder boundary


def test_front_matter_fields_match_values_or_list_members_of_the_same_kind() -> None:
    keep = DocumentFilter.from_mapping({"tags": ["ferry", "birds"], "draft": False})
    assert keep.matches("a.md", {"tags": ["birds", "cliffs"], "draft": False})
    assert keep.matches("a.md", {"tags": "ferry", "draft": False})
    assert not keep.matches("a.md", {"tags": ["birds"], "draft": 0})  # false is not 0
    assert not keep.matches("a.md", {"tags": ["birds"]})  # a missing field never matches
    assert DocumentFilter.from_mapping({"year": 1887}).matches("a.md", {"year": 1887.0})
    assert not DocumentFilter.from_mapping({"year": 1887}).matches("a.md", {"year": "1887"})


# --- the retrieve stage in a pipeline -----------------------------------------------------------------------


PIPELINE = """
models:
  embedder: {kind: embedding, source: fake}
indexes:
  guide: {embedder: embedder, documents: "docs/**/*.md", chunk_tokens: 64, chunk_overlap: 0}
pipelines:
  find:
    inputs: {q: str}
    stages:
      hits:
        kind: retrieve
        index: guide
        query: "{{ inputs.q }}"
        top_k: 3
        mode: hybrid
        weights: {dense: 1, keyword: 2}
        filter: {path: "history/*", tags: lighthouse}
"""


@pytest.mark.anyio
async def test_a_retrieve_stage_searches_in_its_mode_within_its_filter(
        tmp_path: Path, fake_runtime: Any) -> None:
    write(tmp_path)
    runtime, _ = fake_runtime(PIPELINE)
    async with runtime as rt:
        result = await rt.run("find", q="lighthouse near the cliffs")
        opened = await rt.index("guide")
    passages = result.stages["hits"]["passages"]
    assert [p["source"] for p in passages] == ["docs/history/lighthouse.md"]
    assert opened.keyword_status == "built"


@pytest.mark.anyio
async def test_a_pipeline_index_takes_windows_and_bm25_parameters(tmp_path: Path, fake_runtime: Any) -> None:
    write(tmp_path, WINDOW_DOCS)
    runtime, _ = fake_runtime("""
        models:
          embedder: {kind: embedding, source: fake}
        indexes:
          guide:
            embedder: embedder
            documents: "docs/**/*.md"
            chunk_tokens: 100
            chunk_overlap: 0
            window_tokens: 8
            bm25: {k1: 1.2, b: 0.75}
        pipelines:
          find:
            inputs: {q: str}
            stages:
              hits: {kind: retrieve, index: guide, query: "{{ inputs.q }}", top_k: 2, weights: {dense: 0}}
        """)
    async with runtime as rt:
        result = await rt.run("find", q="ferry dawn harbour")
        opened = await rt.index("guide")
        words = await opened.keyword_index()
    assert opened.windows is not None and opened.windows.ntotal == 16
    assert (words.k1, words.b) == (1.2, 0.75)
    assert [p["source"] for p in result.stages["hits"]["passages"]] == ["docs/long.md", "docs/short.md"]


@pytest.mark.anyio
async def test_an_index_of_a_corpus_exports_it_and_names_chunks_by_topic(
        tmp_path: Path, fake_runtime: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTILANE_HOME", str(tmp_path / "home"))
    runtime, _ = fake_runtime("""
        models:
          embedder: {kind: embedding, source: fake}
        indexes:
          pyref: {embedder: embedder, corpus: python-reference, chunk_headings: true}
        """)
    async with runtime as rt:
        opened = await rt.index("pyref")
        [hits] = await opened.search(["AssertionError __debug__"], 3, mode="keyword")
    assert opened.documents == len(python_reference_topics())
    assert hits[0].chunk.source == "assert.md"
    assert hits[0].chunk.heading == 'The "assert" statement'
    assert (tmp_path / "home" / "corpora" / "python-reference" / "assert.md").is_file()
