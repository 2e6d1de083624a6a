"""The BM25 keyword index: finds identifiers and rare words, persists, reloads, and refuses a stale save."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from multilane.retrieval.index import Hit
from multilane.retrieval.ingest import ChunkRecord
from multilane.retrieval.keyword import META_FILE, KeywordIndex, Tokenizer

TEXTS = [
    "The lighthouse at Cape Orrin was built in 1887 by the engineer Tamsin Holloway.",
    'Three conversion flags are supported: "!s" calls str(), "!r" calls repr() and "!a" calls ascii().',
    "Declaring __slots__ prevents the automatic creation of __dict__ and __weakref__ for each instance.",
    "The := operator is an assignment expression; ** is exponentiation and // is floor division.",
    "Puffins nest on the Skarra cliffs from late April to early August.",
    "Statements are executed in order; a running loop stops at break.",
]


def _chunks(texts: list[str] = TEXTS) -> list[ChunkRecord]:
    return [ChunkRecord(id=i, source=f"doc{i}.md", text=text, start=0, end=len(text))
            for i, text in enumerate(texts)]


def _sources(hits: list[Hit]) -> list[str]:
    return [hit.chunk.source for hit in hits]


def test_tokenizer_keeps_identifiers_operators_and_conversions() -> None:
    tokens = Tokenizer().tokenize('Use "!r", x := y ** 2, max_num_seqs and __slots__; Statements RUNNING.')
    assert "!r" in tokens and ":=" in tokens and "**" in tokens
    assert {"max_num_seq", "max", "num", "seq"} <= set(tokens)  # a snake_case name also counts as its parts
    assert {"__slots__", "slot"} <= set(tokens)  # a dunder name also counts as its bare word, stemmed
    assert {"statement", "run"} <= set(tokens)  # lowercased and stemmed
    assert "+-------+" not in Tokenizer().tokenize("+-------+ | Option |")  # table borders are not operators


def test_search_ranks_exact_identifiers_first() -> None:
    index = KeywordIndex.build(_chunks())

    hits = index.search(["what does !r do", "__slots__", "Tamsin Holloway 1887", "what does := mean"], 3)

    assert [found[0].chunk.source for found in hits] == ["doc1.md", "doc2.md", "doc0.md", "doc3.md"]
    assert all(found[0].score > 0 for found in hits)
    assert [h.score for h in hits[0]] == sorted((h.score for h in hits[0]), reverse=True)


def test_stemming_matches_other_forms_of_a_word() -> None:
    index = KeywordIndex.build(_chunks())
    assert _sources(index.search(["which statement runs"], 1)[0]) == ["doc5.md"]
    assert _sources(index.search(["slots"], 1)[0]) == ["doc2.md"]


def test_only_chunks_sharing_a_term_are_returned() -> None:
    index = KeywordIndex.build(_chunks())
    assert _sources(index.search(["puffins"], 5)[0]) == ["doc4.md"]
    assert index.search(["zebra quagga", ""], 5) == [[], []]


def test_equal_scores_are_ordered_by_chunk_id() -> None:
    index = KeywordIndex.build(_chunks(["same words here", "other text", "same words here", "same words here"]))
    assert _sources(index.search(["same words"], 2)[0]) == ["doc0.md", "doc2.md"]
    assert _sources(index.search(["same words"], 10)[0]) == ["doc0.md", "doc2.md", "doc3.md"]


def test_search_takes_a_batch_and_checks_its_arguments() -> None:
    index = KeywordIndex.build(_chunks())
    assert index.search([], 3) == []
    with pytest.raises(TypeError, match="sequence of query strings"):
        index.search("puffins", 3)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        index.search(["puffins"], 0)


def test_an_index_saved_and_loaded_answers_the_same(tmp_path: Path) -> None:
    chunks = _chunks()
    built = KeywordIndex.build(chunks, k1=1.2, b=0.5)
    built.save(tmp_path / "keyword")

    loaded = KeywordIndex.load(tmp_path / "keyword", chunks)

    queries = ["!r repr", "__dict__", "Cape Orrin lighthouse", "floor division"]
    assert [[(h.chunk.id, h.score) for h in found] for found in loaded.search(queries, 3)] == \
        [[(h.chunk.id, h.score) for h in found] for found in built.search(queries, 3)]
    assert (loaded.k1, loaded.b) == (1.2, 0.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left behind


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "keyword").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        KeywordIndex.build(_chunks()).save(tmp_path / "keyword")


def test_load_refuses_an_index_for_other_chunks_or_rules(tmp_path: Path) -> None:
    KeywordIndex.build(_chunks()).save(tmp_path / "keyword")
    with pytest.raises(ValueError, match="holds 6 documents, not the 5 chunks given"):
        KeywordIndex.load(tmp_path / "keyword", _chunks()[:5])
    meta_path = tmp_path / "keyword" / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps({**meta, "tokenizer": "older-rules"}), encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer 'older-rules'"):
        KeywordIndex.load(tmp_path / "keyword", _chunks())


def test_load_refuses_an_index_built_with_other_bm25_parameters(tmp_path: Path) -> None:
    KeywordIndex.build(_chunks(), k1=1.5, b=0.75).save(tmp_path / "keyword")
    with pytest.raises(ValueError, match=r"built with k1 1\.5 and b 0\.75, not the k1 0\.9 and b 0\.4 asked for"):
        KeywordIndex.load(tmp_path / "keyword", _chunks(), k1=0.9, b=0.4)
    assert KeywordIndex.load(tmp_path / "keyword", _chunks(), k1=1.5, b=0.75).b == 0.75


def test_bm25_parameters_default_to_passage_settings_and_change_the_ranking() -> None:
    chunks = [ChunkRecord(id=0, source="long.md", text="lighthouse " * 2 + "keeper granite tower stairs " * 10,
                          start=0, end=0),
              ChunkRecord(id=1, source="short.md", text="lighthouse", start=0, end=0)]
    assert (KeywordIndex.build(chunks).k1, KeywordIndex.build(chunks).b) == (0.9, 0.4)
    # Full length normalisation ranks the one-word tail chunk first; b = 0 ranks the chunk saying it twice first.
    assert [h.chunk.id for h in KeywordIndex.build(chunks, b=1.0).search(["lighthouse"], 2)[0]] == [1, 0]
    assert [h.chunk.id for h in KeywordIndex.build(chunks, b=0.0).search(["lighthouse"], 2)[0]] == [0, 1]
    with pytest.raises(ValueError, match=r"b must be from 0 to 1, got 1\.5"):
        KeywordIndex.build(chunks, b=1.5)
    with pytest.raises(ValueError, match="k1 must be finite and not negative, got -1"):
        KeywordIndex.build(chunks, k1=-1)


def test_an_empty_index_builds_saves_and_finds_nothing(tmp_path: Path) -> None:
    index = KeywordIndex.build([])
    assert index.ntotal == 0 and index.search(["anything"], 3) == [[]]
    index.save(tmp_path / "empty")
    assert KeywordIndex.load(tmp_path / "empty", []).search(["anything"], 3) == [[]]


def test_asearch_runs_in_a_worker_thread() -> None:
    index = KeywordIndex.build(_chunks())

    async def main() -> list[str]:
        found = await index.asearch(["Skarra puffins"], 1)
        return _sources(found[0])

    assert anyio.run(main) == ["doc4.md"]
