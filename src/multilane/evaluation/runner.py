"""Run a gold set through a pipeline, every question concurrently through the lanes, and score the results.

Retrieval is scored on the passages the declared retrieve stage returned, in their order: recall@k counts the
first k passages, so it measures what the answer stage is shown (with `per_source: 1` those are k different
files). The answer is the declared answer stage's text (`text` of a reason stage, `answer` of an agent).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import structlog

from multilane.errors import EvaluationError, MultilaneError
from multilane.evaluation.dataset import GoldQuestion, GoldSet, load_gold_set
from multilane.evaluation.metrics import DEFAULT_KS, EvalReport, QuestionScore, aggregate, score_question
from multilane.pipeline.executor import RunResult
from multilane.progress import step as progress_step
from multilane.spec import EmbedStage, GenerateStage, PipelineSpec, RetrieveStage, Spec

log = structlog.get_logger(__name__)

EvalProgress = Callable[[int, int], None]
"""Called with (questions done, questions in all) as an evaluation goes."""

ANSWER_KINDS = ("reason", "agent")
NOT_MEASURED = "none"  # as a stage name: do not measure that half (say, retrieval only)


class Runner(Protocol):
    """What an evaluation needs of a Runtime: its pipeline file, loading models and indexes, running a pipeline."""

    @property
    def spec(self) -> Spec: ...

    async def load(self, model: str) -> Any: ...

    async def index(self, name: str) -> Any: ...

    async def run(self, pipeline: str, inputs: Mapping[str, Any] | None = None, /, **kwargs: Any) -> RunResult: ...


@dataclass(frozen=True)
class QuestionRun:
    """What one question's run gave: the passages' sources in rank order, the answer, time, tokens, any error."""

    id: str
    type: str
    question: str
    gold_answer: str
    gold_sources: tuple[tuple[str, ...], ...]
    retrieved: tuple[str, ...] | None
    prediction: str | None
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {"id": self.id, "type": self.type, "question": self.question, "gold_answer": self.gold_answer,
                "gold_sources": [list(group) for group in self.gold_sources],
                "retrieved": None if self.retrieved is None else list(self.retrieved),
                "prediction": self.prediction, "seconds": round(self.seconds, 4),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "error": self.error}


@dataclass(frozen=True)
class EvalResult:
    """One pipeline measured on one gold set: the report (overall and per question type) and every run."""

    label: str
    file: str
    pipeline: str
    dataset: str
    retrieve_stage: str | None
    answer_stage: str | None
    question_input: str
    retrieval: str  # how the retrieve stage searches, e.g. "hybrid, top 3, per_source 1"
    ks: tuple[int, ...]
    concurrency: int
    seconds: float
    report: EvalReport
    runs: tuple[QuestionRun, ...]

    @property
    def errors(self) -> int:
        """How many questions' runs failed."""
        return sum(1 for run in self.runs if run.error is not None)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: settings, the report's summaries, and each question with its scores."""
        report = self.report.to_dict()
        scores = {row["id"]: row for row in report["questions"]}
        return {
            "label": self.label, "file": self.file, "pipeline": self.pipeline, "dataset": self.dataset,
            "retrieve_stage": self.retrieve_stage, "answer_stage": self.answer_stage,
            "question_input": self.question_input, "retrieval": self.retrieval, "ks": list(self.ks),
            "concurrency": self.concurrency, "seconds": round(self.seconds, 3), "errors": self.errors,
            "overall": report["overall"], "by_type": report["by_type"],
            "questions": [{**run.to_dict(), "scores": scores[run.id]} for run in self.runs],
        }


@dataclass(frozen=True)
class _Plan:
    retrieve_stage: str | None
    answer_stage: str | None
    question_input: str
    retrieval: str
    ks: tuple[int, ...]


async def evaluate(runtime: Runner, pipeline: str, dataset: GoldSet | str | Path, *, concurrency: int = 8,
                   retrieve_stage: str | None = None, answer_stage: str | None = None,
                   question_input: str | None = None, progress: EvalProgress | None = None) -> EvalResult:
    """Run every question of the gold set through the pipeline, at most `concurrency` at once, and score them.

    Stages given here win over the ones the gold set declares ("none" leaves that half unmeasured); at least one
    of the two must be declared. The
    pipeline's models are loaded and its indexes opened before the first question, outside every latency.
    """
    if concurrency < 1:
        raise EvaluationError(f"concurrency must be at least 1, got {concurrency}")
    gold = dataset if isinstance(dataset, GoldSet) else await anyio.to_thread.run_sync(load_gold_set, dataset)
    declared = runtime.spec.pipeline(pipeline)
    plan = _plan(pipeline, declared, gold, retrieve_stage, answer_stage, question_input)
    await _warm_up(runtime, declared)
    runs: list[QuestionRun | None] = [None] * len(gold)
    limiter = anyio.CapacityLimiter(concurrency)
    done = 0
    started = time.perf_counter()
    log.info("eval started", pipeline=pipeline, dataset=str(gold.path), questions=len(gold),
             concurrency=concurrency)

    name = runtime.spec.path.name if runtime.spec.path is not None else runtime.spec.name
    with progress_step(f"eval:{name}:{pipeline}", f"evaluating {name}:{pipeline}", total=len(gold)) as advance:

        async def one(position: int, question: GoldQuestion) -> None:
            nonlocal done
            async with limiter:
                runs[position] = await _ask(runtime, pipeline, plan, question)
            done += 1
            advance(done)
            if progress is not None:
                progress(done, len(gold))

        async with anyio.create_task_group() as tg:
            for position, question in enumerate(gold):
                tg.start_soon(one, position, question)
    finished = [run for run in runs if run is not None]
    failures = [run for run in finished if run.error is not None]
    if failures and len(failures) == len(finished):
        raise EvaluationError(f"every question of {gold.path} failed on pipeline '{pipeline}'; the first: "
                              f"{failures[0].error}")
    for run in failures:
        log.warning("eval question failed", question=run.id, error=run.error)
    scores = [_score(run, plan) for run in finished]
    seconds = time.perf_counter() - started
    log.info("eval finished", pipeline=pipeline, seconds=round(seconds, 3), errors=len(failures))
    return EvalResult(
        label=f"{name}:{pipeline}", file=str(runtime.spec.path or runtime.spec.name), pipeline=pipeline,
        dataset=str(gold.path), retrieve_stage=plan.retrieve_stage, answer_stage=plan.answer_stage,
        question_input=plan.question_input, retrieval=plan.retrieval, ks=plan.ks, concurrency=concurrency,
        seconds=seconds, report=aggregate(scores), runs=tuple(finished))


async def _warm_up(runtime: Runner, declared: PipelineSpec) -> None:
    """Load the pipeline's models and open its indexes first, so no question's latency includes loading them."""
    for stage in declared.stages.values():
        if isinstance(stage, RetrieveStage):
            await runtime.index(stage.index)
        elif isinstance(stage, GenerateStage | EmbedStage):
            await runtime.load(stage.model)


def _plan(pipeline: str, declared: PipelineSpec, gold: GoldSet, retrieve_stage: str | None,
          answer_stage: str | None, question_input: str | None) -> _Plan:
    """Which stages to read and which input takes the question, as declared; never guessed."""
    retrieve_name = _declared(retrieve_stage, gold.settings.retrieve_stage)
    answer_name = _declared(answer_stage, gold.settings.answer_stage)
    stages = declared.stages
    if retrieve_stage == NOT_MEASURED and answer_stage == NOT_MEASURED:
        raise EvaluationError("with neither a retrieve stage nor an answer stage there is nothing to measure")
    if retrieve_name is None and answer_name is None:
        retrievers = ", ".join(n for n, s in stages.items() if s.kind == "retrieve") or "none"
        answerers = ", ".join(n for n, s in stages.items() if s.kind in ANSWER_KINDS) or "none"
        raise EvaluationError(
            f"say which stage of pipeline '{pipeline}' retrieves and which answers: --retrieve-stage NAME "
            f"(retrieve stages: {retrievers}) and --answer-stage NAME (reason or agent stages: {answerers}), "
            f"or an \"eval\" record at the top of {gold.path}")
    retrieval = "not measured"
    ks: tuple[int, ...] = ()
    if retrieve_name is not None:
        stage = _stage(pipeline, declared, retrieve_name, ("retrieve",), "retrieve stage")
        assert isinstance(stage, RetrieveStage)
        ks = tuple(sorted({k for k in DEFAULT_KS if k <= stage.top_k} | {stage.top_k}))
        retrieval = f"{stage.mode}, top {stage.top_k}"
        if stage.per_source is not None:
            retrieval += f", per_source {stage.per_source}"
        if stage.filter is not None:
            retrieval += ", filtered"
    if answer_name is not None:
        _stage(pipeline, declared, answer_name, ANSWER_KINDS, "answer stage")
    name = question_input or gold.settings.question_input
    if name is None:
        if len(declared.inputs) != 1:
            listed = ", ".join(declared.inputs) or "none"
            raise EvaluationError(f"pipeline '{pipeline}' has inputs {listed}; say which one takes the question "
                                  "(--question-input NAME)")
        name = next(iter(declared.inputs))
    elif name not in declared.inputs:
        raise EvaluationError(f"pipeline '{pipeline}' has no input '{name}' "
                              f"(inputs: {', '.join(declared.inputs) or 'none'})")
    others = [n for n, spec in declared.inputs.items() if n != name and spec.required]
    if others:
        raise EvaluationError(f"pipeline '{pipeline}' also needs input(s) {', '.join(others)}; an evaluation "
                              "gives only the question, so give them defaults")
    return _Plan(retrieve_name, answer_name, name, retrieval, ks)


def _declared(given: str | None, in_dataset: str | None) -> str | None:
    """The stage named here, else the gold set's; "none" says that half is not measured."""
    name = given if given is not None else in_dataset
    return None if name == NOT_MEASURED else name


def _stage(pipeline: str, declared: PipelineSpec, name: str, kinds: Sequence[str], what: str) -> Any:
    stage = declared.stages.get(name)
    fitting = ", ".join(n for n, s in declared.stages.items() if s.kind in kinds) or "none"
    if stage is None:
        raise EvaluationError(f"pipeline '{pipeline}' has no stage '{name}' to use as the {what} "
                              f"({' or '.join(kinds)} stages: {fitting})")
    if stage.kind not in kinds:
        raise EvaluationError(f"stage '{name}' of pipeline '{pipeline}' is a {stage.kind} stage; the {what} "
                              f"must be a {' or '.join(kinds)} stage ({fitting})")
    if stage.for_each is not None:
        raise EvaluationError(f"stage '{name}' of pipeline '{pipeline}' runs for_each; the {what} must give one "
                              "result per question")
    return stage


async def _ask(runtime: Runner, pipeline: str, plan: _Plan, question: GoldQuestion) -> QuestionRun:
    started = time.perf_counter()
    retrieved: tuple[str, ...] | None = None
    prediction: str | None = None
    error: str | None = None
    prompt_tokens = completion_tokens = 0
    try:
        result = await runtime.run(pipeline, {plan.question_input: question.question})
    except MultilaneError as exc:
        error = str(exc)
        # A failed run found nothing and answered nothing: it counts against the pipeline, not out of the mean.
        retrieved = () if plan.retrieve_stage is not None else None
        prediction = "" if plan.answer_stage is not None else None
    else:
        if plan.retrieve_stage is not None:
            passages = result.stages[plan.retrieve_stage]["passages"]
            retrieved = tuple(str(passage["source"]) for passage in passages)
        if plan.answer_stage is not None:
            answer = result.stages[plan.answer_stage]
            prediction = str(answer["text"] if "text" in answer else answer["answer"])
        for stage_result in result.stages.values():
            prompt_tokens += _count(stage_result.get("prompt_tokens"))
            completion_tokens += _count(stage_result.get("completion_tokens"))
    return QuestionRun(
        id=question.id, type=question.type, question=question.question, gold_answer=question.answer,
        gold_sources=question.source_groups, retrieved=retrieved, prediction=prediction,
        seconds=time.perf_counter() - started, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, error=error)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _score(run: QuestionRun, plan: _Plan) -> QuestionScore:
    return score_question(
        id=run.id, type=run.type, gold_answer=run.gold_answer, gold_sources=run.gold_sources,
        retrieved=run.retrieved, prediction=run.prediction, latency=run.seconds,
        prompt_tokens=run.prompt_tokens, completion_tokens=run.completion_tokens, ks=plan.ks or DEFAULT_KS)
