"""Measure RAG quality: gold question sets and the metrics that score a pipeline's answers against them."""

from __future__ import annotations

from multilane.evaluation.dataset import GoldQuestion, GoldSet, check_against_corpus, load_gold_set
from multilane.evaluation.metrics import (
    EvalReport,
    QuestionScore,
    Summary,
    aggregate,
    score_question,
)

__all__ = [
    "EvalReport",
    "GoldQuestion",
    "GoldSet",
    "QuestionScore",
    "Summary",
    "aggregate",
    "check_against_corpus",
    "load_gold_set",
    "score_question",
]
