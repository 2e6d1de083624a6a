"""The run journal on fake engines: what it records, resume, replay, the call cache, and a journal that fails."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog.testing

from multilane import JournalError, ReplayError, ResumeError, Runtime, SamplingOptions, StageError, UnknownRunError
from multilane.engines.base import Chunk
from multilane.journal import describe_run, format_run, load_run
from multilane.journal.store import StepDone
from multilane.server.metrics import ServerMetrics
from multilane.testing import FakeGenerateEngine

pytestmark = pytest.mark.anyio

RAG = """
models:
  embedder: {kind: embedding, source: ./embedder}
  assistant: {kind: generate, source: ./assistant}
indexes:
  docs: {embedder: embedder, documents: "docs/*.md", chunk_tokens: 32, chunk_overlap: 4}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: docs, query: "{{ inputs.question }}", top_k: 2}
      answer:
        kind: reason
        model: assistant
        system: "Answer from the notes."
        prompt: "Notes:\\n{{ stages.passages.text }}\\nQuestion: {{ inputs.question }}"
        max_tokens: 32
    output: "{{ stages.answer.text }} [{{ stages.passages.passages[0].source }}]"
"""

FAN = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  fan:
    inputs: {topic: str}
    stages:
      plan:
        kind: tool_call
        model: assistant
        prompt: "Plan questions about {{ inputs.topic }}"
        schema: {type: object, properties: {qs: {type: array, items: {type: string}}}, required: [qs]}
      each:
        kind: reason
        model: assistant
        for_each: stages.plan.json.qs
        max_concurrency: 1
        prompt: "Answer {{ item }}"
      summary: {kind: reason, model: assistant, prompt: "Sum up {{ stages.each['items'] | length }} answers"}
    output: "{{ stages.summary.text }}"
"""

PLAN = json.dumps({"qs": ["q0", "q1", "q2", "q3"]})

AGENTS = """
from multilane import Agent, tool

@tool
def lookup(word: str) -> str:
    \"\"\"Look a word up in the notes.\"\"\"
    with open(CALLS, "a") as out:
        out.write(word + "\\n")
    return f"notes on {word}: they hold hands"

helper = Agent("helper", "assistant", "You help.", [lookup], max_steps=3)
boss = Agent("boss", "assistant", "You supervise.", [helper], max_steps=3)
"""

AGENT_SPEC = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  work:
    inputs: {question: str}
    stages:
      report: {kind: agent, agent: boss, task: "{{ inputs.question }}"}
    output: "{{ stages.report.answer }}"
"""


def fan_reply(prompt: str, options: SamplingOptions) -> str:
    """The plan is four questions; every other call answers with the last word of its prompt."""
    if "Plan questions" in prompt:
        return PLAN
    return "re " + prompt.split()[-2].strip("<>")


def agent_reply(prompt: str, options: SamplingOptions) -> str:
    """The boss asks the helper, the helper looks a word up; each answers at its second step."""
    step = prompt.count("<assistant>")
    if "You supervise." in prompt:
        value: Any = {"tool": "helper", "arguments": {"task": "find otters"}} if step == 1 else \
            {"answer": "Boss says: otters hold hands"}
    else:
        value = {"tool": "lookup", "arguments": {"word": "otter"}} if step == 1 else {"answer": "they hold hands"}
    return json.dumps(value)


class GatedEngine(FakeGenerateEngine):
    """A fake engine whose calls stop at a gate, before reaching the engine, when `gate(prompt)` is true."""

    def __init__(self, reply: Any, gate: Callable[[str], bool]) -> None:
        super().__init__(reply)
        self.gate = gate
        self.reached = anyio.Event()
        self.opened = anyio.Event()

    async def stream(self, prompt_ids: Sequence[int], options: SamplingOptions, request_id: str, *,
                     priority: int = 0) -> AsyncIterator[Chunk]:
        """Stream as the fake does, after waiting at the gate when the prompt matches."""
        if self.gate(self._texts.get(tuple(prompt_ids), "")):
            self.reached.set()
            await self.opened.wait()
        async for chunk in super().stream(prompt_ids, options, request_id, priority=priority):
            yield chunk


def looked_up(calls: Path) -> list[str]:
    """The words the `lookup` tool was called with, in order."""
    return calls.read_text().split()


def exists(path: Path) -> bool:
    return path.exists()


def containing(text: str) -> Callable[[str], bool]:
    return lambda prompt: text in prompt


@pytest.fixture
def journal_file(_home: Path) -> Path:
    """The default journal of a test (MULTILANE_HOME is under tmp_path)."""
    return _home / "journal.db"


@pytest.fixture
def agent_files(tmp_path: Path) -> Path:
    """An agents/ folder with the boss and helper agents; their tool writes each call to calls.txt."""
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "team.py").write_text(AGENTS.replace("CALLS", repr(str(calls))))
    return calls


async def interrupt(rt: Runtime, engine: GatedEngine, pipeline: str, **inputs: Any) -> str:
    """Start a run and cancel it once it reaches the engine's gate, as a crash would stop it; returns its id."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: rt.run(pipeline, **inputs))
        await engine.reached.wait()
        tg.cancel_scope.cancel()
    assert rt.journal is not None
    runs = await rt.journal.runs(limit=1)
    return runs[0].run_id


# ---------------------------------------------------------------------------------------------
# What is recorded


async def test_a_run_is_journaled_with_its_pipeline_hash_stages_and_model_call(fake_runtime, docs: Path,
                                                                              journal_file: Path) -> None:
    rt, _ = fake_runtime(RAG, assistant=FakeGenerateEngine("They hold hands."))
    async with rt:
        result = await rt.run("ask", question="why do otters hold hands?")

    loaded = load_run(journal_file, result.run_id)
    run = loaded.run
    assert (run.pipeline, run.status, run.inputs, run.output) == (
        "ask", "finished", {"question": "why do otters hold hands?"}, result.output)
    assert run.spec_hash == rt.spec.digest and len(run.spec_hash) == 64
    assert run.finished_at is not None and run.finished_at >= run.started_at
    search = loaded.steps["stage:passages/search"]
    assert search.attrs == {"index": "docs", "query": "why do otters hold hands?", "top_k": 2, "mode": "dense",
                            "weights": [1.0, 1.0, 1.0], "filter": None, "per_source": None, "candidates": 50}
    assert search.result[0]["source"] == "docs/otters.md"
    model = loaded.steps["stage:answer/model"]
    assert model.attrs["model"] == "assistant"
    assert model.attrs["messages"][0] == {"role": "system", "content": "Answer from the notes."}
    assert "Sea otters hold hands" in model.attrs["messages"][1]["content"]  # the rendered prompt
    assert model.attrs["options"]["max_tokens"] == 32 and model.attrs["schema"] is None
    assert model.result["text"] == "They hold hands."
    assert model.prompt_tokens > 0 and model.completion_tokens == 3
    assert loaded.steps["stage:answer"].result == result.stages["answer"]

    shown = describe_run(loaded)
    assert [(s["stage"], s["kind"], s["status"], s["model_calls"]) for s in shown["stages"]] == [
        ("passages", "retrieve", "ok", 0), ("answer", "reason", "ok", 1)]
    assert shown["stages"][1]["completion_tokens"] == 3 and shown["errors"] == []
    text = format_run(shown)
    assert "pipeline 'ask', finished" in text and "They hold hands. [docs/otters.md]" in text


async def test_agent_steps_and_tool_calls_are_journaled_as_a_transcript(fake_runtime, agent_files: Path,
                                                                        journal_file: Path) -> None:
    rt, _ = fake_runtime(AGENT_SPEC, assistant=FakeGenerateEngine(agent_reply))
    async with rt:
        result = await rt.run("work", question="What do otters do?")

    assert result.output == "Boss says: otters hold hands"
    loaded = load_run(journal_file, result.run_id)
    tool = loaded.steps["stage:report/agent/step:1/tool:0/agent/step:1/tool:0"]  # the helper's lookup
    assert (tool.kind, tool.attrs, tool.result["result"]) == (
        "tool", {"tool": "lookup", "arguments": {"word": "otter"}}, "notes on otter: they hold hands")
    shown = describe_run(loaded)
    boss, helper = shown["agents"]
    assert (boss["agent"], boss["path"], boss["status"], boss["answer"]) == (
        "boss", "stage:report/agent", "ok", "Boss says: otters hold hands")
    assert [s["kind"] for s in boss["steps"]] == ["calls", "answer"]
    assert (helper["agent"], helper["task"]) == ("helper", "find otters")
    assert shown["model_calls"] == 4
    text = format_run(shown)
    assert "agent helper at stage:report/agent/step:1/tool:0/agent: ok" in text
    assert 'lookup({"word": "otter"}) -> notes on otter' in text


async def test_a_failed_run_is_journaled_with_its_error(fake_runtime, journal_file: Path) -> None:
    def reply(prompt: str, options: SamplingOptions) -> str:
        if "q2" in prompt:
            raise RuntimeError("engine hiccup")
        return fan_reply(prompt, options)

    rt, _ = fake_runtime(FAN, assistant=FakeGenerateEngine(reply))
    async with rt:
        with pytest.raises(StageError):
            await rt.run("fan", topic="otters")
        run_id = (await rt.journal.runs())[0].run_id  # type: ignore[union-attr]

    shown = describe_run(load_run(journal_file, run_id))
    assert shown["status"] == "failed" and "stage 'each'" in shown["error"]
    each = next(s for s in shown["stages"] if s["stage"] == "each")
    assert (each["status"], each["items"], each["items_failed"]) == ("failed", 2, 1)
    assert any(e["path"] == "stage:each/item:2/model" and "engine hiccup" in e["error"] for e in shown["errors"])


async def test_thirty_two_concurrent_runs_are_all_journaled_completely(fake_runtime, journal_file: Path) -> None:
    engine = FakeGenerateEngine(fan_reply, token_delay=0.001)
    rt, _ = fake_runtime(FAN.replace("max_concurrency: 1", "max_concurrency: 4"), assistant=engine)
    async with rt:
        results = await _gather([lambda i=i: rt.run("fan", topic=f"topic {i}") for i in range(32)])

    assert len({r.run_id for r in results}) == 32
    recorded_calls = 0
    for i, result in enumerate(results):
        loaded = load_run(journal_file, result.run_id)
        assert loaded.run.status == "finished" and loaded.run.output == result.output
        assert loaded.run.inputs == {"topic": f"topic {i}"}
        kinds = sorted(r.kind for r in loaded.steps.values())
        assert kinds == sorted(["stage"] * 3 + ["item"] * 4 + ["model"] * 6)
        assert all(r.ok for r in loaded.steps.values())
        recorded_calls += sum(r.kind == "model" for r in loaded.steps.values())
    assert recorded_calls == len(engine.calls) == 32 * 6


async def _gather(calls: list[Callable[[], Any]]) -> list[Any]:
    out: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        out[i] = await calls[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    return out


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_the_journal_file_is_readable_by_its_owner_only(fake_runtime, journal_file: Path) -> None:
    rt, _ = fake_runtime(FAN, assistant=FakeGenerateEngine(fan_reply))
    async with rt:
        await rt.run("fan", topic="otters")
        assert mode_of(journal_file) == 0o600
        assert mode_of(journal_file.with_name("journal.db-wal")) == 0o600


async def test_journal_off_records_nothing_and_resume_says_why(fake_runtime, journal_file: Path) -> None:
    rt, _ = fake_runtime(FAN.replace("models:", "runtime: {journal: off}\nmodels:"),
                         assistant=FakeGenerateEngine(fan_reply))
    async with rt:
        await rt.run("fan", topic="otters")
        assert rt.journal is None
        with pytest.raises(JournalError, match=r"runtime\.journal is off"):
            await rt.resume("abc")
    assert not exists(journal_file)


async def test_a_journal_path_in_the_file_is_relative_to_the_file(fake_runtime, tmp_path: Path) -> None:
    rt, _ = fake_runtime(FAN.replace("models:", "runtime: {journal: runs/j.db}\nmodels:"),
                         assistant=FakeGenerateEngine(fan_reply))
    async with rt:
        result = await rt.run("fan", topic="otters")
    assert load_run(tmp_path / "runs" / "j.db", result.run_id).run.status == "finished"


# ---------------------------------------------------------------------------------------------
# Resume


async def test_resume_reuses_finished_stages_and_items_and_calls_only_the_rest(fake_runtime,
                                                                              journal_file: Path) -> None:
    first = GatedEngine(fan_reply, containing("Answer q2"))
    rt, _ = fake_runtime(FAN, assistant=first)
    async with rt:
        run_id = await interrupt(rt, first, "fan", topic="otters")
    assert load_run(journal_file, run_id).run.status == "cancelled"
    assert len(first.calls) == 3  # plan, q0, q1 finished; q2 was cut off before the engine
    shown = describe_run(load_run(journal_file, run_id))
    assert [(s["stage"], s["status"], s["items"]) for s in shown["stages"]] == [
        ("plan", "ok", 0), ("each", "unfinished", 2), ("summary", "pending", 0)]
    assert "summary - pending - - 0 0 0 0".split() in [line.split() for line in format_run(shown).splitlines()]

    second = FakeGenerateEngine(fan_reply)
    rt, _ = fake_runtime(FAN, assistant=second)
    async with rt:
        result = await rt.resume(run_id)

    assert [c.prompt.split()[-2] for c in second.calls] == ["q2", "q3", "answers"]  # only what had not finished
    assert result.run_id == run_id
    assert [item["text"] for item in result.stages["each"]["items"]] == ["re q0", "re q1", "re q2", "re q3"]
    run = load_run(journal_file, run_id).run
    assert (run.status, run.attempts, run.output) == ("finished", 2, result.output)


async def test_resume_of_an_agent_reads_finished_steps_and_tool_calls_from_the_journal(
        fake_runtime, agent_files: Path, journal_file: Path) -> None:
    def helper_second_step(prompt: str) -> bool:  # the helper's prompts hold the task the boss gave it
        return "find otters" in prompt and prompt.count("<assistant>") == 2

    first = GatedEngine(agent_reply, helper_second_step)
    rt, _ = fake_runtime(AGENT_SPEC, assistant=first)
    async with rt:
        run_id = await interrupt(rt, first, "work", question="What do otters do?")
    assert looked_up(agent_files) == ["otter"]  # the helper's lookup ran once before the crash
    assert len(first.calls) == 2  # the boss's first step and the helper's first step

    second = FakeGenerateEngine(agent_reply)
    rt, _ = fake_runtime(AGENT_SPEC, assistant=second)
    async with rt:
        result = await rt.resume(run_id)

    assert result.output == "Boss says: otters hold hands"
    assert looked_up(agent_files) == ["otter"]  # the finished tool call was not made again
    assert len(second.calls) == 2  # the helper's answer and the boss's answer; nothing finished was repeated
    assert all(c.prompt.count("<assistant>") == 2 for c in second.calls)
    transcript = result.stages["report"]["transcript"]
    assert transcript[0]["calls"][0]["sub"]["answer"] == "they hold hands"


async def test_resume_refuses_a_changed_pipeline_file_unless_forced(tmp_path: Path, journal_file: Path) -> None:
    path = tmp_path / "fan.yaml"
    path.write_text(FAN)
    first = GatedEngine(fan_reply, containing("Answer q1"))

    async def engines(name: str, spec: Any) -> Any:
        return first

    async with Runtime.from_file(path, engines=engines) as rt:
        run_id = await interrupt(rt, first, "fan", topic="otters")
    assert load_run(journal_file, run_id).run.spec_file == str(path.absolute())

    path.write_text(FAN.replace("Sum up", "Summarise"))
    second = FakeGenerateEngine(fan_reply)

    async def engines2(name: str, spec: Any) -> Any:
        return second

    async with Runtime.from_file(path, engines=engines2) as rt:
        with pytest.raises(ResumeError, match=r"started with a different version of .*fan\.yaml .*force"):
            await rt.resume(run_id)
        assert second.calls == []
        result = await rt.resume(run_id, force=True)
    assert result.stages["summary"]["text"] == "re answers"
    assert "Summarise" in second.calls[-1].prompt  # the rest ran with the file as it is now


async def test_resume_refuses_a_finished_run_and_an_unknown_one(fake_runtime) -> None:
    rt, _ = fake_runtime(FAN, assistant=FakeGenerateEngine(fan_reply))
    async with rt:
        result = await rt.run("fan", topic="otters")
        await anyio.sleep(0.05)  # let the writer commit the run's end
        with pytest.raises(ResumeError, match=f"run '{result.run_id}' already finished"):
            await rt.resume(result.run_id)
        with pytest.raises(UnknownRunError, match="no run 'nope' in the journal"):
            await rt.resume("nope")


async def test_a_run_still_running_in_this_process_is_never_resumed(fake_runtime) -> None:
    engine = GatedEngine(fan_reply, containing("Answer q1"))
    rt, _ = fake_runtime(FAN, assistant=engine)
    async with rt, anyio.create_task_group() as tg:
        tg.start_soon(lambda: rt.run("fan", topic="otters"))
        await engine.reached.wait()
        run_id = (await rt.journal.runs(limit=1))[0].run_id  # type: ignore[union-attr]
        with pytest.raises(ResumeError, match=f"run '{run_id}' is still running .*gone$"):
            await rt.resume(run_id, force=True)
        engine.opened.set()
    assert len(engine.calls) == 6


async def test_resume_continues_a_run_that_failed(fake_runtime) -> None:
    failing = True

    def reply(prompt: str, options: SamplingOptions) -> str:
        if failing and "q3" in prompt:
            raise RuntimeError("engine hiccup")
        return fan_reply(prompt, options)

    engine = FakeGenerateEngine(reply)
    rt, _ = fake_runtime(FAN, assistant=engine)
    async with rt:
        with pytest.raises(StageError):
            await rt.run("fan", topic="otters")
        run_id = (await rt.journal.runs())[0].run_id  # type: ignore[union-attr]
        failing = False
        before = len(engine.calls)
        result = await rt.resume(run_id)
    assert [c.prompt.split()[-2] for c in engine.calls[before:]] == ["q3", "answers"]
    assert result.output == "re answers"


# ---------------------------------------------------------------------------------------------
# Replay


async def test_replay_of_a_rag_run_gives_the_same_output_with_no_engine_loaded(fake_runtime, make_spec, docs: Path,
                                                                               journal_file: Path) -> None:
    rt, _ = fake_runtime(RAG, assistant=FakeGenerateEngine("They hold hands."))
    async with rt:
        recorded = await rt.run("ask", question="why do otters hold hands?")

    async with Runtime(make_spec(RAG), offline=True) as offline:
        replayed = await offline.replay(recorded.run_id)
        assert offline.ps() == []
        assert all(m.loads == 0 and m.requests == 0 for m in offline.pool.metrics.values())
    assert replayed.output == recorded.output
    assert replayed.stages["passages"] == recorded.stages["passages"]
    assert load_run(journal_file, recorded.run_id).run.attempts == 1  # a replay records nothing


async def test_replay_of_an_agent_run_calls_no_model_and_no_tool(fake_runtime, make_spec, agent_files: Path) -> None:
    rt, _ = fake_runtime(AGENT_SPEC, assistant=FakeGenerateEngine(agent_reply))
    async with rt:
        recorded = await rt.run("work", question="What do otters do?")
    assert looked_up(agent_files) == ["otter"]

    async with Runtime(make_spec(AGENT_SPEC), offline=True) as offline:
        replayed = await offline.replay(recorded.run_id)
        assert all(m.loads == 0 for m in offline.pool.metrics.values())
    assert replayed.output == recorded.output == "Boss says: otters hold hands"
    assert looked_up(agent_files) == ["otter"]  # the tool's recorded result was used
    assert replayed.stages["report"]["run_id"] == recorded.stages["report"]["run_id"]
    assert replayed.stages["report"]["transcript"][0]["calls"][0]["sub"]["transcript"][0]["calls"][0]["result"] == \
        "notes on otter: they hold hands"


async def test_replay_renders_the_templates_as_the_file_says_now(fake_runtime, make_spec) -> None:
    rt, _ = fake_runtime(FAN, assistant=FakeGenerateEngine(fan_reply))
    async with rt:
        recorded = await rt.run("fan", topic="otters")

    changed = FAN.replace('output: "{{ stages.summary.text }}"', 'output: "{{ stages.summary.text | upper }}"')
    async with Runtime(make_spec(changed), offline=True) as offline:
        replayed = await offline.replay(recorded.run_id)
    assert (recorded.output, replayed.output) == ("re answers", "RE ANSWERS")


async def test_replay_of_a_call_the_recording_does_not_have_is_a_clear_error(fake_runtime, make_spec) -> None:
    rt, _ = fake_runtime(FAN, assistant=FakeGenerateEngine(fan_reply))
    async with rt:
        recorded = await rt.run("fan", topic="otters")

    more = FAN.replace("      summary:", "      extra: {kind: reason, model: assistant, prompt: hi}\n      summary:")
    async with Runtime(make_spec(more), offline=True) as offline:
        with pytest.raises(StageError) as caught:
            await offline.replay(recorded.run_id)
    assert isinstance(caught.value.cause, ReplayError)
    assert f"run '{recorded.run_id}' has no recorded model call at stage:extra/model" in str(caught.value)


async def test_an_offline_runtime_refuses_to_load_a_model(make_spec) -> None:
    async with Runtime(make_spec(FAN), offline=True) as offline:
        with pytest.raises(StageError, match=r"offline .* loads no model; model 'assistant' was asked for"):
            await offline.run("fan", topic="otters")


# ---------------------------------------------------------------------------------------------
# The call cache


CACHED = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  ask:
    inputs: {question: str, tokens: {type: int, default: 16}}
    stages:
      answer:
        kind: reason
        model: assistant
        prompt: "Q: {{ inputs.question }}"
        max_tokens: 16
        cache: true
    output: "{{ stages.answer.text }}"
"""


async def test_a_cache_hit_skips_the_engine_and_says_so(fake_runtime, journal_file: Path) -> None:
    engine = FakeGenerateEngine("Lava.")
    rt, _ = fake_runtime(CACHED, assistant=engine)
    async with rt:
        first = await rt.run("ask", question="What is lava?")
        second = await rt.run("ask", question="What is lava?")
        metrics = ServerMetrics(rt).render().decode()

    assert len(engine.calls) == 1
    assert (first.stages["answer"]["cached"], second.stages["answer"]["cached"]) == (False, True)
    assert second.output == first.output == "Lava."
    assert second.stages["answer"]["completion_tokens"] == first.stages["answer"]["completion_tokens"]
    assert rt.cache_counts["assistant"].hits == 1 and rt.cache_counts["assistant"].misses == 1
    assert 'multilane_cache_hits_total{model="assistant"} 1.0' in metrics
    assert 'multilane_cache_misses_total{model="assistant"} 1.0' in metrics
    shown = describe_run(load_run(journal_file, second.run_id))
    assert (shown["model_calls"], shown["cached_calls"]) == (1, 1)


async def test_identical_calls_at_the_same_time_reach_the_engine_once(fake_runtime) -> None:
    engine = FakeGenerateEngine("Lava is molten rock.", token_delay=0.01)
    rt, _ = fake_runtime(CACHED, assistant=engine)
    async with rt:
        results = await _gather([lambda: rt.run("ask", question="What is lava?") for _ in range(3)])
    assert len(engine.calls) == 1
    assert sorted(r.stages["answer"]["cached"] for r in results) == [False, True, True]
    assert {r.output for r in results} == {"Lava is molten rock."}


async def test_a_changed_prompt_or_option_misses_the_cache(fake_runtime) -> None:
    engine = FakeGenerateEngine("Lava.")
    rt, _ = fake_runtime(CACHED + """
  longer:
    inputs: {question: str}
    stages:
      answer: {kind: reason, model: assistant, prompt: "Q: {{ inputs.question }}", max_tokens: 17, cache: true}
""", assistant=engine)
    async with rt:
        await rt.run("ask", question="What is lava?")
        changed_prompt = await rt.run("ask", question="What is magma?")
        changed_option = await rt.run("longer", question="What is lava?")

    assert len(engine.calls) == 3
    assert not changed_prompt.stages["answer"]["cached"] and not changed_option.stages["answer"]["cached"]
    assert rt.cache_counts["assistant"].misses == 3


async def test_a_sampled_call_is_cached_only_with_a_fixed_seed(fake_runtime) -> None:
    engine = FakeGenerateEngine("Lava.")
    sampled = CACHED.replace("max_tokens: 16", "max_tokens: 16\n        temperature: 0.8")
    seeded = sampled.replace("  ask:", "  seeded:").replace("temperature: 0.8", "temperature: 0.8\n        seed: 7")
    rt, _ = fake_runtime(sampled + seeded.split("pipelines:\n")[1], assistant=engine)
    async with rt:
        await rt.run("ask", question="What is lava?")
        again = await rt.run("ask", question="What is lava?")
        assert len(engine.calls) == 2 and not again.stages["answer"]["cached"]
        assert "assistant" not in rt.cache_counts  # not even looked up
        await rt.run("seeded", question="What is lava?")
        fixed = await rt.run("seeded", question="What is lava?")
    assert len(engine.calls) == 3 and fixed.stages["answer"]["cached"]
    assert engine.calls[-1].options.seed == 7


async def test_a_model_with_cache_true_caches_its_agent_calls(fake_runtime, agent_files: Path) -> None:
    engine = FakeGenerateEngine(agent_reply)
    rt, _ = fake_runtime(AGENT_SPEC.replace("./assistant}", "./assistant, cache: true}"), assistant=engine)
    async with rt:
        first = await rt.run("work", question="What do otters do?")
        second = await rt.run("work", question="What do otters do?")

    assert len(engine.calls) == 4  # the second run's four model calls all came from the cache
    assert first.output == second.output
    assert all(step["cached"] for step in second.stages["report"]["transcript"])
    assert looked_up(agent_files) == ["otter", "otter"]  # tools are not cached: only model calls are


async def test_a_standalone_agent_run_uses_the_cache_but_is_not_journaled(fake_runtime, agent_files: Path) -> None:
    engine = FakeGenerateEngine(agent_reply)
    rt, _ = fake_runtime(AGENT_SPEC.replace("./assistant}", "./assistant, cache: true}"), assistant=engine)
    async with rt:
        first = await rt.run_agent("boss", "What do otters do?")
        second = await rt.run_agent("boss", "What do otters do?")
        assert rt.journal is not None and await rt.journal.runs() == []
    assert len(engine.calls) == 4 and first.answer == second.answer
    assert [s.cached for s in second.steps] == [True, True]


async def test_the_cache_outlasts_the_runtime_through_the_journal(fake_runtime) -> None:
    engine = FakeGenerateEngine("Lava.")
    rt, _ = fake_runtime(CACHED, assistant=engine)
    async with rt:
        await rt.run("ask", question="What is lava?")
    other = FakeGenerateEngine("Something else.")
    rt, factory = fake_runtime(CACHED, assistant=other)
    async with rt:
        again = await rt.run("ask", question="What is lava?")
    assert other.calls == [] and factory.loads["assistant"] == 0
    assert again.output == "Lava." and again.stages["answer"]["cached"]


async def test_a_streamed_cache_hit_sends_its_text_as_one_token_event(fake_runtime) -> None:
    rt, _ = fake_runtime(CACHED, assistant=FakeGenerateEngine("Lava is hot."))
    async with rt:
        await rt.run("ask", question="What is lava?")
        async with rt.stream("ask", question="What is lava?") as events:
            tokens = [e.data["text"] async for e in events if e.type == "token"]
    assert tokens == ["Lava is hot."]


# ---------------------------------------------------------------------------------------------
# A journal that cannot be written


async def test_a_journal_that_cannot_be_opened_logs_once_and_runs_go_on(fake_runtime, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    spec = FAN.replace("models:", f"runtime: {{journal: {tmp_path / 'a-file' / 'j.db'}}}\nmodels:")
    rt, _ = fake_runtime(spec, assistant=FakeGenerateEngine(fan_reply))
    with structlog.testing.capture_logs() as logs:
        async with rt:
            results = [await rt.run("fan", topic=f"t{i}") for i in range(2)]
    assert [r.output for r in results] == ["re answers"] * 2
    failures = [e for e in logs if e["event"].startswith("journal write failed")]
    assert len(failures) == 1 and "cannot open the journal at" in failures[0]["error"]


async def test_a_durable_runtime_refuses_to_start_without_its_journal(fake_runtime, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    spec = FAN.replace("models:", f"runtime: {{journal: {tmp_path / 'a-file' / 'j.db'}, durable: true}}\nmodels:")
    rt, _ = fake_runtime(spec, assistant=FakeGenerateEngine(fan_reply))
    with pytest.raises(JournalError, match=r"cannot open the journal at .*set runtime\.durable: false"):
        async with rt:
            pass


def write_version(path: Path, version: int) -> None:
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {version}")


async def test_a_journal_of_another_layout_is_refused_naming_its_version(fake_runtime, journal_file: Path) -> None:
    write_version(journal_file, 7)
    rt, _ = fake_runtime(FAN.replace("models:", "runtime: {durable: true}\nmodels:"))
    with pytest.raises(JournalError, match=r"layout of journal version 7, and this multilane writes version 1; "
                                           r"move it away"):
        async with rt:
            pass


def _disk_full(self: StepDone, db: sqlite3.Connection) -> None:
    raise sqlite3.OperationalError("database or disk is full")


async def test_writes_that_fail_mid_run_are_logged_once_and_the_run_goes_on(fake_runtime,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StepDone, "apply", _disk_full)
    rt, _ = fake_runtime(FAN, assistant=FakeGenerateEngine(fan_reply))
    with structlog.testing.capture_logs() as logs:
        async with rt:
            result = await rt.run("fan", topic="otters")
            await anyio.sleep(0.05)
            assert rt.journal is not None and rt.journal.failures == 13  # every step: 6 calls, 4 items, 3 stages
    assert result.output == "re answers"
    failures = [e for e in logs if e["event"].startswith("journal write failed")]
    assert len(failures) == 1 and "database or disk is full" in failures[0]["error"]
    assert [e["event"] for e in logs if e["event"] == "journal writes again"] == ["journal writes again"]  # run end


async def test_a_durable_run_fails_when_its_journal_cannot_be_written(fake_runtime,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StepDone, "apply", _disk_full)
    engine = FakeGenerateEngine(fan_reply)
    rt, _ = fake_runtime(FAN.replace("models:", "runtime: {durable: true}\nmodels:"), assistant=engine)
    async with rt:
        with pytest.raises(StageError, match=r"cannot write the journal at .*disk is full.*durable is true"):
            await rt.run("fan", topic="otters")
    assert len(engine.calls) == 1  # the plan's record failed, so nothing after it ran


async def test_a_durable_journal_has_each_step_committed_before_the_next_starts(fake_runtime,
                                                                               journal_file: Path) -> None:
    seen: list[list[str]] = []

    def reply(prompt: str, options: SamplingOptions) -> str:
        if journal_file.exists():
            with sqlite3.connect(journal_file) as db:
                seen.append([row[0] for row in db.execute("SELECT path FROM steps ORDER BY finished_at")])
        return fan_reply(prompt, options)

    rt, _ = fake_runtime(FAN.replace("models:", "runtime: {durable: true}\nmodels:"),
                         assistant=FakeGenerateEngine(reply))
    async with rt:
        await rt.run("fan", topic="otters")
    assert seen[1] == ["stage:plan/model", "stage:plan"]  # the first item's call came after the plan was committed
    assert seen[-1][-2:] == ["stage:each/item:3", "stage:each"]
