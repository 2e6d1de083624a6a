"""Multilane's benchmarks: each suite measures two ways of doing the same work side by side, in one run.

Run them with `multilane bench` (all suites) or `multilane bench throughput swap`; results go to
bench/results/ as JSON and a PNG chart, and a table is printed. Numbers depend on the machine: compare
ratios, which are measured in the same process minutes apart.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from multilane import Runtime, SamplingOptions, load_spec, parse_spec
from multilane.lanes import UNSET
from multilane.progress import step

HERE = Path(__file__).resolve().parent
SPEC = HERE / "bench.yaml"
OUTPUT_TOKENS = 64  # fixed output length (ignore_eos) so every compared call does the same work
CONCURRENCY = (1, 4, 16, 64)
SEQUENTIAL_SAMPLE = 8  # sequential throughput does not depend on N; measure it on this many calls

Suite = Callable[[Runtime], Awaitable[dict[str, Any]]]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values."""
    return float(np.percentile(values, q)) if values else float("nan")


def prompts(n: int) -> list[str]:
    return [f"Tell the story of lighthouse keeper number {i} on a stormy night." for i in range(n)]


async def _timed_calls(call: Callable[[str], Awaitable[tuple[float, int]]], texts: list[str],
                       concurrent: bool) -> dict[str, Any]:
    """Run calls concurrently or one after another; each returns (seconds to first token, tokens)."""
    ttft: list[float] = []
    latency: list[float] = []
    tokens = 0

    async def one(text: str) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        first, n = await call(text)
        latency.append(time.perf_counter() - t0)
        ttft.append(first - t0)
        tokens += n

    started = time.perf_counter()
    if concurrent:
        async with anyio.create_task_group() as tg:
            for text in texts:
                tg.start_soon(one, text)
    else:
        for text in texts:
            await one(text)
    seconds = time.perf_counter() - started
    return {"calls": len(texts), "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "latency_p50": pct(latency, 50), "latency_p95": pct(latency, 95)}


async def throughput(rt: Runtime) -> dict[str, Any]:
    """N concurrent generate calls through Multilane vs in sequence, and vs the same calls on raw AsyncLLM."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    lane = await rt.load("assistant")
    engine: Any = lane.engine
    options = SamplingOptions(max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True, temperature=0.0,
                            output_kind=RequestOutputKind.DELTA)
    counter = iter(range(10**9))

    async def multilane(text: str) -> tuple[float, int]:
        first, n = 0.0, 0
        async for chunk in rt.generate_stream("assistant", text, options):
            first = first or time.perf_counter()
            n += chunk.tokens
        return first, n

    async def raw(text: str) -> tuple[float, int]:
        ids = engine.encode(engine.render([{"role": "user", "content": text}]))
        first, n = 0.0, 0
        async for out in engine._llm.generate({"prompt_token_ids": ids}, params, f"raw-{next(counter)}"):
            first = first or time.perf_counter()
            n += len(out.outputs[0].token_ids)
        return first, n

    await _timed_calls(multilane, prompts(4), concurrent=True)  # warm up
    sequential = await _timed_calls(multilane, prompts(SEQUENTIAL_SAMPLE), concurrent=False)
    rows = []
    with step("bench:throughput", "throughput at each concurrency", total=len(CONCURRENCY)) as advance:
        for n in CONCURRENCY:
            through = await _timed_calls(multilane, prompts(n), concurrent=True)
            row: dict[str, Any] = {"concurrency": n, "multilane": through,
                                   "speedup_vs_sequential": through["tokens_per_s"] / sequential["tokens_per_s"]}
            if n >= 16:
                direct = await _timed_calls(raw, prompts(n), concurrent=True)
                row["raw_vllm"] = direct
                row["overhead_vs_raw"] = 1 - through["tokens_per_s"] / direct["tokens_per_s"]
            rows.append(row)
            advance(len(rows))
    return {"output_tokens": OUTPUT_TOKENS, "sequential": sequential, "rows": rows}


async def embedding(rt: Runtime) -> dict[str, Any]:
    """256 concurrent single-text embed calls micro-batched vs one encode per call."""
    lane = await rt.load("embedder")
    engine: Any = lane.engine
    texts = [f"Question {i}: when does the ferry Saltwren leave Port Askel?" for i in range(256)]

    async def batched() -> float:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for text in texts:
                tg.start_soon(rt.embed, "embedder", [text])
        return time.perf_counter() - t0

    async def one_each() -> float:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for text in texts:
                tg.start_soon(engine.encode, [text])
        return time.perf_counter() - t0

    await batched()  # warm up
    fast, slow = min([await batched(), await batched()]), await one_each()
    return {"calls": len(texts), "batched_s": fast, "one_encode_per_call_s": slow, "speedup": slow / fast,
            "batches": engine.batcher.stats().batches}


async def search(rt: Runtime) -> dict[str, Any]:
    """256 concurrent searches on one FAISS index batched into multi-query searches vs one at a time."""
    index = await rt.index("guide")
    vectors = await rt.embed("embedder", [f"ferry times question {i}" for i in range(256)])

    async def batched() -> float:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for vector in vectors:
                tg.start_soon(index.batcher.submit, (vector, 4))
        return time.perf_counter() - t0

    async def one_at_a_time() -> float:
        t0 = time.perf_counter()
        for vector in vectors:
            await index.index.asearch(vector[None, :], 4)
        return time.perf_counter() - t0

    await batched()
    fast, slow = min([await batched(), await batched()]), min([await one_at_a_time(), await one_at_a_time()])
    return {"searches": len(vectors), "chunks": index.chunks, "batched_s": fast, "one_at_a_time_s": slow,
            "speedup": slow / fast}


QUESTIONS = [
    "Who built the lighthouse at Cape Orrin?", "When does the ferry leave Port Askel?",
    "What is Fellrind cheese washed with?", "When is it safe to cross the Strand Way causeway?",
    "How many puffin burrows were counted on the Skarra cliffs?", "What are the wind turbines called?",
    "How long did Agnes Tully swim?", "What was the strongest gust ever recorded on Vellmar?",
]


async def rag(rt: Runtime) -> dict[str, Any]:
    """32 concurrent runs of the example RAG pipeline vs 32 in sequence."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(32)]
    await rt.run("ask", question=questions[0])  # warm up: index and lanes

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for question in questions:
            tg.start_soon(rt.run, "ask", {"question": question})
    concurrent = time.perf_counter() - t0
    t0 = time.perf_counter()
    for question in questions:
        await rt.run("ask", question=question)
    sequential = time.perf_counter() - t0
    return {"runs": len(questions), "concurrent_s": concurrent, "sequential_s": sequential,
            "speedup": sequential / concurrent}


async def _switch_overheads(rt: Runtime, switches: int) -> tuple[list[float], list[float]]:
    """Alternate 1-token calls between two models; return per-switch admission times and call latencies."""
    admission: list[float] = []
    latency: list[float] = []
    options = SamplingOptions(max_tokens=1)
    for i in range(switches):
        name = ("gemma", "smol")[i % 2]  # smol is loaded first: every call is a switch
        t0 = time.perf_counter()
        lane, _ = await rt.pool._leased(name, UNSET)  # what Multilane adds before the engine sees the call
        admission.append(time.perf_counter() - t0)
        lane.release()
        t0 = time.perf_counter()
        await rt.generate(name, "Say hello.", options)
        latency.append(time.perf_counter() - t0)
    return admission, latency


async def swap(rt: Runtime) -> dict[str, Any]:
    """The swap tax: switching between two resident models vs the same switch when only one may be resident."""
    await rt.load("smol")
    await rt.load("gemma")
    resident_admission, resident_latency = await _switch_overheads(rt, 40)
    single = parse_spec(SPEC.read_text().replace("max_loaded_models: 4", "max_loaded_models: 1")
                        .replace("keep_alive: -1", "keep_alive: 5m"), file=str(SPEC), base_dir=SPEC.parent)
    async with Runtime(single) as one:
        await one.load("smol")
        swap_admission, swap_latency = await _switch_overheads(one, 3)
    return {
        "resident_switch_overhead_p50_ms": statistics.median(resident_admission) * 1000,
        "resident_call_p50_s": statistics.median(resident_latency),
        "single_resident_switch_p50_s": statistics.median(swap_admission),
        "single_resident_call_p50_s": statistics.median(swap_latency) + statistics.median(swap_admission),
        "swap_tax_ratio": statistics.median(swap_admission) / statistics.median(resident_admission),
    }


SUITES: dict[str, Suite] = {"throughput": throughput, "embedding": embedding, "search": search, "rag": rag,
                            "swap": swap}


def table(results: dict[str, Any]) -> str:
    """The results as a plain-text table: one line per measurement, with its ratio."""
    lines = []
    t = results.get("throughput")
    if t:
        seq = t["sequential"]["tokens_per_s"]
        lines.append(f"generate, {t['output_tokens']} tokens per call; sequential: {seq:.0f} tok/s")
        lines.append(f"{'N':>4} {'tok/s':>8} {'x seq':>7} {'ttft p50':>9} {'ttft p95':>9} {'lat p50':>8} "
                     f"{'lat p95':>8} {'raw tok/s':>10} {'overhead':>9}")
        for row in t["rows"]:
            m = row["multilane"]
            raw = row.get("raw_vllm")
            lines.append(
                f"{row['concurrency']:>4} {m['tokens_per_s']:>8.0f} {row['speedup_vs_sequential']:>6.1f}x "
                f"{m['ttft_p50']:>8.2f}s {m['ttft_p95']:>8.2f}s {m['latency_p50']:>7.2f}s {m['latency_p95']:>7.2f}s "
                + (f"{raw['tokens_per_s']:>10.0f} {row['overhead_vs_raw'] * 100:>8.1f}%" if raw else ""))
    if "embedding" in results:
        e = results["embedding"]
        lines.append(f"embedding: {e['calls']} concurrent calls, micro-batched {e['batched_s']:.2f}s vs one encode "
                     f"per call {e['one_encode_per_call_s']:.2f}s: {e['speedup']:.1f}x")
    if "search" in results:
        s = results["search"]
        lines.append(f"search: {s['searches']} concurrent searches, batched {s['batched_s'] * 1000:.1f}ms vs one at a "
                     f"time {s['one_at_a_time_s'] * 1000:.1f}ms: {s['speedup']:.1f}x")
    if "rag" in results:
        r = results["rag"]
        lines.append(f"rag: {r['runs']} pipeline runs, concurrent {r['concurrent_s']:.1f}s vs sequential "
                     f"{r['sequential_s']:.1f}s: {r['speedup']:.1f}x")
    if "swap" in results:
        w = results["swap"]
        lines.append(f"swap: resident switch overhead p50 {w['resident_switch_overhead_p50_ms']:.3f}ms vs "
                     f"single-resident switch {w['single_resident_switch_p50_s']:.1f}s "
                     f"({w['swap_tax_ratio']:.0f}x); 1-token call p50 {w['resident_call_p50_s'] * 1000:.0f}ms "
                     f"resident vs {w['single_resident_call_p50_s']:.1f}s swapping")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    """Throughput vs concurrency: Multilane, raw vLLM and the sequential baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = results["throughput"]
    xs = [row["concurrency"] for row in t["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [row["multilane"]["tokens_per_s"] for row in t["rows"]], "o-", label="Multilane")
    raw = [(row["concurrency"], row["raw_vllm"]["tokens_per_s"]) for row in t["rows"] if "raw_vllm" in row]
    if raw:
        ax.plot(*zip(*raw, strict=True), "s--", label="raw vLLM AsyncLLM")
    ax.axhline(t["sequential"]["tokens_per_s"], color="grey", linestyle=":", label="sequential")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"SmolLM2-135M on vLLM, {t['output_tokens']} tokens per call")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def run(names: list[str]) -> dict[str, Any]:
    """Run the named suites on one runtime over bench.yaml."""
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    async with Runtime(load_spec(SPEC)) as rt:
        for i, name in enumerate(names, start=1):
            t0 = time.perf_counter()
            with step(f"bench:{name}:suite", f"suite {i} of {len(names)}: {name}"):
                results[name] = await SUITES[name](rt)
            results[name]["suite_seconds"] = round(time.perf_counter() - t0, 1)
    return results
