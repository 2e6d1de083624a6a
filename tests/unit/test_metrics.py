"""Evaluation metrics on known inputs: the numbers a user compares pipelines by must not drift."""

from __future__ import annotations

import json

import pytest

from multilane.evaluation.metrics import (
    QuestionScore,
    aggregate,
    contains_answer,
    exact_match,
    is_refusal,
    normalize_answer,
    percentile,
    recall_at_k,
    reciprocal_rank,
    score_question,
    source_matches,
    token_f1,
)


@pytest.mark.parametrize(("text", "normalized"), [
    ("The Cape Orrin lighthouse!", "cape orrin lighthouse"),
    ("  An   answer,\n\tin a  line ", "answer in line"),
    ('"\'!r\'" which calls "repr()"', "r which calls repr"),
    ("the else clause’s suite", "else clauses suite"),  # Unicode punctuation goes too
    ("__dict__ and *__weakref__*", "dict and weakref"),
    ("1,960 (in 1861)", "1960 in 1861"),
    ("Theory of a thesis", "theory of thesis"),  # articles only as whole words
])
def test_normalize_answer_is_squad_style(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match("The LIFO order.", "lifo order") == 1.0
    assert exact_match("LIFO order, always", "LIFO order") == 0.0


@pytest.mark.parametrize(("prediction", "gold", "f1"), [
    ("Tamsin Holloway", "Tamsin Holloway", 1.0),
    ("the engineer Tamsin Holloway", "Tamsin Holloway", 0.8),  # precision 2/3, recall 1
    ("Holloway", "Tamsin Holloway", 2 / 3),  # precision 1, recall 1/2
    ("Albert Fenn", "Tamsin Holloway", 0.0),
    ("the", "Tamsin Holloway", 0.0),  # nothing left after normalisation
    ("", "", 1.0),
    ("12 12 steps", "12 steps", 0.8),  # repeated tokens count once per match
])
def test_token_f1_on_known_pairs(prediction: str, gold: str, f1: float) -> None:
    assert token_f1(prediction, gold) == pytest.approx(f1)


def test_contains_answer_matches_whole_normalised_tokens() -> None:
    assert contains_answer("It was built in 1887 by Tamsin Holloway.", "Tamsin Holloway")
    assert contains_answer("Answer: 142 steps lead up.", "142 steps")
    assert not contains_answer("It has 1142 steps", "142 steps")  # not inside another token
    assert not contains_answer("Holloway built it", "Tamsin Holloway")
    assert not contains_answer("anything", "The")  # an answer that normalises away never matches


@pytest.mark.parametrize(("reply", "refused"), [
    ("I don't know.", True),
    ("I do not know the answer to that.", True),
    ("Sorry, the notes do not say.", True),
    ("The guide doesn't say which operator runs the phones.", True),
    ("That is not mentioned in the notes.", True),
    ("There is no information about it.", True),
    ("I dont know", True),
    ("The lighthouse was built in 1887.", False),
    ("Nobody knows? No: Tamsin Holloway built it.", False),
    ("Knowledge is power", False),
])
def test_is_refusal_detects_the_documented_phrases(reply: str, refused: bool) -> None:
    assert is_refusal(reply) is refused


def test_a_retrieved_path_matches_a_gold_path_at_a_folder_boundary() -> None:
    assert source_matches("../examples/data/history/herring-boom.md", "history/herring-boom.md")
    assert source_matches("assert.md", "assert.md")
    assert source_matches("/home/u/.cache/corpora/python-reference-ab12/assert.md", "./assert.md")
    assert not source_matches("history/old-herring-boom.md", "herring-boom.md")
    assert not source_matches("assert.md", "")


GOLD_ONE = [["history/herring-boom.md"]]
GOLD_TWO = [["a.md"], ["b.md", "b-copy.md"]]  # two facts; the second lives in two files


def test_recall_at_k_is_the_share_of_source_groups_in_the_top_k() -> None:
    retrieved = ["x.md", "b-copy.md", "a.md", "y.md"]
    assert recall_at_k(retrieved, GOLD_TWO, 1) == 0.0
    assert recall_at_k(retrieved, GOLD_TWO, 2) == 0.5  # b-copy.md stands in for b.md
    assert recall_at_k(retrieved, GOLD_TWO, 3) == 1.0
    assert recall_at_k(["../data/history/herring-boom.md"], GOLD_ONE, 3) == 1.0
    assert recall_at_k(["a.md", "a.md", "a.md"], GOLD_TWO, 3) == 0.5  # repeats of one file find one fact


def test_recall_rejects_a_k_below_one_and_missing_gold() -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        recall_at_k(["a.md"], GOLD_ONE, 0)
    with pytest.raises(ValueError, match="at least one gold source"):
        recall_at_k(["a.md"], [], 3)


def test_reciprocal_rank_is_one_over_the_first_matching_rank() -> None:
    assert reciprocal_rank(["a.md", "x.md"], GOLD_TWO) == 1.0
    assert reciprocal_rank(["x.md", "y.md", "b.md"], GOLD_TWO) == pytest.approx(1 / 3)
    assert reciprocal_rank(["x.md", "y.md"], GOLD_TWO) == 0.0
    assert reciprocal_rank([], GOLD_TWO) == 0.0


def test_percentiles_interpolate_linearly() -> None:
    latencies = [0.1, 0.2, 0.3, 0.4, 1.0]
    assert percentile(latencies, 50) == pytest.approx(0.3)
    assert percentile(latencies, 95) == pytest.approx(0.88)  # 0.4 + 0.8 * (1.0 - 0.4)
    assert percentile([2.0], 95) == 2.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="from 0 to 100"):
        percentile(latencies, 101)


def test_score_question_scores_retrieval_and_answer() -> None:
    score = score_question(id="q1", type="single", gold_answer="Tamsin Holloway", gold_sources=GOLD_ONE,
                           retrieved=["weather.md", "history/herring-boom.md"],
                           prediction="Tamsin Holloway built it.", latency=0.5, ks=(1, 3))
    assert score.recall == {1: 0.0, 3: 1.0}
    assert score.reciprocal_rank == 0.5
    assert score.exact_match == 0.0
    assert score.f1 == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert score.contains is True
    assert score.refused is False


def test_a_no_answer_question_is_scored_on_refusal_only() -> None:
    score = score_question(id="q2", type="no_answer", gold_answer="I don't know.", gold_sources=[],
                           retrieved=["a.md"], prediction="I don't know.")
    assert score.recall is None and score.reciprocal_rank is None
    assert score.exact_match is None and score.f1 is None and score.contains is None
    assert score.refused is True


def _score(id: str, type: str, *, recall3: float | None = None, rr: float | None = None,
           em: float | None = None, f1: float | None = None, contains: bool | None = None,
           refused: bool | None = None, latency: float | None = None, tokens: int = 0) -> QuestionScore:
    return QuestionScore(id=id, type=type, recall=None if recall3 is None else {3: recall3},
                         reciprocal_rank=rr, exact_match=em, f1=f1, contains=contains, refused=refused,
                         latency=latency, prompt_tokens=tokens, completion_tokens=tokens // 10)


def test_aggregate_reports_overall_and_per_type_means() -> None:
    scores = [
        _score("a", "single", recall3=1.0, rr=1.0, em=1.0, f1=1.0, contains=True, refused=False,
               latency=1.0, tokens=100),
        _score("b", "single", recall3=0.0, rr=0.0, em=0.0, f1=0.5, contains=False, refused=True,
               latency=3.0, tokens=300),
        _score("c", "multi_hop", recall3=0.5, rr=0.5, em=0.0, f1=0.0, contains=True, refused=False,
               latency=2.0, tokens=200),
        _score("d", "no_answer", refused=True, latency=4.0, tokens=400),
        _score("e", "no_answer", refused=False, latency=5.0, tokens=500),
    ]

    report = aggregate(scores)

    overall = report.overall
    assert overall.questions == 5
    assert overall.recall_at == {3: pytest.approx(0.5)}
    assert overall.mrr == pytest.approx(0.5)
    assert overall.exact_match == pytest.approx(1 / 3)
    assert overall.f1 == pytest.approx(0.5)
    assert overall.contains == pytest.approx(2 / 3)
    assert overall.refusal_accuracy == 0.5
    assert overall.false_refusals == pytest.approx(1 / 3)
    assert overall.latency_p50 == 3.0
    assert overall.latency_p95 == pytest.approx(4.8)
    assert overall.mean_prompt_tokens == 300.0
    assert list(report.by_type) == ["single", "multi_hop", "no_answer"]
    single = report.by_type["single"]
    assert (single.questions, single.recall_at, single.mrr, single.exact_match) == (2, {3: 0.5}, 0.5, 0.5)
    no_answer = report.by_type["no_answer"]
    assert no_answer.recall_at == {} and no_answer.mrr is None and no_answer.exact_match is None
    assert no_answer.refusal_accuracy == 0.5 and no_answer.false_refusals is None


def test_a_report_is_json_ready() -> None:
    report = aggregate([_score("a", "single", recall3=1.0, rr=1.0, em=1.0, f1=1.0, contains=True,
                               refused=False, latency=0.25)])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["overall"]["recall@3"] == 1.0
    assert data["by_type"]["single"]["mrr"] == 1.0
    assert data["questions"][0]["id"] == "a"
    assert data["questions"][0]["recall"] == {"recall@3": 1.0}


def test_an_empty_run_has_no_numbers_rather_than_zeros() -> None:
    summary = aggregate([]).overall
    assert summary.questions == 0
    assert summary.mrr is None and summary.f1 is None and summary.latency_p50 is None
