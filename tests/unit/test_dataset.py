"""Gold sets: bad records fail with file:line, and the shipped sets still match their corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multilane.corpora import export_python_reference
from multilane.errors import DatasetError
from multilane.evaluation.dataset import check_against_corpus, load_gold_set

ROOT = Path(__file__).resolve().parents[2]
EVAL = ROOT / "examples" / "eval"
VELLMAR = ROOT / "examples" / "data"


def _write(path: Path, *records: dict[str, object] | str) -> Path:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = {"id": "q1", "question": "Who built it?", "answer": "Tamsin Holloway",
        "sources": ["history/cape-orrin-lighthouse.md"], "type": "single"}


def test_a_gold_set_loads_with_lines_and_source_groups(tmp_path: Path) -> None:
    path = _write(tmp_path / "gold.jsonl", GOOD, "",
                  {"id": "q2", "question": "Two facts?", "answer": "1887", "type": "multi_hop",
                   "sources": ["a.md", ["b.md", "copy/b.md"]]},
                  {"id": "q3", "question": "Unknown?", "answer": "I don't know.", "type": "no_answer"})

    gold = load_gold_set(path)

    assert [q.id for q in gold] == ["q1", "q2", "q3"]
    assert gold.lines == (1, 3, 4)
    assert gold.questions[1].source_groups == (("a.md",), ("b.md", "copy/b.md"))
    assert gold.questions[1].source_files == ("a.md", "b.md", "copy/b.md")
    assert gold.count_by_type() == {"single": 1, "multi_hop": 1, "no_answer": 1}


@pytest.mark.parametrize(("record", "message"), [
    ("{not json", r"gold.jsonl:2: not valid JSON"),
    ("[1, 2]", r"gold.jsonl:2: expected a JSON object, got list"),
    ({**GOOD, "id": "q2", "type": "simple"}, r"gold.jsonl:2: type: Input should be 'single', 'identifier'"),
    ({**GOOD, "id": "q2", "answer": "  "}, r"gold.jsonl:2: answer: must not be blank"),
    ({**GOOD, "id": "q2", "colour": "red"}, r"gold.jsonl:2: colour: Extra inputs are not permitted"),
    ({**GOOD, "id": "q2", "sources": []}, r"gold.jsonl:2: a single question needs at least one source file"),
    ({**GOOD, "id": "q2", "sources": ["../secret.md"]},
     r"gold.jsonl:2: sources: entry 1, '\.\./secret\.md', must be a path relative"),
    ({**GOOD, "id": "q2", "sources": ["a.md", []]}, r"gold.jsonl:2: sources: entry 2 is an empty list"),
    ({**GOOD, "id": "q2", "type": "multi_hop"}, r"gold.jsonl:2: a multi_hop question needs sources in at least two"),
    ({**GOOD, "id": "q2", "type": "no_answer"}, r"gold.jsonl:2: a no_answer question has no sources"),
    ({"id": "q2", "question": "?", "answer": "Nobody", "type": "no_answer"}, r"answer must be a refusal"),
    ({**GOOD, "id": "q2", "answer": "I don't know."}, r"gold.jsonl:2: the answer .* reads as a refusal"),
    ({**GOOD}, r"gold.jsonl:2: id 'q1' is already used on line 1"),
])
def test_a_bad_record_names_its_file_and_line(tmp_path: Path, record: dict[str, object] | str,
                                              message: str) -> None:
    path = _write(tmp_path / "gold.jsonl", GOOD, record)
    with pytest.raises(DatasetError, match=message):
        load_gold_set(path)


def test_an_empty_or_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no questions"):
        load_gold_set(_write(tmp_path / "empty.jsonl", ""))
    with pytest.raises(DatasetError, match="cannot read gold set"):
        load_gold_set(tmp_path / "missing.jsonl")


def test_check_against_corpus_reports_missing_files_and_answers(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("# A\n\nThe tower has 142 steps.\n", encoding="utf-8")
    path = _write(tmp_path / "gold.jsonl",
                  {"id": "ok", "question": "?", "answer": "142 Steps!", "sources": ["a.md"], "type": "single"},
                  {"id": "gone", "question": "?", "answer": "x", "sources": ["b.md"], "type": "single"},
                  {"id": "wrong", "question": "?", "answer": "14 steps", "sources": ["a.md"], "type": "single"})

    problems = check_against_corpus(load_gold_set(path), corpus)

    assert problems == [
        f"{path}:2 (gone): source b.md does not exist under {corpus}",
        f"{path}:3 (wrong): answer '14 steps' is in none of ['a.md']",
    ]


def test_the_vellmar_gold_set_matches_its_corpus() -> None:
    gold = load_gold_set(EVAL / "vellmar.jsonl")
    assert check_against_corpus(gold, VELLMAR) == []
    _check_mix(gold.count_by_type(), total=40, identifier=0, no_answer=1, multi_hop=5)


def test_the_python_reference_gold_set_matches_the_exported_reference(tmp_path: Path) -> None:
    gold = load_gold_set(EVAL / "python_reference.jsonl")
    assert check_against_corpus(gold, export_python_reference(tmp_path)) == []
    _check_mix(gold.count_by_type(), total=60, identifier=8, no_answer=6, multi_hop=5)


def _check_mix(counts: dict[str, int], *, total: int, identifier: int, no_answer: int, multi_hop: int) -> None:
    assert sum(counts.values()) >= total
    assert set(counts) == {"single", "identifier", "paraphrase", "multi_hop", "no_answer"}
    assert counts["identifier"] >= identifier
    assert counts["no_answer"] >= no_answer
    assert counts["multi_hop"] >= multi_hop
