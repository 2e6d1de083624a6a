"""RAG quality metrics as pure functions: retrieval recall@k and MRR, answer scores, refusals, latency.

Definitions (the same every run, so numbers compare across pipelines):

- A retrieved passage matches a gold source when its path equals the gold path or ends with it at a
  folder boundary (`../examples/data/history/herring-boom.md` matches `history/herring-boom.md`), so
  gold sets name files relative to their corpus root whatever folder a pipeline indexes them from.
- A question's gold sources are groups: each group is one fact's file, or several files that hold the
  same text (the Python reference repeats sections, e.g. `try.md` inside `compound.md`); a group is
  found when any of its files is retrieved.
- recall@k is the share of a question's groups found among the first k passages (1.0 when all are).
- The reciprocal rank is 1 / the rank of the first passage that matches any group, 0.0 when none does.
- Answers are compared after SQuAD-style normalisation: lowercase, punctuation (ASCII and Unicode)
  removed, the articles a/an/the dropped, whitespace collapsed. Exact match compares the normalised
  strings, token F1 their bags of tokens, and "contains" looks for the normalised gold answer as a run
  of whole tokens in the normalised prediction.
- A reply is a refusal when its normalised text contains one of `REFUSAL_PHRASES` (also normalised).
  Pipelines under evaluation should be told to answer exactly "I don't know" when the notes do not say.
- Latency percentiles interpolate linearly between the closest ranks (numpy's default).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REFUSAL = "I don't know."
REFUSAL_PHRASES: tuple[str, ...] = (
    "i don't know",
    "i do not know",
    "i cannot answer",
    "i can't answer",
    "cannot be answered",
    "does not say",
    "doesn't say",
    "do not say",
    "don't say",
    "not mentioned",
    "no information",
)
DEFAULT_KS: tuple[int, ...] = (1, 3, 5)

_ARTICLES = frozenset({"a", "an", "the"})

SourceGroups = Sequence[Sequence[str]]


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and symbols, drop the articles a/an/the, and collapse whitespace."""
    lowered = unicodedata.normalize("NFKC", text).lower()
    kept = "".join(" " if char.isspace() else char for char in lowered
                   if char.isspace() or not unicodedata.category(char).startswith(("P", "S")))
    return " ".join(word for word in kept.split() if word not in _ARTICLES)


def answer_tokens(text: str) -> list[str]:
    """The tokens of a normalised answer."""
    return normalize_answer(text).split()


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised prediction equals the normalised gold answer, else 0.0."""
    return 1.0 if normalize_answer(prediction) == normalize_answer(gold) else 0.0


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall between the normalised answers (SQuAD's F1)."""
    predicted, expected = answer_tokens(prediction), answer_tokens(gold)
    if not predicted or not expected:
        return 1.0 if predicted == expected else 0.0
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, gold: str) -> bool:
    """True when the normalised gold answer occurs as whole tokens inside the normalised prediction."""
    expected = normalize_answer(gold)
    if not expected:
        return False
    return f" {expected} " in f" {normalize_answer(prediction)} "


def is_refusal(text: str, phrases: Sequence[str] = REFUSAL_PHRASES) -> bool:
    """True when the reply contains a refusal phrase (both normalised), e.g. "I don't know"."""
    reply = f" {normalize_answer(text)} "
    return any(f" {normalize_answer(phrase)} " in reply for phrase in phrases)


def source_matches(retrieved: str, gold: str) -> bool:
    """True when retrieved is the gold path or ends with it after a `/` (paths in POSIX form)."""
    found, wanted = _posix(retrieved), _posix(gold).lstrip("/")
    if wanted.startswith("./"):
        wanted = wanted[2:]
    return bool(wanted) and (found == wanted or found.endswith("/" + wanted))


def _posix(path: str) -> str:
    return path.replace("\\", "/")


def _group_found(retrieved: Sequence[str], group: Sequence[str]) -> bool:
    return any(source_matches(found, wanted) for found in retrieved for wanted in group)


def recall_at_k(retrieved: Sequence[str], gold: SourceGroups, k: int) -> float:
    """Share of the gold source groups with a file among the first k retrieved sources."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not gold:
        raise ValueError("recall needs at least one gold source")
    top = list(retrieved[:k])
    return sum(1 for group in gold if _group_found(top, group)) / len(gold)


def reciprocal_rank(retrieved: Sequence[str], gold: SourceGroups) -> float:
    """1 / rank of the first retrieved source in any gold group (ranks start at 1); 0.0 if none is."""
    if not gold:
        raise ValueError("reciprocal rank needs at least one gold source")
    for rank, found in enumerate(retrieved, start=1):
        if any(source_matches(found, wanted) for group in gold for wanted in group):
            return 1.0 / rank
    return 0.0


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    data = [float(value) for value in values]
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be from 0 to 100, got {q}")
    if not data:
        return None
    return float(np.percentile(np.asarray(data), q))


@dataclass(frozen=True)
class QuestionScore:
    """How one question went; fields that do not apply to its type are None."""

    id: str
    type: str
    recall: Mapping[int, float] | None  # k -> recall@k; None for questions without sources
    reciprocal_rank: float | None
    exact_match: float | None  # None for no-answer questions and when no answer was produced
    f1: float | None
    contains: bool | None
    refused: bool | None  # None when no answer was produced
    latency: float | None = None  # seconds
    prompt_tokens: int = 0
    completion_tokens: int = 0


def score_question(
    *,
    id: str,
    type: str,
    gold_answer: str,
    gold_sources: SourceGroups,
    retrieved: Sequence[str] | None = None,
    prediction: str | None = None,
    latency: float | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
) -> QuestionScore:
    """Score one question: retrieval when it has gold sources and retrieved paths, answers when predicted.

    A question whose type is "no_answer" is scored on refusal only; the other types on EM, F1 and
    "contains" against gold_answer (a refusal to answer them scores 0 there and counts as a false refusal).
    """
    recall = rr = None
    if retrieved is not None and gold_sources:
        recall = {k: recall_at_k(retrieved, gold_sources, k) for k in ks}
        rr = reciprocal_rank(retrieved, gold_sources)
    em = f1 = contains = refused = None
    if prediction is not None:
        refused = is_refusal(prediction)
        if type != "no_answer":
            em, f1 = exact_match(prediction, gold_answer), token_f1(prediction, gold_answer)
            contains = contains_answer(prediction, gold_answer)
    return QuestionScore(id=id, type=type, recall=recall, reciprocal_rank=rr, exact_match=em, f1=f1,
                         contains=contains, refused=refused, latency=latency,
                         prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


@dataclass(frozen=True)
class Summary:
    """Means over a set of questions; a metric is None when no question in the set measures it."""

    questions: int
    recall_at: Mapping[int, float] = field(default_factory=dict)  # k -> mean recall@k
    mrr: float | None = None
    exact_match: float | None = None
    f1: float | None = None
    contains: float | None = None
    refusal_accuracy: float | None = None  # share of no-answer questions refused
    false_refusals: float | None = None  # share of answerable questions refused
    latency_p50: float | None = None
    latency_p95: float | None = None
    mean_prompt_tokens: float | None = None
    mean_completion_tokens: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (recall keys become "recall@k")."""
        out: dict[str, Any] = {"questions": self.questions}
        out.update({f"recall@{k}": value for k, value in sorted(self.recall_at.items())})
        for name in ("mrr", "exact_match", "f1", "contains", "refusal_accuracy", "false_refusals",
                     "latency_p50", "latency_p95", "mean_prompt_tokens", "mean_completion_tokens"):
            out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class EvalReport:
    """The summary over all questions and one per question type, with the per-question scores."""

    overall: Summary
    by_type: Mapping[str, Summary]
    scores: tuple[QuestionScore, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: overall, by_type, and each question's scores."""
        return {
            "overall": self.overall.to_dict(),
            "by_type": {name: summary.to_dict() for name, summary in self.by_type.items()},
            "questions": [_score_dict(score) for score in self.scores],
        }


def _score_dict(score: QuestionScore) -> dict[str, Any]:
    data = {name: getattr(score, name) for name in score.__dataclass_fields__}
    if score.recall is not None:
        data["recall"] = {f"recall@{k}": value for k, value in sorted(score.recall.items())}
    return data


def summarize(scores: Sequence[QuestionScore]) -> Summary:
    """Average the scores of a set of questions (recall@k for the k that every scored question has)."""
    with_recall = [s.recall for s in scores if s.recall is not None]
    ks = sorted(set.intersection(*(set(recall) for recall in with_recall))) if with_recall else []
    answered = [s for s in scores if s.type != "no_answer" and s.exact_match is not None]
    unanswerable = [s for s in scores if s.type == "no_answer" and s.refused is not None]
    latencies = [s.latency for s in scores if s.latency is not None]
    produced = [s for s in scores if s.refused is not None]
    return Summary(
        questions=len(scores),
        recall_at={k: math.fsum(recall[k] for recall in with_recall) / len(with_recall) for k in ks},
        mrr=_mean(s.reciprocal_rank for s in scores if s.reciprocal_rank is not None),
        exact_match=_mean(s.exact_match for s in answered if s.exact_match is not None),
        f1=_mean(s.f1 for s in answered if s.f1 is not None),
        contains=_mean(float(bool(s.contains)) for s in answered),
        refusal_accuracy=_mean(float(bool(s.refused)) for s in unanswerable),
        false_refusals=_mean(float(bool(s.refused)) for s in answered),
        latency_p50=percentile(latencies, 50),
        latency_p95=percentile(latencies, 95),
        mean_prompt_tokens=_mean(float(s.prompt_tokens) for s in produced),
        mean_completion_tokens=_mean(float(s.completion_tokens) for s in produced),
    )


def aggregate(scores: Sequence[QuestionScore]) -> EvalReport:
    """Summarise the scores overall and per question type (types in order of first appearance)."""
    types = list(dict.fromkeys(score.type for score in scores))
    return EvalReport(
        overall=summarize(scores),
        by_type={name: summarize([s for s in scores if s.type == name]) for name in types},
        scores=tuple(scores),
    )


def _mean(values: Iterable[float]) -> float | None:
    data = list(values)
    return math.fsum(data) / len(data) if data else None
