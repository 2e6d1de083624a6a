"""Fan-in on the real stack: concurrent calls batch in vLLM and in sentence-transformers, each gets its own result."""

from __future__ import annotations

import json

import anyio
import numpy as np
import pytest

from multilane import Runtime, SamplingOptions

pytestmark = pytest.mark.anyio


async def test_eight_concurrent_generate_calls_batch_and_each_gets_its_own_output(real_runtime: Runtime) -> None:
    lane = await real_runtime.load("assistant")
    outputs: dict[int, dict[str, object]] = {}
    peak = 0

    async def call(i: int) -> None:
        schema = {"type": "object", "properties": {"id": {"const": i}, "note": {"type": "string", "maxLength": 40}},
                  "required": ["id", "note"], "additionalProperties": False}
        done = await real_runtime.generate("assistant", f"Write a note about the number {i}.",
                                           SamplingOptions(max_tokens=48, json_schema=schema))
        outputs[i] = json.loads(done.text)

    async def watch() -> None:
        nonlocal peak
        while len(outputs) < 8:
            peak = max(peak, lane.engine.unfinished_requests())  # type: ignore[union-attr]
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        for i in range(8):
            tg.start_soon(call, i)

    assert {i: out["id"] for i, out in outputs.items()} == {i: i for i in range(8)}  # no crossed wires
    assert peak >= 4  # they were in the engine together, not one after another


async def test_concurrent_embed_calls_share_encodes_and_match_single_encodes(real_runtime: Runtime) -> None:
    lane = await real_runtime.load("embedder")
    engine = lane.engine
    texts = [f"Note {i}: the ferry leaves at {7 + i % 5}:40 from Port Askel." for i in range(48)]
    before = engine.batcher.stats()  # type: ignore[union-attr]
    vectors: dict[int, np.ndarray] = {}

    async def call(i: int) -> None:
        vectors[i] = (await real_runtime.embed("embedder", [texts[i]]))[0]

    async with anyio.create_task_group() as tg:
        for i in range(len(texts)):
            tg.start_soon(call, i)

    after = engine.batcher.stats()  # type: ignore[union-attr]
    assert after.items - before.items == 48
    assert after.batches - before.batches <= 6  # 48 calls, a few encodes
    alone = await engine.encode(texts)  # type: ignore[union-attr]
    for i in range(len(texts)):
        np.testing.assert_allclose(vectors[i], alone[i], atol=1e-4)
