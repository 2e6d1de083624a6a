"""Chunking, persistence and search of indexes, with a deterministic bag-of-words embedder."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import queue
import re
from collections.abc import Mapping, MutableMapping, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import structlog
from structlog.testing import capture_logs

from multilane.errors import IndexBuildError
from multilane.retrieval import (
    ChunkRecord,
    Document,
    OpenedIndex,
    VectorIndex,
    chunk_document,
    collect_documents,
    open_index,
)
from multilane.retrieval.store import build_lock

DIM = 64


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeEmbedder:
    """Hashes lower-cased words into DIM buckets; counts calls and can fail on a chosen call."""

    identity = "fake:bow64"
    dimension = DIM
    max_tokens = 512

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise RuntimeError("embedder exploded")
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % DIM] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]

    async def close(self) -> None:
        return None


DOCS = {
    "lighthouse.md": "# Lighthouse\nThe lighthouse keeper trimmed the lamp wick every night.",
    "cheese.md": "# Cheese\nRennet curdles milk; the curds are pressed and aged into cheese.",
    "ferry.md": "# Ferry\nThe ferry timetable lists sailings to the island at dawn and dusk.",
    "puffins.md": "# Puffins\nPuffins nest in burrows on cliffs and dive for sand eels.",
}


def write_docs(base: Path, docs: dict[str, str]) -> None:
    for name, text in docs.items():
        path = base / "docs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


async def open_docs(base: Path, embedder: Any, **overrides: Any) -> OpenedIndex:
    options: dict[str, Any] = {
        "patterns": ["docs/**/*.md"], "base_dir": base, "embedder": embedder,
        "chunk_tokens": 8, "chunk_overlap": 2, "root": base / "indexes",
    }
    options.update(overrides)
    return await open_index("docs", **options)


def build_folders(base: Path) -> list[str]:
    return sorted(p.name for p in (base / "indexes" / "docs").glob("build-*"))


def make_doc(text: str) -> Document:
    return Document(path="d.md", text=text, sha256=hashlib.sha256(text.encode()).hexdigest())


# Chunking


def test_chunks_are_windows_with_overlap_sliced_from_original_text() -> None:
    text = "Alpha  Beta\tGamma\nDelta Epsilon ZETA eta Theta iota"
    doc = make_doc(text)
    spans = FakeEmbedder().token_spans(text)
    chunks = chunk_document(doc, spans, chunk_tokens=4, overlap=1)
    assert [c.text for c in chunks] == [
        "Alpha  Beta\tGamma\nDelta",
        "Delta Epsilon ZETA eta",
        "eta Theta iota",
    ]
    assert [c.id for c in chunks] == [0, 1, 2]
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
        assert chunk.source == "d.md"


def test_chunks_without_overlap_cover_every_token_once() -> None:
    words = [f"w{i}" for i in range(10)]
    doc = make_doc(" ".join(words))
    chunks = chunk_document(doc, FakeEmbedder().token_spans(doc.text), 4, 0, first_id=7)
    assert [c.text.split() for c in chunks] == [words[0:4], words[4:8], words[8:10]]
    assert [c.id for c in chunks] == [7, 8, 9]


def test_short_document_is_one_chunk_and_empty_document_none() -> None:
    doc = make_doc("# Title\n\nonly a few words")
    chunks = chunk_document(doc, FakeEmbedder().token_spans(doc.text), 50, 10)
    assert [c.text for c in chunks] == [doc.text]
    assert chunk_document(make_doc("  \n "), [], 50, 10) == []


def test_first_chunk_keeps_the_title_line() -> None:
    text = "# Harbour Notes\nBoats leave at six and return at noon."
    doc = make_doc(text)
    spans = [s for s in FakeEmbedder().token_spans(text) if text[s[0] : s[1]] != "#"]
    chunks = chunk_document(doc, spans, 4, 0)
    assert chunks[0].text.startswith("# Harbour Notes")
    assert chunks[0].start == 0


@pytest.mark.parametrize(("tokens", "overlap"), [(0, 0), (4, 4), (4, -1)])
def test_bad_chunk_params_are_rejected(tokens: int, overlap: int) -> None:
    with pytest.raises(IndexBuildError):
        chunk_document(make_doc("a b c"), [(0, 1)], tokens, overlap)


# Collecting documents


def test_glob_matching_nothing_names_the_pattern(tmp_path: Path) -> None:
    with pytest.raises(IndexBuildError, match=r"notes/\*\*/\*\.txt") as info:
        collect_documents(["notes/**/*.txt"], tmp_path)
    assert str(tmp_path) in str(info.value)


def test_collect_is_recursive_sorted_deduplicated_and_files_only(tmp_path: Path) -> None:
    write_docs(tmp_path, {"b.md": "b", "a.md": "a", "sub/c.md": "c"})
    (tmp_path / "docs" / "dir.md").mkdir()
    docs = collect_documents(["docs/**/*.md", "docs/a.md"], tmp_path)
    assert [d.path for d in docs] == ["docs/a.md", "docs/b.md", "docs/sub/c.md"]
    assert docs[0].sha256 == hashlib.sha256(b"a").hexdigest()


def test_non_utf8_file_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "bad.md").write_bytes(b"caf\xe9")
    with pytest.raises(IndexBuildError, match=r"bad\.md"):
        collect_documents(["*.md"], tmp_path)


# Build, reuse, rebuild


@pytest.mark.anyio
async def test_reopen_reuses_the_build_without_embedding(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    first = await open_docs(tmp_path, FakeEmbedder())
    assert first.status == "built"
    assert first.documents == 4
    assert first.chunks > 4
    assert first.device == "cpu"

    embedder = FakeEmbedder()
    second = await open_docs(tmp_path, embedder)
    assert second.status == "reused"
    assert embedder.calls == 0
    assert second.fingerprint == first.fingerprint
    assert second.chunks == first.chunks
    assert second.path == first.path

    manifest = json.loads((second.path / "manifest.json").read_text())
    assert manifest["counts"] == {"documents": 4, "chunks": first.chunks}
    assert manifest["embedder"] == "fake:bow64"
    assert (tmp_path / "indexes" / "docs" / "CURRENT").read_text().strip() == first.path.name


@pytest.mark.anyio
async def test_changing_a_document_rebuilds_and_removes_the_old_build(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    first = await open_docs(tmp_path, FakeEmbedder())
    (tmp_path / "docs" / "ferry.md").write_text("# Ferry\nSailings are cancelled in storms.")
    second = await open_docs(tmp_path, FakeEmbedder())
    assert second.status == "rebuilt"
    assert second.fingerprint != first.fingerprint
    assert build_folders(tmp_path) == [second.path.name]


@pytest.mark.anyio
async def test_changing_chunk_settings_or_forcing_rebuilds(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    await open_docs(tmp_path, FakeEmbedder())
    assert (await open_docs(tmp_path, FakeEmbedder(), chunk_tokens=6)).status == "rebuilt"
    forced = await open_docs(tmp_path, FakeEmbedder(), chunk_tokens=6, rebuild=True)
    assert forced.status == "rebuilt"
    assert build_folders(tmp_path) == [forced.path.name]


@pytest.mark.anyio
async def test_failed_build_keeps_the_previous_build_and_leaves_no_partial_folder(
    tmp_path: Path,
) -> None:
    write_docs(tmp_path, DOCS)
    first = await open_docs(tmp_path, FakeEmbedder())
    long_doc = " ".join(f"word{i}" for i in range(800))  # 800 / 8 = 100 chunks: two batches
    write_docs(tmp_path, {"long.md": long_doc})

    failing = FakeEmbedder(fail_on_call=2)
    with pytest.raises(IndexBuildError, match="embedder exploded"):
        await open_docs(tmp_path, failing, chunk_overlap=0)
    assert failing.calls == 2
    assert build_folders(tmp_path) == [first.path.name]
    assert not (tmp_path / "indexes" / "docs" / "CURRENT.tmp").exists()

    (tmp_path / "docs" / "long.md").unlink()
    embedder = FakeEmbedder()
    again = await open_docs(tmp_path, embedder)
    assert again.status == "reused"
    assert embedder.calls == 0


class StallingEmbedder(FakeEmbedder):
    """Hangs forever on its second embed call, like a wedged engine."""

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.calls == 1:
            self.calls += 1
            await anyio.sleep_forever()
        return await super().embed(texts)


@pytest.mark.anyio
async def test_cancelled_build_keeps_the_previous_build(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    first = await open_docs(tmp_path, FakeEmbedder())
    write_docs(tmp_path, {"long.md": " ".join(f"word{i}" for i in range(800))})
    with anyio.move_on_after(0.2) as scope:
        await open_docs(tmp_path, StallingEmbedder(), chunk_overlap=0)
    assert scope.cancelled_caught
    assert build_folders(tmp_path) == [first.path.name]
    (tmp_path / "docs" / "long.md").unlink()
    assert (await open_docs(tmp_path, FakeEmbedder())).status == "reused"


class HeldEmbedder(FakeEmbedder):
    """Reports its first embed call on a queue, then holds it until the test sets `go`."""

    def __init__(self, who: str, messages: Any, go: Any) -> None:
        super().__init__()
        self.who, self.messages, self.go = who, messages, go
        self.holding = True

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.holding:
            self.holding = False
            self.messages.put((self.who, "embedding"))
            await anyio.to_thread.run_sync(self.go.wait)
        return await super().embed(texts)


def build_in_child(base: str, who: str, messages: Any, go: Any) -> None:
    """Open the index in a process of its own; report waiting for the lock, embedding, and the outcome."""

    def report_waiting(logger: Any, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        if event["event"] == "index.waiting_for_build":
            messages.put((who, "waiting"))
        raise structlog.DropEvent

    async def main() -> None:
        embedder = HeldEmbedder(who, messages, go)
        opened = await open_docs(Path(base), embedder)
        embedder.holding = False  # the search below embeds its query: not part of the build
        hits = await opened.search(["puffins"], 1)
        messages.put((who, "done", opened.status, str(opened.path), hits[0][0].chunk.source))

    structlog.configure(processors=[report_waiting])
    anyio.run(main)


def next_message(messages: Any, children: Sequence[BaseProcess]) -> Any:
    """The next message from the children, failing as soon as one of them has crashed."""
    while True:
        try:
            return messages.get(timeout=0.5)
        except queue.Empty:
            crashed = [child.exitcode for child in children if child.exitcode not in (None, 0)]
            assert not crashed, f"a child process failed with exit code {crashed}"


def test_two_processes_building_one_index_make_one_build_and_the_second_reuses_it(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    spawn = multiprocessing.get_context("spawn")
    messages = spawn.Queue()
    go = {who: spawn.Event() for who in "ab"}
    children = {who: spawn.Process(target=build_in_child, args=(str(tmp_path), who, messages, go[who]))
                for who in "ab"}
    try:
        children["a"].start()
        assert next_message(messages, list(children.values())) == ("a", "embedding")  # a is mid-build
        children["b"].start()
        meanwhile = next_message(messages, list(children.values()))  # b waits for a, or (the bug) builds too
        go["a"].set()
        go["b"].set()
        done = sorted(next_message(messages, list(children.values())) for _ in range(2))
    finally:
        for event in go.values():
            event.set()
        for child in children.values():
            child.join(60)
            if child.is_alive():
                child.kill()

    (_, _, status_a, path_a, hit_a), (_, _, status_b, path_b, hit_b) = done
    assert (status_a, status_b) == ("built", "reused")
    assert path_a == path_b and Path(path_a).is_dir()  # neither deleted the other's build
    assert build_folders(tmp_path) == [Path(path_a).name]
    assert (tmp_path / "indexes" / "docs" / "CURRENT").read_text().strip() == Path(path_a).name
    assert hit_a == hit_b == "docs/puffins.md"
    assert meanwhile == ("b", "waiting")


@pytest.mark.anyio
async def test_waiting_for_another_build_can_be_cancelled(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    embedder = FakeEmbedder()
    async with build_lock(tmp_path / "indexes" / "docs", "docs"):  # as another process building it would
        with capture_logs() as logs, anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(open_docs, tmp_path, embedder)
                while not any(e["event"] == "index.waiting_for_build" for e in logs):
                    await anyio.wait_all_tasks_blocked()
                scope.cancel()
    assert scope.cancelled_caught and embedder.calls == 0 and build_folders(tmp_path) == []
    assert (await open_docs(tmp_path, embedder)).status == "built"  # the lock was given back


@pytest.mark.anyio
async def test_progress_reports_embedded_chunks(tmp_path: Path) -> None:
    write_docs(tmp_path, {"long.md": " ".join(f"w{i}" for i in range(800))})
    seen: list[tuple[int, int]] = []
    opened = await open_docs(tmp_path, FakeEmbedder(), chunk_overlap=0,
                             progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 100), (64, 100), (100, 100)]
    assert opened.chunks == 100


@pytest.mark.anyio
@pytest.mark.parametrize("garbage", ["nonsense", "../../etc", "build-missing", ""])
async def test_current_pointing_at_garbage_rebuilds(tmp_path: Path, garbage: str) -> None:
    write_docs(tmp_path, DOCS)
    await open_docs(tmp_path, FakeEmbedder())
    (tmp_path / "indexes" / "docs" / "CURRENT").write_text(garbage)
    opened = await open_docs(tmp_path, FakeEmbedder())
    assert opened.status == "rebuilt"
    assert (await open_docs(tmp_path, FakeEmbedder())).status == "reused"


@pytest.mark.anyio
async def test_corrupt_build_files_rebuild(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    first = await open_docs(tmp_path, FakeEmbedder())
    with (first.path / "chunks.jsonl").open("a") as handle:  # one chunk too many for the index
        handle.write(json.dumps({"id": first.chunks, "source": "x", "text": "x",
                                 "start": 0, "end": 1}) + "\n")
    second = await open_docs(tmp_path, FakeEmbedder())
    assert second.status == "rebuilt"
    (second.path / "index.faiss").write_bytes(b"not faiss")
    assert (await open_docs(tmp_path, FakeEmbedder())).status == "rebuilt"


@pytest.mark.anyio
async def test_chunk_tokens_over_the_embedder_limit_is_an_error(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    with pytest.raises(IndexBuildError, match="max_tokens"):
        await open_docs(tmp_path, FakeEmbedder(), chunk_tokens=1000)


# Search


@pytest.mark.anyio
async def test_search_ranks_the_matching_document_first(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    opened = await open_docs(tmp_path, FakeEmbedder(), chunk_tokens=64, chunk_overlap=0)
    [hits] = await opened.search(["where do puffins nest on cliffs"], top_k=3)
    assert hits[0].chunk.source == "docs/puffins.md"
    assert len(hits) == 3
    scores = [hit.score for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert 0.0 < scores[0] <= 1.0 + 1e-5


@pytest.mark.anyio
async def test_top_k_larger_than_the_index_returns_every_chunk(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    opened = await open_docs(tmp_path, FakeEmbedder(), chunk_tokens=64, chunk_overlap=0)
    [hits] = await opened.search(["cheese"], top_k=50)
    assert len(hits) == opened.chunks == 4
    assert len({hit.chunk.id for hit in hits}) == 4


@pytest.mark.anyio
async def test_multi_query_search_answers_each_query_in_order(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    embedder = FakeEmbedder()
    opened = await open_docs(tmp_path, embedder, chunk_tokens=64, chunk_overlap=0)
    calls = embedder.calls
    results = await opened.search(
        ["ferry timetable sailings", "rennet curds milk cheese", "lighthouse lamp keeper"], top_k=2
    )
    assert embedder.calls == calls + 1
    assert [hits[0].chunk.source for hits in results] == [
        "docs/ferry.md", "docs/cheese.md", "docs/lighthouse.md",
    ]
    assert await opened.search([], top_k=2) == []


@pytest.mark.anyio
async def test_search_vectors_matches_text_search(tmp_path: Path) -> None:
    write_docs(tmp_path, DOCS)
    embedder = FakeEmbedder()
    opened = await open_docs(tmp_path, embedder, chunk_tokens=64, chunk_overlap=0)
    vectors = await embedder.embed(["puffins"])
    by_vector = opened.search_vectors(vectors, top_k=2)
    by_text = await opened.search(["puffins"], top_k=2)
    assert [h.chunk for h in by_vector[0]] == [h.chunk for h in by_text[0]]


def test_vector_index_on_an_empty_index_returns_no_hits() -> None:
    index = VectorIndex.build(np.zeros((0, 4), dtype=np.float32), [])
    assert index.search(np.ones((2, 4), dtype=np.float32), top_k=3) == [[], []]


def test_vector_index_rejects_wrong_dimension() -> None:
    chunk = ChunkRecord(id=0, source="a", text="a", start=0, end=1)
    index = VectorIndex.build(np.ones((1, 4), dtype=np.float32), [chunk])
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((1, 3), dtype=np.float32), top_k=1)
