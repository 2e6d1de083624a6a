"""Runtime.evaluate and `multilane eval` on fake engines: known runs give known numbers, and stages are declared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from multilane.engines.base import SamplingOptions
from multilane.errors import DatasetError, EvaluationError
from multilane.evaluation import load_gold_set
from multilane.evaluation.report import format_table, write_chart
from multilane.testing import FakeGenerateEngine

PIPELINE = """
models:
  embedder: {kind: embedding, source: fake}
  assistant: {kind: generate, source: fake}
indexes:
  guide: {embedder: embedder, documents: "docs/*.md", chunk_tokens: 64, chunk_overlap: 0}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: guide, query: "{{ inputs.question }}", top_k: 2, mode: keyword}
      answer:
        kind: reason
        model: assistant
        prompt: "Notes: {{ stages.passages.text }} Question: {{ inputs.question }}"
    output: "{{ stages.answer.text }}"
  only_answer:
    inputs: {question: str, style: {type: str, default: plain}}
    stages:
      answer: {kind: reason, model: assistant, prompt: "{{ inputs.question }}"}
"""

DOCS = {
    "lava.md": "# Lava\nMagma that reaches the surface is called lava.\n",
    "otters.md": "# Otters\nSea otters hold hands while sleeping.\n",
    "bread.md": "# Bread\nYeast ferments sugar so the dough rises.\n",
}

QUESTIONS = [
    {"id": "lava", "question": "What is magma at the surface called?", "answer": "lava",
     "sources": ["lava.md"], "type": "single"},
    {"id": "otters", "question": "What do sea otters hold while sleeping?", "answer": "hands",
     "sources": ["otters.md"], "type": "single"},
    {"id": "both", "question": "What rises, yeast dough or magma?", "answer": "dough",
     "sources": ["bread.md", "lava.md"], "type": "multi_hop"},
    {"id": "moon", "question": "How far away is the moon?", "answer": "I don't know.", "type": "no_answer"},
]


def reply(prompt: str, options: SamplingOptions) -> str:
    """Answers from the notes like a careful model: the word it was asked for, or a refusal."""
    if "otters hold" in prompt:
        return "They hold hands."
    if "called lava" in prompt and "magma at the surface" in prompt:
        return "Lava"
    return "I don't know."


@pytest.fixture
def setup(tmp_path: Path, fake_runtime: Any) -> tuple[Any, Path]:
    (tmp_path / "docs").mkdir()
    for name, text in DOCS.items():
        (tmp_path / "docs" / name).write_text(text)
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    runtime, _ = fake_runtime(PIPELINE, assistant=FakeGenerateEngine(reply))
    return runtime, gold


@pytest.mark.anyio
async def test_evaluate_scores_retrieval_and_answers_of_every_question(setup: tuple[Any, Path]) -> None:
    runtime, gold = setup
    async with runtime as rt:
        result = await rt.evaluate("ask", gold, concurrency=3, retrieve_stage="passages", answer_stage="answer")

    runs = {run.id: run for run in result.runs}
    assert [run.id for run in result.runs] == ["lava", "otters", "both", "moon"]  # the gold set's order
    assert runs["lava"].retrieved is not None and runs["lava"].retrieved[0] == "docs/lava.md"
    assert runs["otters"].prediction == "They hold hands."
    assert result.ks == (1, 2)
    overall = result.report.overall
    scores = {score.id: score for score in result.report.scores}
    # Each number is the mean of the per-question scores, which follow from what each run returned.
    assert overall.recall_at[2] == pytest.approx(sum(s.recall[2] for s in scores.values() if s.recall) / 3)
    assert overall.mrr == pytest.approx(sum(s.reciprocal_rank or 0 for s in scores.values() if s.recall) / 3)
    assert scores["lava"].exact_match == 1.0 and scores["otters"].contains is True
    assert scores["both"].refused is True and scores["moon"].refused is True
    assert overall.exact_match == pytest.approx(1 / 3)  # "Lava" only; "They hold hands." contains the answer
    assert overall.contains == pytest.approx(2 / 3)
    assert overall.refusal_accuracy == 1.0 and overall.false_refusals == pytest.approx(1 / 3)
    assert overall.latency_p50 is not None and overall.latency_p95 is not None
    assert all(run.prompt_tokens > 0 and run.completion_tokens > 0 for run in result.runs)
    assert result.errors == 0 and result.retrieval == "keyword, top 2"
    assert result.to_dict()["overall"]["recall@2"] == overall.recall_at[2]


@pytest.mark.anyio
async def test_stages_must_be_declared_never_guessed(setup: tuple[Any, Path]) -> None:
    runtime, gold = setup
    async with runtime as rt:
        with pytest.raises(EvaluationError, match=r"say which stage of pipeline 'ask' retrieves and which answers: "
                                                  r"--retrieve-stage NAME \(retrieve stages: passages\)"):
            await rt.evaluate("ask", gold)
        with pytest.raises(EvaluationError, match=r"stage 'answer' of pipeline 'ask' is a reason stage; the "
                                                  r"retrieve stage must be a retrieve stage \(passages\)"):
            await rt.evaluate("ask", gold, retrieve_stage="answer")
        with pytest.raises(EvaluationError, match="has no stage 'reply' to use as the answer stage"):
            await rt.evaluate("ask", gold, answer_stage="reply")
        with pytest.raises(EvaluationError, match="has inputs question, style; say which one takes the question"):
            await rt.evaluate("only_answer", gold, answer_stage="answer")
        retrieval_only = await rt.evaluate("ask", gold, retrieve_stage="passages", answer_stage="none")
    assert retrieval_only.answer_stage is None and retrieval_only.report.overall.contains is None
    assert all(run.prediction is None for run in retrieval_only.runs)


@pytest.mark.anyio
async def test_a_gold_set_can_declare_the_stages_and_answer_only_runs_skip_retrieval(
        setup: tuple[Any, Path]) -> None:
    runtime, gold = setup
    gold.write_text(json.dumps({"eval": {"answer_stage": "answer", "question_input": "question"}}) + "\n"
                    + gold.read_text())
    async with runtime as rt:
        result = await rt.evaluate("only_answer", gold)
    assert result.answer_stage == "answer" and result.retrieve_stage is None
    assert result.report.overall.recall_at == {} and result.report.overall.mrr is None
    assert result.report.overall.refusal_accuracy == 1.0
    assert "recall@" not in format_table([result])


@pytest.mark.anyio
async def test_a_failed_run_counts_as_wrong_and_every_run_failing_is_an_error(
        tmp_path: Path, setup: tuple[Any, Path], fake_runtime: Any) -> None:
    _, gold = setup

    def flaky(prompt: str, options: SamplingOptions) -> str:
        if "sea otters" in prompt:
            raise RuntimeError("engine hiccup")
        return reply(prompt, options)

    runtime, _ = fake_runtime(PIPELINE, assistant=FakeGenerateEngine(flaky))
    async with runtime as rt:
        result = await rt.evaluate("ask", gold, retrieve_stage="passages", answer_stage="answer")
    failed = [run for run in result.runs if run.error]
    assert [run.id for run in failed] == ["otters"] and failed[0].prediction == ""
    assert result.errors == 1
    assert result.report.overall.contains == pytest.approx(1 / 3)  # lava only: the failed run is not left out

    def broken(prompt: str, options: SamplingOptions) -> str:
        raise RuntimeError("engine down")

    runtime, _ = fake_runtime(PIPELINE, assistant=FakeGenerateEngine(broken))
    async with runtime as rt:
        with pytest.raises(EvaluationError, match=r"every question of .*gold\.jsonl failed on pipeline 'ask'"):
            await rt.evaluate("ask", gold, retrieve_stage="passages", answer_stage="answer")


def test_an_eval_record_must_come_first_and_hold_known_keys(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"eval": {"answer_stage": "a"}}) + "\n")
    with pytest.raises(DatasetError, match=r"g.jsonl:2: an \"eval\" record must be the first record"):
        load_gold_set(path)
    path.write_text(json.dumps({"eval": {"answer": "a"}}) + "\n" + json.dumps(QUESTIONS[0]) + "\n")
    with pytest.raises(DatasetError, match=r"g\.jsonl:1: eval\.answer: Extra inputs are not permitted"):
        load_gold_set(path)


@pytest.mark.anyio
async def test_the_table_and_chart_show_results_side_by_side(setup: tuple[Any, Path], tmp_path: Path) -> None:
    runtime, gold = setup
    async with runtime as rt:
        first = await rt.evaluate("ask", gold, retrieve_stage="passages", answer_stage="answer")
        second = await rt.evaluate("ask", gold, answer_stage="answer")
    table = format_table([first, second])
    header = table.splitlines()[1]
    assert header.split() == ["t.yaml:ask", "t.yaml:ask"]
    recall = next(line for line in table.splitlines() if line.startswith("recall@2"))
    assert recall.split()[1:] == [f"{first.report.overall.recall_at[2]:.3f}", "-"]
    assert any(line.startswith("single (2)") for line in table.splitlines())
    write_chart([first, second], tmp_path / "out" / "chart.png")
    assert (tmp_path / "out" / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
