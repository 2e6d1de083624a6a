"""vLLM's own abort path on the real stack: a call that ends early must end inside vLLM too.

The fake engine marks every call that ends early as aborted, so the unit tests cannot tell whether vLLM
really stops. These tests ask vLLM itself: its frontend's count of unfinished requests, and its engine
core's KV-cache blocks, which a request keeps until the core has aborted it.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import anyio
import pytest

from multilane import Runtime, SamplingOptions

pytestmark = pytest.mark.anyio

LONG = SamplingOptions(max_tokens=1500, ignore_eos=True)  # far longer than any test waits for


async def kv_cache_is_empty(engine: Any) -> bool:
    """True when no request holds KV-cache blocks in vLLM's engine core (its scheduler's own count)."""
    # VLLMEngine has no public door to its AsyncLLM; reset_prefix_cache succeeds only when no block is in use
    # (it also drops the prefix cache, which costs these tests nothing).
    return bool(await engine._llm.reset_prefix_cache())


async def test_a_stream_closed_early_is_aborted_inside_vllm_and_frees_its_slot(real_runtime: Runtime) -> None:
    lane = await real_runtime.load("assistant")
    engine: Any = lane.engine
    assert engine.unfinished_requests() == 0 and await kv_cache_is_empty(engine)

    seen: list[tuple[int, int, bool]] = []
    stream = real_runtime.generate_stream("assistant", "Write a long story about the sea.", LONG)
    async with aclosing(stream):
        async for chunk in stream:
            if chunk.tokens:
                seen.append((engine.unfinished_requests(), lane.busy, await kv_cache_is_empty(engine)))
                break  # closing the stream is all the caller does

    assert seen == [(1, 1, False)]  # mid-request: in vLLM, in a slot, holding KV blocks
    assert engine.unfinished_requests() == 0 and lane.busy == 0
    assert await kv_cache_is_empty(engine)  # the engine core dropped it too, not only the frontend


async def test_a_cancelled_run_is_aborted_inside_vllm_and_frees_its_slot(real_runtime: Runtime) -> None:
    lane = await real_runtime.load("assistant")
    engine: Any = lane.engine
    seen: list[tuple[int, int, bool]] = []

    with anyio.CancelScope() as scope:
        async with real_runtime.stream("long") as events:
            async for event in events:
                if event.type == "token":
                    seen.append((engine.unfinished_requests(), lane.busy, await kv_cache_is_empty(engine)))
                    scope.cancel()  # the run's stage task is cancelled while it waits on vLLM

    assert scope.cancelled_caught
    assert seen == [(1, 1, False)]
    assert engine.unfinished_requests() == 0 and lane.busy == 0
    assert await kv_cache_is_empty(engine)
    done = await real_runtime.generate("assistant", "Say hello.", SamplingOptions(max_tokens=4, ignore_eos=True))
    assert done.completion_tokens == 4  # the lane serves on
