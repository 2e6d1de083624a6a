"""for_each: a stage fanned out over a list, results in order, failures isolated as on_error says."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from multilane import InputError, SamplingOptions, SpecError, StageError, TemplateError, load_spec
from multilane.spec import GenerateStage
from multilane.testing import FakeGenerateEngine

pytestmark = pytest.mark.anyio

FAN = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  fan:
    inputs: {words: list}
    stages:
      plan:
        kind: tool_call
        model: assistant
        prompt: "Plan {{ inputs.words | join(',') }}"
        schema: {type: object, properties: {words: {type: array, items: {type: string}}}, required: [words]}
      each:
        kind: tool_call
        model: assistant
        for_each: "{{ stages.plan.json.words }}"
        prompt: "Word {{ item }} of {{ inputs.words | length }}"
        schema: {type: object, properties: {word: {type: string}}, required: [word]}
        on_error: fail
        max_concurrency: 16
    output: "{{ stages.each['items'] | map(attribute='json') | map(attribute='word') | join(' ') }}"
"""


def engine_for(words: list[str], *, fail: str | None = None) -> FakeGenerateEngine:
    """Plan returns the words; each item echoes its word in capitals, and the item `fail` gets broken JSON."""

    def reply(prompt: str, options: SamplingOptions) -> str:
        if "Plan " in prompt:
            return json.dumps({"words": words})
        word = prompt.split("Word ", 1)[1].split(" of ", 1)[0]
        if word == fail:
            return "not json"
        return json.dumps({"word": word.upper()})

    return FakeGenerateEngine(reply, token_delay=0.005)


def spec_with(on_error: str, max_concurrency: int = 16) -> str:
    return FAN.replace("on_error: fail", f"on_error: {on_error}").replace(
        "max_concurrency: 16", f"max_concurrency: {max_concurrency}")


ORDER = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  fan:
    inputs: {words: list}
    stages:
      each:
        kind: reason
        model: assistant
        for_each: "{{ inputs.words }}"
        prompt: "Word {{ item }} of {{ inputs.words | length }}"
"""


@pytest.mark.virtual_clock  # token delays take virtual time: the order is exact
async def test_for_each_runs_items_concurrently_and_keeps_their_order(fake_runtime) -> None:
    words = ["alpha", "beta", "gamma", "delta"]

    def reply(prompt: str, options: SamplingOptions) -> str:
        word = prompt.split("Word ", 1)[1].split(" of ", 1)[0]
        return " ".join([word.upper(), *["x"] * (30 - 8 * words.index(word))])  # earlier items take longer

    engine = FakeGenerateEngine(reply, token_delay=0.002)
    rt, _ = fake_runtime(ORDER, assistant=engine)
    async with rt:
        result = await rt.run("fan", words=words)

    items = result.stages["each"]["items"]
    assert [i["text"].split()[0] for i in items] == ["ALPHA", "BETA", "GAMMA", "DELTA"]
    assert result.stages["each"]["count"] == 4 and result.stages["each"]["errors"] == []
    assert max(c.started for c in engine.calls) < min(c.finished or 0 for c in engine.calls)  # all ran at once
    finished = [c.prompt.split("Word ", 1)[1].split(" ", 1)[0] for c in sorted(engine.calls,
                                                                               key=lambda c: c.finished or 0)]
    assert finished == list(reversed(words))  # they finished in reverse, yet the items came back in order


async def test_on_error_fail_fails_the_stage_naming_the_item(fake_runtime) -> None:
    rt, _ = fake_runtime(spec_with("fail"), assistant=engine_for(["a", "b", "c"], fail="b"))
    async with rt:
        with pytest.raises(StageError) as info:
            await rt.run("fan", words=["x"])
    assert str(info.value).startswith("pipeline 'fan' stage 'each': for_each item 2 of 3 ('b'): model output is not")


async def test_on_error_skip_leaves_the_failed_item_out(fake_runtime) -> None:
    rt, _ = fake_runtime(spec_with("skip"), assistant=engine_for(["a", "b", "c"], fail="b"))
    async with rt:
        result = await rt.run("fan", words=["x"])
    assert result.output == "A C"
    errors = result.stages["each"]["errors"]
    assert [(e["index"], e["item"]) for e in errors] == [(1, "b")]
    assert "not valid JSON" in errors[0]["error"]


async def test_on_error_collect_keeps_the_failure_in_its_place(fake_runtime) -> None:
    rt, _ = fake_runtime(spec_with("collect").replace(
        "output: \"{{ stages.each['items'] | map(attribute='json') | map(attribute='word') | join(' ') }}\"",
        "output: \"{% for i in stages.each['items'] %}{{ i.json.word if i.json is defined else 'ERR:' ~ i.item }} "
        "{% endfor %}\""), assistant=engine_for(["a", "b", "c"], fail="b"))
    async with rt:
        result = await rt.run("fan", words=["x"])
    assert result.output.split() == ["A", "ERR:b", "C"]
    items = result.stages["each"]["items"]
    assert items[1]["item"] == "b" and "not valid JSON" in items[1]["error"]


async def test_max_concurrency_bounds_how_many_items_run_at_once(fake_runtime) -> None:
    words = [f"w{i}" for i in range(6)]
    engine = engine_for(words)
    rt, _ = fake_runtime(spec_with("fail", max_concurrency=2), assistant=engine)
    async with rt:
        result = await rt.run("fan", words=["x"])
    assert result.output == " ".join(w.upper() for w in words)
    calls = [c for c in engine.calls if "Word " in c.prompt]
    most = max(sum(1 for o in calls if o.started <= c.started < (o.finished or 0)) for c in calls)
    assert most <= 2


async def test_for_each_over_an_input_with_a_bare_expression(fake_runtime) -> None:
    text = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  p:
    inputs: {names: list}
    stages:
      greet: {kind: reason, model: assistant, for_each: "inputs.names", prompt: "Hi {{ item }}"}
    output: "{{ stages.greet['items'] | length }}"
"""
    rt, _ = fake_runtime(text, assistant=FakeGenerateEngine(lambda prompt, options: "hello"))
    async with rt:
        assert (await rt.run("p", names=["a", "b"])).output == "2"
        assert (await rt.run("p", names=[])).output == "0"


async def test_for_each_that_is_not_a_list_fails_clearly(fake_runtime) -> None:
    text = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  p:
    inputs: {n: int}
    stages:
      greet: {kind: reason, model: assistant, for_each: "{{ inputs.n }}", prompt: "Hi {{ item }}"}
"""
    rt, _ = fake_runtime(text)
    async with rt:
        with pytest.raises(StageError, match="for_each must give a list, got the number 3") as info:
            await rt.run("p", n=3)
    assert isinstance(info.value.cause, TemplateError)
    with pytest.raises(InputError):
        async with rt:
            await rt.run("p", n="x")


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def _spec_error(make_spec: Any, text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        make_spec(text)
    return info.value


def test_item_outside_a_for_each_stage_is_a_spec_error_with_its_line(make_spec) -> None:
    text = FAN.replace('        for_each: "{{ stages.plan.json.words }}"\n', "")
    error = _spec_error(make_spec, text)
    assert error.line == _line(text, 'prompt: "Word') and error.field == "pipelines.fan.stages.each.prompt"
    assert error.reason == "'item' is defined only in stages with for_each (the element the stage runs for)"


def test_for_each_reads_are_checked_and_ordered(make_spec) -> None:
    error = _spec_error(make_spec, FAN.replace("stages.plan.json.words", "stages.plam.json.words"))
    assert (error.line, error.field) == (_line(FAN, "for_each:"), "pipelines.fan.stages.each.for_each")
    assert "unknown stage 'plam'" in error.reason
    error = _spec_error(make_spec, FAN.replace('"{{ stages.plan.json.words }}"', '"{{ item }}"'))
    assert "'item' is defined only in stages with for_each" in error.reason  # the list cannot read item itself
    error = _spec_error(make_spec, FAN.replace('"{{ stages.plan.json.words }}"', '"{{ a }} {{ b }}"'))
    assert error.field == "pipelines.fan.stages.each.for_each" and "expected one expression" in error.reason
    spec = make_spec(FAN)
    assert spec.pipeline("fan").dependencies()["each"] == frozenset({"plan"})


def test_on_error_and_max_concurrency_are_validated(make_spec) -> None:
    error = _spec_error(make_spec, FAN.replace("on_error: fail", "on_error: ignore"))
    assert error.reason == "unknown on_error 'ignore' (allowed: fail, skip, collect)"
    error = _spec_error(make_spec, FAN.replace("max_concurrency: 16", "max_concurrency: 0"))
    assert error.reason == "must be >= 1, got 0"


SHARED_FIRST = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  brief:
    inputs: {notes: str, questions: list}
    stages:
      answers:
        kind: reason
        model: assistant
        for_each: inputs.questions
        prompt: "Notes: {{ inputs.notes }}\\nQuestion: {{ item }}"
"""


async def test_items_whose_prompts_start_with_the_shared_notes_read_them_from_the_prefix_cache(fake_runtime) -> None:
    notes = " ".join(f"fact{i}" for i in range(40))
    engine = FakeGenerateEngine(cache_block_size=8)
    rt, _ = fake_runtime(SHARED_FIRST, assistant=engine)
    async with rt:
        result = await rt.run("brief", notes=notes, questions=["why?", "how?", "when?", "where?"])

    items = result.stages["answers"]["items"]
    assert [item["cached_tokens"] for item in items] == [call.cached_tokens for call in engine.calls]
    assert sorted(item["cached_tokens"] for item in items) == [0, 40, 40, 40]  # the notes, in whole blocks
    assert all(item["prompt_tokens"] == 44 for item in items)  # "<user>Notes:", 40 facts, the question, "<assistant>"


def test_the_example_pipelines_put_shared_text_before_per_call_text() -> None:
    """In every generating stage of pipelines/*.yaml, retrieved passages come before the question or the item."""
    root = Path(__file__).resolve().parents[2] / "pipelines"
    checked = 0
    for path in sorted(root.glob("*.yaml")):
        spec = load_spec(path)
        for pipeline in spec.pipelines.values():
            for stage in pipeline.stages.values():
                if not isinstance(stage, GenerateStage):
                    continue
                reads = [read for source in (stage.system, stage.prompt) if source is not None
                         for read in re.findall(r"\{\{\s*(stages\.\w+|inputs\.\w+|item)", source)]
                if any(read.startswith("stages.") for read in reads):
                    checked += 1
                    first_own = min((i for i, read in enumerate(reads) if not read.startswith("stages.")),
                                    default=len(reads))
                    assert all(read.startswith("stages.") for read in reads[:first_own]) and \
                        all(not read.startswith("stages.") for read in reads[first_own:]), (path.name, reads)
                assert "item" not in " ".join(re.findall(r"\{\{[^}]*\}\}", stage.system or "")), path.name
    assert checked >= 3
