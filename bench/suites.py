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
        lane._release()
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


# ---- prefix: shared openings read once from vLLM's prefix cache

AGENTS_SPEC = HERE.parent / "pipelines" / "multi_agent.yaml"
RESEARCH_QUESTIONS = ["What is Vellmar Island known for?", "What can visitors see on Vellmar Island?"]
BRIEF_TOPIC = "the lighthouse"  # its 7 passages make a context of about 1,500 SmolLM2 tokens
BRIEF_QUESTIONS = [
    "Who built the lighthouse?", "When was the lighthouse built?", "How tall is the lighthouse?",
    "What is the lighthouse made of?", "Who keeps the lighthouse?", "How far does its light reach?",
    "Can visitors climb the lighthouse?", "What colour is the lighthouse?", "Where does the lighthouse stand?",
    "Has the lighthouse ever been damaged?", "How is the lamp powered?", "What ships does it guide?",
    "What is near the lighthouse?", "When is the lighthouse open?", "Why was the lighthouse needed?",
    "What happened to the first keeper?"]


class _Calls:
    """The pool's record of each finished generate call: seconds to its first token and in all."""

    def __init__(self) -> None:
        self.first: list[float] = []

    def __call__(self, model: str, first_token: float | None, seconds: float) -> None:
        if first_token is not None:
            self.first.append(first_token)

    def ttft(self) -> dict[str, float]:
        return {"ttft_p50": pct(self.first, 50), "ttft_p95": pct(self.first, 95)}


def _agent_tokens(result: dict[str, Any]) -> tuple[int, int]:
    """Prompt and cached tokens of an agent run's steps and of its sub-agents'."""
    prompt = cached = 0
    for step_ in result["transcript"]:
        prompt += step_["prompt_tokens"]
        cached += step_["cached_tokens"]
        for call in step_["calls"]:
            if call.get("sub"):
                sub_prompt, sub_cached = _agent_tokens(call["sub"])
                prompt, cached = prompt + sub_prompt, cached + sub_cached
    return prompt, cached


async def _prefix_case(caching: bool) -> dict[str, Any]:
    """The example research runs, then the 16-question brief, on a fresh engine with prefix caching on or off."""
    text = AGENTS_SPEC.read_text()
    if not caching:
        text = text.replace("engine: {block_size: 32}", "engine: {block_size: 32, enable_prefix_caching: false}")
        assert "enable_prefix_caching" in text
    spec = parse_spec(text, file=str(AGENTS_SPEC), base_dir=AGENTS_SPEC.parent)
    out: dict[str, Any] = {"prefix_caching": caching}
    async with Runtime(spec, journal="off") as rt:
        await rt.index("guide")
        await rt.load("assistant")
        runs = []
        for question in RESEARCH_QUESTIONS:
            calls = _Calls()
            rt.pool.observers.append(calls)
            t0 = time.perf_counter()
            try:
                result = await rt.run("research", question=question)
            except Exception as exc:  # a 135M model may fail a question; say so instead of losing the suite
                runs.append({"question": question, "error": str(exc)[:300], "seconds": time.perf_counter() - t0})
                continue
            finally:
                rt.pool.observers.remove(calls)
            prompt, cached = _agent_tokens(result.stages["report"])
            runs.append({"question": question, "seconds": time.perf_counter() - t0, "calls": len(calls.first),
                         "prompt_tokens": prompt, "cached_tokens": cached, "cached_share": cached / prompt,
                         "first_tokens": calls.first, **calls.ttft()})
        done = [r for r in runs if "error" not in r]
        prompt, cached = sum(r["prompt_tokens"] for r in done), sum(r["cached_tokens"] for r in done)
        first = _Calls()
        first.first = [t for r in done for t in r.pop("first_tokens")]
        out["research"] = {"runs": runs, "failed": len(runs) - len(done), "seconds": sum(r["seconds"] for r in done),
                           "prompt_tokens": prompt, "cached_tokens": cached,
                           "cached_share": cached / prompt if prompt else float("nan"), **first.ttft()}

        calls = _Calls()
        rt.pool.observers.append(calls)
        t0 = time.perf_counter()
        result = await rt.run("brief", topic=BRIEF_TOPIC, questions=BRIEF_QUESTIONS)
        seconds = time.perf_counter() - t0
        rt.pool.observers.remove(calls)
        items = result.stages["answers"]["items"]
        engine: Any = (await rt.load("assistant")).engine
        context = len(engine.encode(result.stages["notes"]["text"]))
        prompt, cached = sum(i["prompt_tokens"] for i in items), sum(i["cached_tokens"] for i in items)
        out["fan_out"] = {"items": len(items), "context_tokens": context, "seconds": seconds,
                          "prompt_tokens": prompt, "cached_tokens": cached, "cached_share": cached / prompt,
                          **calls.ttft()}
        out["lane"] = {k: rt.ps()[0][k] for k in ("prompt_tokens", "cached_tokens", "cache_hit_rate", "kv_block_size")}
    return out


async def prefix(rt: Runtime) -> dict[str, Any]:
    """The example multi-agent research run and a 16-item for_each over one ~1,500-token context, prefix caching
    on against off (each on a fresh engine, one after the other; the bench's own generate lanes are unloaded)."""
    for row in rt.ps():
        if row["kind"] == "generate":
            await rt.unload(row["name"])
    with step("bench:prefix", "research and fan-out, caching off then on", total=2) as advance:
        off = await _prefix_case(False)
        advance(1)
        on = await _prefix_case(True)
        advance(2)
    return {"off": off, "on": on,
            "research_speedup": off["research"]["seconds"] / on["research"]["seconds"],
            "fan_out_speedup": off["fan_out"]["seconds"] / on["fan_out"]["seconds"]}


# ---- priority: interactive calls beside background agents on one 16-slot lane

BACKGROUND_CALLS = 48
BACKGROUND_TOKENS = 128
INTERACTIVE_EVERY = 2.0  # seconds
INTERACTIVE_TOKENS = 32


# (case, baseline): priority on the 16 shared slots, then with the reserved slots, against first come first served
# on the 16; and the reserved slots (2 more sequences in the engine) against first come first served on all 18.
PRIORITY_COMPARISONS = (("priority", "fifo"), ("priority_reserved", "fifo"), ("priority_reserved", "fifo_all_slots"))
PRIORITY_LABELS = {"fifo": "first come first served", "fifo_all_slots": "first come first served on all 18 slots",
                   "priority": "priority", "priority_reserved": "priority + 2 reserved slots"}


async def _priority_case(rt: Runtime, *, background: int, interactive: int) -> dict[str, Any]:
    """48 background calls and an interactive call every 2 s until they are done, at the priorities given."""
    lane = "lane16"
    bg_options = SamplingOptions(max_tokens=BACKGROUND_TOKENS, ignore_eos=True)
    chat_options = SamplingOptions(max_tokens=INTERACTIVE_TOKENS, ignore_eos=True)
    chats: list[tuple[float, float]] = []  # (seconds to first token, seconds in all)
    finished: list[float] = []
    tokens = 0

    async def one_background(i: int) -> None:
        nonlocal tokens
        done = await rt.generate(lane, f"Write the log of background agent {i} about the tides.", bg_options,
                                 priority=background)
        tokens += done.completion_tokens
        finished.append(time.perf_counter())

    async def one_chat(i: int) -> None:
        t0 = time.perf_counter()
        first = None
        async for chunk in rt.generate_stream(lane, f"Hello! Question {i}: when is high tide?", chat_options,
                                              priority=interactive):
            first = first or (time.perf_counter() - t0 if chunk.tokens else None)
        chats.append((first or float("nan"), time.perf_counter() - t0))

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(BACKGROUND_CALLS):
            tg.start_soon(one_background, i)
        i = 0
        while len(finished) < BACKGROUND_CALLS:
            await anyio.sleep(INTERACTIVE_EVERY)
            if len(finished) < BACKGROUND_CALLS:
                tg.start_soon(one_chat, i)
                i += 1
    background_seconds = max(finished) - started
    return {"ttft": [c[0] for c in chats], "latency": [c[1] for c in chats], "background_seconds": background_seconds,
            "background_tokens_per_s": tokens / background_seconds}


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A case's rounds together: percentiles over every interactive call, the mean background throughput."""
    ttft = [t for r in rounds for t in r["ttft"]]
    latency = [t for r in rounds for t in r["latency"]]
    return {"rounds": len(rounds), "interactive_calls": len(latency), "interactive_ttft_p50": pct(ttft, 50),
            "interactive_ttft_p95": pct(ttft, 95), "interactive_latency_p50": pct(latency, 50),
            "interactive_latency_p95": pct(latency, 95),
            "background_seconds": statistics.mean(r["background_seconds"] for r in rounds),
            "background_tokens_per_s": statistics.mean(r["background_tokens_per_s"] for r in rounds),
            "background_tokens_per_s_each": [r["background_tokens_per_s"] for r in rounds]}


async def priority(rt: Runtime) -> dict[str, Any]:
    """Interactive calls beside 48 background calls on one lane of 16 slots plus 2 reserved: first come first
    served on the 16, against priority alone on the 16, against priority with the reserved slots, and first come
    first served on all 18 (the bench's other generate lanes are unloaded first)."""
    for row in rt.ps():
        if row["kind"] == "generate" and "lane16" not in row["models"]:
            await rt.unload(row["name"])
    await rt.load("lane16")
    await rt.generate("lane16", "Warm up.", SamplingOptions(max_tokens=4))
    # The lane keeps its 2 reserved slots for priority 0 or lower: calls at 1 or more share the 16 others.
    cases = {"fifo": {"background": 1, "interactive": 1},  # one priority: arrival order on the 16 slots
             "priority": {"background": 2, "interactive": 1},  # interactive first in the queue, on the 16 slots
             "priority_reserved": {"background": 1, "interactive": 0},  # and the 2 reserved slots for it
             "fifo_all_slots": {"background": 0, "interactive": 0}}  # arrival order on all 18 slots
    # Each case runs twice, in the order A B C D D C B A, so that a machine getting busier or quieter weighs on all.
    order = [*cases, *reversed(cases)]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    with step("bench:priority", "fifo, priority, priority with reserved slots", total=len(order)) as advance:
        for n, name in enumerate(order, start=1):
            rounds[name].append(await _priority_case(rt, **cases[name]))
            advance(n)
    out: dict[str, Any] = {name: _summary(done) for name, done in rounds.items()}
    out["comparisons"] = [
        {"case": case, "against": base,
         "p95_latency_ratio": out[base]["interactive_latency_p95"] / out[case]["interactive_latency_p95"],
         "background_throughput_ratio": out[case]["background_tokens_per_s"] / out[base]["background_tokens_per_s"]}
        for case, base in PRIORITY_COMPARISONS]
    return out


SUITES: dict[str, Suite] = {"throughput": throughput, "embedding": embedding, "search": search, "rag": rag,
                            "swap": swap, "prefix": prefix, "priority": priority}


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
    if "prefix" in results:
        p = results["prefix"]
        for part, label in (("research", "research runs"), ("fan_out", "16-item fan-out")):
            on, off = p["on"][part], p["off"][part]
            extra = f" over {on['context_tokens']} context tokens" if part == "fan_out" else ""
            lines.append(f"prefix, {label}{extra}: {on['cached_share']:.0%} of {on['prompt_tokens']} prompt tokens "
                         f"from cache; {on['seconds']:.1f}s cached vs {off['seconds']:.1f}s uncached "
                         f"({off['seconds'] / on['seconds']:.1f}x); ttft p50/p95 {on['ttft_p50']:.2f}/"
                         f"{on['ttft_p95']:.2f}s vs {off['ttft_p50']:.2f}/{off['ttft_p95']:.2f}s")
    if "priority" in results:
        q = results["priority"]
        for row in q["comparisons"]:
            case, base = q[row["case"]], q[row["against"]]
            lines.append(
                f"priority, {PRIORITY_LABELS[row['case']]} vs {PRIORITY_LABELS[row['against']]}: interactive latency "
                f"p50/p95 {case['interactive_latency_p50']:.1f}/{case['interactive_latency_p95']:.1f}s vs "
                f"{base['interactive_latency_p50']:.1f}/{base['interactive_latency_p95']:.1f}s "
                f"({row['p95_latency_ratio']:.1f}x lower p95), ttft p95 {case['interactive_ttft_p95']:.2f}s vs "
                f"{base['interactive_ttft_p95']:.2f}s; background {case['background_tokens_per_s']:.0f} vs "
                f"{base['background_tokens_per_s']:.0f} tok/s ({row['background_throughput_ratio']:.2f}x)")
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
