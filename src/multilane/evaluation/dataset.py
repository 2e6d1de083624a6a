"""Gold question sets for evaluation: JSONL, one question per line, validated with file:line errors.

The first record may instead be `{"eval": {"retrieve_stage": ..., "answer_stage": ..., "question_input": ...}}`:
which stages of the pipelines it is meant for retrieve and answer, so a command line need not say.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from multilane.errors import DatasetError
from multilane.evaluation.metrics import is_refusal, normalize_answer

QuestionType = Literal["single", "identifier", "paraphrase", "multi_hop", "no_answer"]
QUESTION_TYPES: tuple[str, ...] = ("single", "identifier", "paraphrase", "multi_hop", "no_answer")


class GoldQuestion(BaseModel):
    """One gold question: its answer and the files (relative to the corpus root) that hold it.

    Each entry of `sources` is a file, or a list of files that hold the same text (any one will do).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    sources: tuple[str | tuple[str, ...], ...] = ()
    type: QuestionType

    @field_validator("id", "question", "answer")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("sources")
    @classmethod
    def _relative_paths(cls, sources: tuple[str | tuple[str, ...], ...]) -> tuple[str | tuple[str, ...], ...]:
        for number, entry in enumerate(sources, start=1):
            group = (entry,) if isinstance(entry, str) else entry
            if not group:
                raise ValueError(f"entry {number} is an empty list; a list of equivalent files needs a file")
            for path in group:
                parts = PurePosixPath(path).parts
                if not path.strip() or path.startswith("/") or "\\" in path or ".." in parts:
                    raise ValueError(f"entry {number}, {path!r}, must be a path relative to the corpus root, "
                                     "with / between folders")
        return sources

    @model_validator(mode="after")
    def _fits_type(self) -> GoldQuestion:
        if self.type == "no_answer":
            if self.sources:
                raise ValueError("a no_answer question has no sources")
            if not is_refusal(self.answer):
                raise ValueError(f"a no_answer question's answer must be a refusal such as \"I don't know.\", "
                                 f"got {self.answer!r}")
            return self
        if not self.sources:
            raise ValueError(f"a {self.type} question needs at least one source file")
        if self.type == "multi_hop" and len(self.sources) < 2:
            raise ValueError("a multi_hop question needs sources in at least two files")
        if is_refusal(self.answer):
            raise ValueError(f"the answer {self.answer!r} reads as a refusal; only no_answer questions refuse")
        return self

    @property
    def source_groups(self) -> tuple[tuple[str, ...], ...]:
        """The sources as groups of equivalent files, for recall and MRR."""
        return tuple((entry,) if isinstance(entry, str) else entry for entry in self.sources)

    @property
    def source_files(self) -> tuple[str, ...]:
        """Every file the sources name, in order, without repeats."""
        return tuple(dict.fromkeys(path for group in self.source_groups for path in group))


class EvalSettings(BaseModel):
    """What a gold set declares about the pipelines it measures: the stages that retrieve and answer, and
    the input that takes the question."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retrieve_stage: str | None = Field(default=None, min_length=1)
    answer_stage: str | None = Field(default=None, min_length=1)
    question_input: str | None = Field(default=None, min_length=1)


@dataclass(frozen=True)
class GoldSet:
    """The questions of one JSONL file, in file order, with the line each came from."""

    path: Path
    questions: tuple[GoldQuestion, ...]
    lines: tuple[int, ...]
    settings: EvalSettings = field(default_factory=EvalSettings)

    def __iter__(self) -> Iterator[GoldQuestion]:
        return iter(self.questions)

    def __len__(self) -> int:
        return len(self.questions)

    def count_by_type(self) -> dict[str, int]:
        """How many questions of each type, in QUESTION_TYPES order (types with none are left out)."""
        counts = {name: sum(1 for q in self.questions if q.type == name) for name in QUESTION_TYPES}
        return {name: count for name, count in counts.items() if count}


def load_gold_set(path: Path | str) -> GoldSet:
    """Read a JSONL gold set; blank lines are skipped, and any bad record raises DatasetError naming file:line."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read gold set {file}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    questions: list[GoldQuestion] = []
    lines: list[int] = []
    seen: dict[str, int] = {}
    settings = EvalSettings()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        data = _parse_json(file, number, line)
        if "eval" in data:
            if questions or number != _first_line(text):
                raise DatasetError(f"{file}:{number}: an \"eval\" record must be the first record of the file")
            settings = _parse_settings(file, number, data)
            continue
        question = _parse_question(file, number, data)
        if question.id in seen:
            raise DatasetError(f"{file}:{number}: id {question.id!r} is already used on line {seen[question.id]}")
        seen[question.id] = number
        questions.append(question)
        lines.append(number)
    if not questions:
        raise DatasetError(f"{file}: no questions (expected one JSON object per line)")
    return GoldSet(path=file, questions=tuple(questions), lines=tuple(lines), settings=settings)


def _first_line(text: str) -> int:
    return next(number for number, line in enumerate(text.splitlines(), start=1) if line.strip())


def _parse_json(file: Path, number: int, line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{file}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{file}:{number}: expected a JSON object, got {type(data).__name__}")
    return data


def _parse_settings(file: Path, number: int, data: dict[str, Any]) -> EvalSettings:
    if set(data) != {"eval"}:
        extra = ", ".join(sorted(set(data) - {"eval"}))
        raise DatasetError(f"{file}:{number}: an \"eval\" record holds only \"eval\", not {extra}")
    if not isinstance(data["eval"], dict):
        raise DatasetError(f"{file}:{number}: \"eval\" must be an object like "
                           "{\"retrieve_stage\": \"passages\", \"answer_stage\": \"answer\"}")
    try:
        return EvalSettings.model_validate(data["eval"])
    except ValidationError as exc:
        raise DatasetError(f"{file}:{number}: eval.{_describe(exc)}") from exc


def _parse_question(file: Path, number: int, data: dict[str, Any]) -> GoldQuestion:
    try:
        return GoldQuestion.model_validate(data)
    except ValidationError as exc:
        raise DatasetError(f"{file}:{number}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    """The first problem of a validation error as `field: message`."""
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part))
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{location}: {message}" if location else message)
    return "; ".join(dict.fromkeys(problems))


def _is_union_tag(part: object) -> bool:
    """Pydantic names the union member it tried (`str`, `tuple[str, ...]`); users never wrote those."""
    return isinstance(part, str) and (part == "str" or part.startswith("tuple["))


def check_against_corpus(gold: GoldSet, root: Path) -> list[str]:
    """Problems that make a gold set wrong for the corpus under root: missing source files, and answers
    that no source file holds (normalised); an empty list means every record checks out."""
    problems: list[str] = []
    texts: dict[str, str | None] = {}
    for question, line in zip(gold.questions, gold.lines, strict=True):
        where = f"{gold.path}:{line} ({question.id})"
        for name in question.source_files:
            if name not in texts:
                texts[name] = _read_normalized(root / name)
            if texts[name] is None:
                problems.append(f"{where}: source {name} does not exist under {root}")
        if question.type == "no_answer":
            continue
        found = [text for name in question.source_files if (text := texts[name]) is not None]
        answer = normalize_answer(question.answer)
        if found and not any(f" {answer} " in f" {text} " for text in found):
            problems.append(f"{where}: answer {question.answer!r} is in none of {list(question.source_files)}")
    return problems


def _read_normalized(path: Path) -> str | None:
    try:
        return normalize_answer(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
