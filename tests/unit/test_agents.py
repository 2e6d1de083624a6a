"""Agents on the fake engine: tool schemas, the step loop, failures fed back, sub-agents, loading, the agent stage."""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from pydantic import BaseModel, Field, field_validator

from multilane import (
    Agent,
    AgentContext,
    AgentResult,
    AgentStepLimitError,
    OutputValidationError,
    SamplingOptions,
    SpecError,
    StageError,
    Tool,
    UnknownNameError,
    tool,
)
from multilane.testing import FakeGenerateEngine
from multilane.tools import calculator, safe_eval, search_tool

pytestmark = pytest.mark.anyio

MODEL = """
models:
  assistant: {kind: generate, source: ./assistant}
"""

WITH_INDEX = """
models:
  embedder: {kind: embedding, source: ./embedder}
  assistant: {kind: generate, source: ./assistant}
indexes:
  docs: {embedder: embedder, documents: "docs/*.md", chunk_tokens: 32, chunk_overlap: 4}
"""


def step_of(prompt: str) -> int:
    """The fake engine renders each turn as `<role>...`; a prompt ends with one open `<assistant>` per step."""
    return prompt.count("<assistant>")


def script(*replies: Any) -> Callable[[str, SamplingOptions], str]:
    """A reply callable answering step n with replies[n-1] (JSON-encoded unless a string)."""

    def reply(prompt: str, options: SamplingOptions) -> str:
        value = replies[min(step_of(prompt), len(replies)) - 1]
        return value if isinstance(value, str) else json.dumps(value)

    return reply


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Box(BaseModel):
    width: int = Field(description="in cm")
    label: str = "box"


@tool
def paint(box: Box, color: Color = Color.RED, coats: Annotated[int, Field(ge=1, le=3)] = 1,
          note: str = Field(default="", description="free text")) -> str:
    """Paint a box.

    Args:
        box: the box to paint.
        color: which paint
            to use (two lines).
    """
    return f"{box.label} {box.width}cm painted {color.value} x{coats}"


class Even(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def _even(cls, n: int) -> int:
        if n % 2:
            raise ValueError("n must be even")
        return n


@tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


# --- tool schemas ---------------------------------------------------------------------------------


def test_tool_schema_comes_from_signature_docstring_and_fields() -> None:
    schema = paint.parameters
    assert paint.name == "paint" and paint.description == "Paint a box."
    assert schema["required"] == ["box"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["box"]["type"] == "object"  # a nested model, inlined rather than referenced
    assert props["box"]["properties"]["width"] == {"description": "in cm", "type": "integer"}
    assert props["box"]["description"] == "the box to paint."
    assert props["color"]["enum"] == ["red", "blue"] and props["color"]["default"] == "red"
    assert props["color"]["description"] == "which paint to use (two lines)."
    assert (props["coats"]["minimum"], props["coats"]["maximum"], props["coats"]["default"]) == (1, 3, 1)
    assert props["note"]["description"] == "free text"
    assert "$ref" not in json.dumps(schema) and "$defs" not in schema and "title" not in schema


def test_numpy_and_rest_docstrings_describe_arguments_as_google_style_does() -> None:
    def numpy_style(box: Box, color: Color = Color.RED) -> str:
        """Paint a box.

        Parameters
        ----------
        box : Box
            the box to paint.
        color : Color, optional
            which paint
            to use (two lines).
        """
        return ""

    def rest_style(box: Box, color: Color = Color.RED) -> str:
        """Paint a box.

        :param box: the box to paint.
        :param color: which paint
            to use (two lines).
        :returns: what was painted.
        """
        return ""

    for fn in (numpy_style, rest_style):
        made = tool(fn)
        props = made.parameters["properties"]
        assert made.description == "Paint a box."
        assert props["box"]["description"] == paint.parameters["properties"]["box"]["description"]
        assert props["color"]["description"] == "which paint to use (two lines)."


def test_a_longer_docstring_is_all_description_until_its_sections() -> None:
    def shelve(book: str) -> str:
        """Put a book away.

        It goes on the shelf by
        its author's name.

        Args:
            book: the title.

        Returns:
            where it went.
        """
        return ""

    made = tool(shelve)
    assert made.description == "Put a book away. It goes on the shelf by its author's name."
    assert made.parameters["properties"]["book"]["description"] == "the title."


def test_context_parameter_is_injected_not_described() -> None:
    @tool(name="whoami", description="Say which agent runs.")
    async def who(ctx: AgentContext, shout: bool = False) -> str:
        return ctx.agent.name.upper() if shout else ctx.agent.name

    assert who.name == "whoami" and who.description == "Say which agent runs."
    assert list(who.parameters["properties"]) == ["shout"]


def test_unannotated_parameters_and_var_args_are_refused() -> None:
    def bare(x):  # type: ignore[no-untyped-def]
        return x

    def star(*xs: int) -> int:
        return sum(xs)

    with pytest.raises(TypeError, match="annotate parameter 'x'"):
        tool(bare)
    with pytest.raises(TypeError, match=r"\*args"):
        tool(star)


def test_system_prompt_is_short_and_lists_each_tool_on_one_line() -> None:
    agent = Agent("painter", "assistant", "You paint boxes.", [paint, add])
    prompt = agent.system_prompt()
    assert prompt.splitlines()[0] == "You paint boxes."
    assert "- add(a: int, b: int): Add two numbers." in prompt
    assert '- paint(box: {width: int, label?: str}, color: "red"|"blue" = "red"' in prompt
    assert len(prompt) < 600


def test_step_schema_allows_exactly_a_valid_call_or_an_answer() -> None:
    import jsonschema

    agent = Agent("painter", "assistant", "", [paint, add], parallel_calls=2)
    schema = agent.step_schema(first=True, tools=agent.tools, may_call=True)

    def ok(value: Any) -> bool:
        return jsonschema.Draft202012Validator(schema).is_valid(value)

    assert ok({"tool": "add", "arguments": {"a": 1, "b": 2}})
    assert ok({"calls": [{"tool": "add", "arguments": {"a": 1, "b": 2}},
                         {"tool": "paint", "arguments": {"box": {"width": 3}}}]})
    assert ok({"answer": "done"})
    assert not ok({"tool": "add", "arguments": {"a": "one", "b": 2}})
    assert not ok({"tool": "erase", "arguments": {}})
    assert not ok({"tool": "add", "arguments": {"a": 1, "b": 2}, "answer": "x"})
    assert not ok({"calls": [{"tool": "add", "arguments": {"a": 1, "b": 2}}] * 3})  # more than parallel_calls


# --- the loop -------------------------------------------------------------------------------------


async def test_agent_calls_a_tool_then_ends_on_its_answer(fake_runtime) -> None:
    engine = FakeGenerateEngine(script({"tool": "add", "arguments": {"a": 2, "b": 3}}, {"answer": "It is 5."}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    agent = Agent("adder", "assistant", "You add numbers.", [add])
    async with rt:
        result = await rt.run_agent(agent, "What is 2 + 3?")

    assert isinstance(result, AgentResult)
    assert result.answer == "It is 5."
    assert [s.kind for s in result.steps] == ["calls", "answer"]
    call = result.steps[0].calls[0]
    assert (call.tool, call.arguments, call.result, call.ok) == ("add", {"a": 2, "b": 3}, "5", True)
    assert "add returned:\n5" in engine.calls[1].prompt  # the result went back into the conversation
    assert engine.calls[0].options.json_schema is not None  # every step is constrained
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert result.steps[0].started <= call.started <= call.finished <= result.steps[0].finished
    data = result.to_dict()
    assert data["answer"] == "It is 5." and data["steps"] == 2 and data["transcript"][0]["calls"][0]["tool"] == "add"
    json.dumps(data)


async def test_agent_that_never_answers_stops_at_max_steps_with_its_transcript(fake_runtime) -> None:
    engine = FakeGenerateEngine(script({"tool": "add", "arguments": {"a": 1, "b": 1}}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    agent = Agent("looper", "assistant", "", [add], max_steps=3)
    async with rt:
        with pytest.raises(AgentStepLimitError, match="agent 'looper' took its 3 steps without answering") as info:
            await rt.run_agent(agent, "go")

    transcript = info.value.transcript
    assert isinstance(transcript, AgentResult) and transcript.answer is None
    assert [s.kind for s in transcript.steps] == ["calls"] * 3
    assert len(engine.calls) == 3


async def test_a_failing_tool_feeds_its_error_back_and_is_withdrawn_after_its_retries(fake_runtime) -> None:
    attempts: list[str] = []

    @tool
    def lookup(word: str) -> str:
        """Look a word up."""
        attempts.append(word)
        raise ValueError(f"no entry for {word!r}")

    def reply(prompt: str, options: SamplingOptions) -> str:
        schema = options.json_schema or {}
        if "anyOf" not in schema and "answer" in schema.get("properties", {}):  # the tool is gone: answer
            return json.dumps({"answer": "I could not look it up."})
        return json.dumps({"tool": "lookup", "arguments": {"word": f"w{step_of(prompt)}"}})

    engine = FakeGenerateEngine(reply)
    rt, _ = fake_runtime(MODEL, assistant=engine)
    agent = Agent("reader", "assistant", "", [lookup], tool_retries=2, max_steps=8)
    async with rt:
        result = await rt.run_agent(agent, "define w")

    assert attempts == ["w1", "w2", "w3"]  # first try plus two retries
    assert result.answer == "I could not look it up."
    assert "lookup failed: ValueError: no entry for 'w1'" in engine.calls[1].prompt
    assert "lookup failed too often and is no longer available." in engine.calls[3].prompt
    assert [c.ok for c in result.calls] == [False, False, False]
    assert result.calls[0].error == "ValueError: no entry for 'w1'"


async def test_a_result_json_cannot_show_reaches_the_model_as_its_repr(fake_runtime) -> None:
    @tool
    def pairs() -> dict[tuple[int, int], str]:
        """Name some pairs."""
        return {(1, 2): "near", (1, 9): "far"}  # json.dumps refuses tuple keys

    engine = FakeGenerateEngine(script({"tool": "pairs", "arguments": {}}, {"answer": "done"}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    async with rt:
        result = await rt.run_agent(Agent("pairer", "assistant", "", [pairs]), "name pairs")

    assert result.answer == "done"
    assert result.calls[0].ok and result.calls[0].result == "{(1, 2): 'near', (1, 9): 'far'}"
    assert "pairs returned:\n{(1, 2): 'near', (1, 9): 'far'}" in engine.calls[1].prompt


async def test_a_result_that_cannot_be_shown_at_all_is_a_tool_error_not_a_crash(fake_runtime) -> None:
    class Opaque:
        def __repr__(self) -> str:
            raise RuntimeError("no view of me")

    @tool
    def grab() -> Any:
        """Grab a thing."""
        return {"thing": Opaque()}

    engine = FakeGenerateEngine(script({"tool": "grab", "arguments": {}}, {"answer": "gave up"}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    async with rt:
        result = await rt.run_agent(Agent("grabber", "assistant", "", [grab]), "grab it")

    assert result.answer == "gave up"
    assert not result.calls[0].ok
    assert result.calls[0].error == "its result cannot be shown: RuntimeError: no view of me"
    assert "grab failed: its result cannot be shown: RuntimeError: no view of me" in engine.calls[1].prompt


async def test_an_unknown_tool_from_the_engine_is_rejected_clearly(fake_runtime) -> None:
    engine = FakeGenerateEngine(script({"tool": "rm_rf", "arguments": {}}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    async with rt:
        with pytest.raises(OutputValidationError,
                           match=r"agent 'adder' step 1: unknown tool 'rm_rf' \(tools now: add\)"):
            await rt.run_agent(Agent("adder", "assistant", "", [add]), "go")


async def test_arguments_that_break_the_schema_are_rejected_before_the_tool_runs(fake_runtime) -> None:
    called: list[int] = []

    @tool
    def double(n: int) -> int:
        """Double n."""
        called.append(n)
        return 2 * n

    engine = FakeGenerateEngine(script({"tool": "double", "arguments": {"n": "seven"}}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    async with rt:
        with pytest.raises(OutputValidationError, match="does not match the step schema"):
            await rt.run_agent(Agent("doubler", "assistant", "", [double]), "double seven")
    assert called == []


async def test_output_that_is_not_json_is_rejected_clearly(fake_runtime) -> None:
    rt, _ = fake_runtime(MODEL, assistant=FakeGenerateEngine(lambda prompt, options: "sure, I will call add"))
    async with rt:
        with pytest.raises(OutputValidationError, match="agent 'adder' step 1: model output is not valid JSON"):
            await rt.run_agent(Agent("adder", "assistant", "", [add]), "go")


async def test_arguments_a_validator_refuses_go_back_to_the_model_uncalled(fake_runtime) -> None:
    called: list[int] = []

    @tool
    def halve(value: Even) -> int:
        """Halve an even number."""
        called.append(value.n)
        return value.n // 2

    engine = FakeGenerateEngine(script({"tool": "halve", "arguments": {"value": {"n": 3}}},
                                       {"tool": "halve", "arguments": {"value": {"n": 4}}}, {"answer": "2"}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    async with rt:
        result = await rt.run_agent(Agent("halver", "assistant", "", [halve]), "halve")

    assert called == [4]
    assert "halve failed: invalid arguments: value.n: Value error, n must be even" in engine.calls[1].prompt
    assert result.answer == "2"


async def test_sync_tools_run_in_worker_threads_and_async_tools_on_the_loop(fake_runtime) -> None:
    threads: dict[str, int] = {}

    @tool
    def sync_probe() -> str:
        """Record the thread."""
        threads["sync"] = threading.get_ident()
        return "ok"

    @tool
    async def async_probe() -> str:
        """Record the thread."""
        threads["async"] = threading.get_ident()
        return "ok"

    engine = FakeGenerateEngine(script({"calls": [{"tool": "sync_probe", "arguments": {}},
                                                  {"tool": "async_probe", "arguments": {}}]}, {"answer": "done"}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    async with rt:
        await rt.run_agent(Agent("prober", "assistant", "", [sync_probe, async_probe], parallel_calls=2), "probe")

    assert threads["async"] == threading.get_ident()
    assert threads["sync"] != threading.get_ident()


async def test_output_type_constrains_and_validates_the_answer(fake_runtime) -> None:
    class Verdict(BaseModel):
        city: str
        confidence: Annotated[float, Field(ge=0, le=1)]

    engine = FakeGenerateEngine(script({"answer": {"city": "Delft", "confidence": 0.9}}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    agent = Agent("judge", "assistant", "Name the city.", [], output_type=Verdict)
    async with rt:
        result = await rt.run_agent(agent, "Which city?")

    assert result.answer == Verdict(city="Delft", confidence=0.9)
    assert result.to_dict()["answer"] == {"city": "Delft", "confidence": 0.9}
    answer_schema = engine.calls[0].options.json_schema["properties"]["answer"]  # type: ignore[index]
    assert answer_schema["properties"]["confidence"]["maximum"] == 1


async def test_first_step_calls_and_max_tool_steps_force_search_then_answer(fake_runtime) -> None:
    engine = FakeGenerateEngine()  # answers whatever the schema allows first
    rt, _ = fake_runtime(MODEL, assistant=engine)
    agent = Agent("forced", "assistant", "", [add], first_step_calls=1, max_tool_steps=1)
    async with rt:
        result = await rt.run_agent(agent, "add")

    first, second = (c.options.json_schema for c in engine.calls)
    assert first is not None and second is not None
    assert first["properties"]["tool"] == {"const": "add"}  # only a call is allowed at first
    assert list(second["properties"]) == ["answer"]  # only an answer after one tool step
    assert [s.kind for s in result.steps] == ["calls", "answer"]
    assert "Now give your answer." in engine.calls[1].prompt


# --- multi-agent ----------------------------------------------------------------------------------


async def test_sub_agents_called_in_one_step_run_concurrently_in_the_shared_lane(fake_runtime) -> None:
    def reply(prompt: str, options: SamplingOptions) -> str:
        if "You delegate." in prompt:
            if step_of(prompt) == 1:
                return json.dumps({"calls": [{"tool": "helper", "arguments": {"task": f"part {i}"}}
                                             for i in range(3)]})
            return json.dumps({"answer": "combined"})
        return json.dumps({"answer": "part done " + "word " * 10})

    engine = FakeGenerateEngine(reply, token_delay=0.01)
    rt, _ = fake_runtime(MODEL, assistant=engine)
    helper = Agent("helper", "assistant", "You help.")
    boss = Agent("boss", "assistant", "You delegate.", [helper], parallel_calls=3)
    async with rt:
        result = await rt.run_agent(boss, "do it")

    calls = result.steps[0].calls
    assert [c.tool for c in calls] == ["helper"] * 3
    assert [c.sub.task for c in calls if c.sub] == ["part 0", "part 1", "part 2"]
    assert all(c.result.startswith("part done") for c in calls)
    latest_start = max(c.started for c in calls)
    earliest_end = min(c.finished for c in calls)
    assert latest_start < earliest_end  # all three were running at once
    helper_calls = [c for c in engine.calls if "You help." in c.prompt]
    assert max(c.started for c in helper_calls) < min(c.finished or 0 for c in helper_calls)  # batched in the lane
    assert result.to_dict()["transcript"][0]["calls"][0]["sub"]["agent"] == "helper"


async def test_a_failing_sub_agent_is_fed_back_to_its_supervisor(fake_runtime) -> None:
    def reply(prompt: str, options: SamplingOptions) -> str:
        if "You delegate." in prompt:
            return json.dumps({"tool": "worker", "arguments": {"task": "x"}} if step_of(prompt) == 1
                              else {"answer": "the worker failed"})
        return "not json"

    engine = FakeGenerateEngine(reply)
    rt, _ = fake_runtime(MODEL, assistant=engine)
    boss = Agent("boss", "assistant", "You delegate.", [Agent("worker", "assistant", "Work.")])
    async with rt:
        result = await rt.run_agent(boss, "go")

    assert result.answer == "the worker failed"
    assert result.calls[0].ok is False
    error = result.calls[0].error or ""
    assert "OutputValidationError: agent 'worker' step 1: model output is not valid JSON" in error


# --- shared prefixes and priority -----------------------------------------------------------------


async def test_each_step_extends_the_previous_prompt_and_reports_the_tokens_read_from_the_prefix_cache(
        fake_runtime) -> None:
    engine = FakeGenerateEngine(script({"tool": "add", "arguments": {"a": 2, "b": 3}}, {"answer": "It is 5."}),
                                cache_block_size=4)
    rt, _ = fake_runtime(MODEL, assistant=engine)
    async with rt:
        result = await rt.run_agent(Agent("adder", "assistant", "You add numbers.", [add]), "What is 2 + 3?")

    first, second = (call.prompt for call in engine.calls)
    assert second.startswith(first)  # the whole first prompt, then the step's output and the tool's result
    assert result.steps[0].cached_tokens == 0
    assert result.steps[1].cached_tokens == engine.calls[1].cached_tokens > 0
    assert result.steps[1].cached_tokens >= result.steps[0].prompt_tokens - 4  # all but its last partial block
    assert result.cached_tokens == sum(step.cached_tokens for step in result.steps)
    data = result.to_dict()
    assert data["cached_tokens"] == result.cached_tokens
    assert data["transcript"][1]["cached_tokens"] == result.steps[1].cached_tokens
    assert AgentResult.from_dict(data).steps[1].cached_tokens == result.steps[1].cached_tokens


async def test_agents_of_one_definition_send_one_byte_identical_system_message(fake_runtime) -> None:
    def reply(prompt: str, options: SamplingOptions) -> str:
        if "You delegate." in prompt:
            if step_of(prompt) == 1:
                return json.dumps({"calls": [{"tool": "helper", "arguments": {"task": f"part {i}"}}
                                             for i in range(3)]})
            return json.dumps({"answer": "combined"})
        return json.dumps({"tool": "add", "arguments": {"a": 1, "b": 2}} if step_of(prompt) == 1
                          else {"answer": "3"})

    engine = FakeGenerateEngine(reply, cache_block_size=4)
    rt, _ = fake_runtime(MODEL, assistant=engine)
    helper = Agent("helper", "assistant", "You help with sums.", [add], first_step_calls=1)
    boss = Agent("boss", "assistant", "You delegate.", [helper], parallel_calls=3)
    async with rt:
        await rt.run_agent(boss, "do it")
        await rt.run_agent(Agent("helper", "assistant", "You help with sums.", [add], first_step_calls=1), "alone")

    system = helper.system_prompt()
    helper_calls = [call for call in engine.calls if "You help with sums." in call.prompt]
    assert len(helper_calls) == 8  # three sub-agents and one more agent of the same definition, two steps each
    assert all(call.prompt.startswith(f"<system>{system}\n<user>") for call in helper_calls)
    firsts = sorted((call for call in helper_calls if step_of(call.prompt) == 1), key=lambda call: call.started)
    system_tokens = len(engine.encode(f"<system>{system}\n"))
    assert all(call.cached_tokens >= system_tokens - 4 for call in firsts[1:])  # the system message came cached


async def test_an_agent_run_makes_its_calls_and_its_sub_agents_calls_at_its_priority(fake_runtime) -> None:
    def reply(prompt: str, options: SamplingOptions) -> str:
        if "You delegate." in prompt:
            return json.dumps({"tool": "helper", "arguments": {"task": "x"}} if step_of(prompt) == 1
                              else {"answer": "done"})
        return json.dumps({"answer": "helped"})

    engine = FakeGenerateEngine(reply)
    rt, _ = fake_runtime(MODEL, assistant=engine)
    boss = Agent("boss", "assistant", "You delegate.", [Agent("helper", "assistant", "You help.")])
    async with rt:
        await rt.run_agent(boss, "go", priority=7)
        await rt.run_agent(boss, "go")

    assert [call.priority for call in engine.calls] == [7, 7, 7, 0, 0, 0]


# --- built-in tools -------------------------------------------------------------------------------


@pytest.mark.parametrize(("expression", "value"), [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 // 2", 3), ("7 % 4", 3), ("2 ** 10", 1024), ("-3 + +1", -2),
    ("1 / 4", 0.25), ("2.5 * 2", 5.0)])
def test_calculator_works_out_arithmetic(expression: str, value: float) -> None:
    assert safe_eval(expression) == value


@pytest.mark.parametrize(("expression", "message"), [
    ("__import__('os').system('echo hi')", "not Call"),
    ("x + 1", "not Name"),
    ("(1).real", "not Attribute"),
    ("9 ** 9 ** 9", "too large"),
    ("10 ** 400", "too large"),
    ("2 ** 5000", "too large"),
    ("1 / 0", "division by zero"),
    ("[1, 2]", "not List"),
    ("'a' * 3", "not Constant"),
    ("True + 1", "not Constant"),
    ("1 + " * 60 + "1", "longer than"),
    ("lambda: 1", "not Lambda"),
    ("1 +", "not an arithmetic expression"),
])
def test_calculator_refuses_anything_but_bounded_arithmetic(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        safe_eval(expression)


async def test_calculator_is_a_tool_whose_errors_reach_the_model(fake_runtime) -> None:
    engine = FakeGenerateEngine(script({"calls": [{"tool": "calculator", "arguments": {"expression": "6 * 7"}},
                                                  {"tool": "calculator", "arguments": {"expression": "os.name"}}]},
                                       {"answer": "42"}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    async with rt:
        result = await rt.run_agent(Agent("maths", "assistant", "", [calculator], parallel_calls=2), "6*7?")

    assert [c.result for c in result.calls] == [
        "42", "calculator failed: ValueError: only numbers and + - * / // % ** ( ) are allowed, not Attribute"]


async def test_search_tool_returns_passages_of_a_declared_index(fake_runtime, docs: Path) -> None:
    engine = FakeGenerateEngine(script({"tool": "search", "arguments": {"query": "sea otters sleeping"}},
                                       {"answer": "They hold hands."}))
    rt, _ = fake_runtime(WITH_INDEX, assistant=engine)
    agent = Agent("reader", "assistant", "", [search_tool("docs", top_k=1)])
    async with rt:
        result = await rt.run_agent(agent, "Why do otters hold hands?")

    assert result.calls[0].result.startswith("[1] (docs/otters.md) # Otters")
    assert "Sea otters hold hands while sleeping" in engine.calls[1].prompt
    assert search_tool("docs").parameters["properties"]["query"]["maxLength"] == 120


# --- agents from files, in pipelines --------------------------------------------------------------

RESEARCHER = '''
from multilane import Agent, tool


@tool
def shout(text: str) -> str:
    """Shout text."""
    return text.upper()


researcher = Agent("researcher", "assistant", "You research.", [shout])
'''

SUPERVISOR = '''
from multilane import Agent

from .researcher import researcher

supervisor = Agent("supervisor", "assistant", "You supervise.", [researcher], parallel_calls=2)
'''

AGENT_PIPELINE = MODEL + """
pipelines:
  ask:
    inputs: {question: str}
    stages:
      work: {kind: agent, agent: supervisor, task: "Answer: {{ inputs.question }}"}
    output: "{{ stages.work.answer }} ({{ stages.work.steps }} steps)"
"""


@pytest.fixture
def agents_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "agents"
    folder.mkdir()
    (folder / "researcher.py").write_text(RESEARCHER)
    (folder / "supervisor.py").write_text(SUPERVISOR)
    return folder


async def test_agent_stage_runs_a_supervisor_from_the_agents_folder(fake_runtime, agents_dir: Path) -> None:
    def reply(prompt: str, options: SamplingOptions) -> str:
        if "You supervise." in prompt:
            return json.dumps({"tool": "researcher", "arguments": {"task": "look"}} if step_of(prompt) == 1
                              else {"answer": "found it"})
        return json.dumps({"tool": "shout", "arguments": {"text": "hi"}} if step_of(prompt) == 1
                          else {"answer": "HI"})

    rt, _ = fake_runtime(AGENT_PIPELINE, assistant=FakeGenerateEngine(reply))
    assert sorted(rt.spec.agents) == ["researcher", "supervisor"]
    async with rt:
        result = await rt.run("ask", question="what?")
        by_name = await rt.run_agent("researcher", "shout hi")

    assert result.output == "found it (2 steps)"
    work = result.stages["work"]
    assert work["task"] == "Answer: what?"
    sub = work["transcript"][0]["calls"][0]["sub"]
    assert sub["agent"] == "researcher" and sub["transcript"][0]["calls"][0]["result"] == "HI"
    assert by_name.answer == "HI"


async def test_agent_steps_are_streamed_as_events(fake_runtime, agents_dir: Path) -> None:
    rt, _ = fake_runtime(AGENT_PIPELINE.replace("agent: supervisor", "agent: researcher"),
                         assistant=FakeGenerateEngine(script({"answer": "ok"})))
    async with rt, rt.stream("ask", question="q") as events:
        seen = [e async for e in events]
    steps = [e for e in seen if e.type == "agent_step"]
    assert len(steps) == 1 and steps[0].data["step"]["answer"] == "ok" and steps[0].stage == "work"


async def test_run_agent_names_the_known_agents_when_the_name_is_wrong(fake_runtime, agents_dir: Path) -> None:
    rt, _ = fake_runtime(MODEL)
    async with rt:
        with pytest.raises(UnknownNameError, match=r"unknown agent 'reseacher' \(agents: researcher, supervisor\)"):
            await rt.run_agent("reseacher", "x")


async def test_an_agent_defined_in_a_script_is_checked_against_the_file_before_it_runs(fake_runtime) -> None:
    engine = FakeGenerateEngine(script({"tool": "search", "arguments": {"query": "lava"}}, {"answer": "made up"}))
    rt, _ = fake_runtime(WITH_INDEX, assistant=engine)
    typo_index = Agent("clerk", "assistant", "", [search_tool(index="dcos")])
    typo_model = Agent("boss", "assistant", "", [Agent("helper", "asistant", "").as_tool()])
    async with rt:
        with pytest.raises(UnknownNameError, match=r"agent 'clerk' \(.*\) tool 'search' searches unknown index 'dcos' "
                                                   r"\(declared: docs\)"):
            await rt.run_agent(typo_index, "What is lava?")
        with pytest.raises(UnknownNameError, match=r"agent 'helper' .* uses unknown model 'asistant'"):
            await rt.run_agent(typo_model, "go")
    assert engine.calls == []  # refused before the model ran, not answered without passages


def test_an_unknown_agent_in_a_stage_is_a_spec_error_with_its_line(make_spec, agents_dir: Path) -> None:
    with pytest.raises(SpecError) as info:
        make_spec(AGENT_PIPELINE.replace("agent: supervisor", "agent: supervsor"))
    assert info.value.line == 9 and info.value.field == "pipelines.ask.stages.work.agent"
    assert "unknown agent 'supervsor' (agents: researcher, supervisor; Python files under" in info.value.reason


def test_an_agent_on_an_undeclared_model_is_a_spec_error(make_spec, agents_dir: Path) -> None:
    (agents_dir / "researcher.py").write_text(RESEARCHER.replace('"assistant"', '"asistant"'))
    with pytest.raises(SpecError, match=r"agent 'researcher' \(.*researcher.py:\d+\) uses unknown model 'asistant'"):
        make_spec(AGENT_PIPELINE)


def test_a_broken_agent_file_is_a_spec_error_naming_its_file_and_line(make_spec, agents_dir: Path) -> None:
    (agents_dir / "broken.py").write_text("import multilane\n\nx = 1\nraise RuntimeError('oops')\n")
    with pytest.raises(SpecError) as info:
        make_spec(AGENT_PIPELINE)
    assert info.value.file == str(agents_dir / "broken.py") and info.value.line == 4
    assert "RuntimeError: oops" in str(info.value)


def test_agents_come_only_from_the_folder_and_allowed_modules(make_spec, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "solo.py").write_text(RESEARCHER.replace('"researcher"', '"solo"'))
    spec = make_spec(MODEL + "agents: {path: mine, allow_modules: [multilane.tools]}\n")
    assert sorted(spec.agents) == ["solo"]
    with pytest.raises(SpecError, match=r"t.yaml:4 agents.allow_modules\[0\]: cannot import allowed module 'nope'"):
        make_spec(MODEL + "agents: {path: mine, allow_modules: [nope]}\n")
    with pytest.raises(SpecError, match=r"t\.yaml:4 agents\.path: agents folder not found"):
        make_spec(MODEL + "agents: {path: missing}\n")


def test_two_agents_with_one_name_are_a_spec_error(make_spec, agents_dir: Path) -> None:
    (agents_dir / "again.py").write_text(RESEARCHER)
    with pytest.raises(SpecError, match="agent 'researcher' is defined twice"):
        make_spec(AGENT_PIPELINE)


def test_agent_tools_check_their_index_when_the_file_loads(make_spec, tmp_path: Path) -> None:
    folder = tmp_path / "agents"
    folder.mkdir()
    (folder / "reader.py").write_text(
        "from multilane import Agent\nfrom multilane.tools import search_tool\n"
        "reader = Agent('reader', 'assistant', '', [search_tool('guide')])\n")
    with pytest.raises(SpecError, match=r"tool 'search' searches unknown index 'guide' \(declared: docs\)"):
        make_spec(WITH_INDEX + "pipelines:\n  p:\n    stages:\n      r: {kind: agent, agent: reader, task: hi}\n")


def test_agent_options_are_checked_when_defined() -> None:
    with pytest.raises(ValueError, match="first_step_calls needs at least one tool"):
        Agent("a", "m", first_step_calls=1)
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        Agent("a", "m", tools=[add, add])
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        Agent("a", "m", max_steps=0)
    assert isinstance(Agent("sub", "m").as_tool(), Tool)


async def test_agent_stage_failure_names_the_stage(fake_runtime, agents_dir: Path) -> None:
    rt, _ = fake_runtime(AGENT_PIPELINE, assistant=FakeGenerateEngine(lambda prompt, options: "nonsense"))
    async with rt:
        with pytest.raises(StageError, match="pipeline 'ask' stage 'work': agent 'supervisor' step 1"):
            await rt.run("ask", question="q")


async def test_time_is_spent_concurrently_not_serially(fake_runtime) -> None:
    first, release = anyio.Event(), anyio.Event()
    naps: list[float] = []
    results: list[Any] = []

    @tool
    async def nap(seconds: float) -> str:
        """Sleep."""
        naps.append(seconds)
        first.set()
        await release.wait()  # every nap holds until the test has counted the naps under way
        return "rested"

    async def run() -> None:
        results.append(await rt.run_agent(Agent("napper", "assistant", "", [nap], parallel_calls=4), "nap"))

    engine = FakeGenerateEngine(script({"calls": [{"tool": "nap", "arguments": {"seconds": 0.2}}] * 4},
                                       {"answer": "done"}))
    rt, _ = fake_runtime(MODEL, assistant=engine)
    async with rt:
        await rt.load("assistant")
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await first.wait()
            await anyio.wait_all_tasks_blocked()  # whatever else the agent would start has started
            under_way = len(naps)
            release.set()
    assert under_way == 4  # the four calls run at once; one after another, only the first would be under way
    assert results[0].answer == "done"
