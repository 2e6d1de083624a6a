"""What `multilane runs show` and `GET /v1/runs/{id}` tell about a journaled run, as data and as text."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from multilane.journal.store import LoadedRun, RunRecord, StepRecord

__all__ = ["describe_run", "format_run", "format_runs"]


def _stage_of(path: str) -> str | None:
    first = path.split("/", 1)[0]
    return first.removeprefix("stage:") if first.startswith("stage:") else None


def describe_run(loaded: LoadedRun) -> dict[str, Any]:
    """A run with its stages (status, timings, tokens, calls), agent transcripts and errors, JSON-ready."""
    run = loaded.run
    records = sorted(loaded.steps.values(), key=lambda r: r.started_at)
    stages = {name: _stage_row(name) for name in run.stages}  # in the pipeline's order; `pending` until they start
    agents: dict[str, dict[str, Any]] = {}
    unfinished = "running" if run.status == "running" else "unfinished"
    for record in records:
        name = _stage_of(record.path)
        if name is None:
            continue
        stage = stages.setdefault(name, _stage_row(name))
        if stage["status"] == "pending":
            stage["status"] = unfinished
        stage["started_at"] = min(stage["started_at"] or record.started_at, record.started_at)
        if record.kind == "stage":
            stage.update(kind=record.attrs.get("kind"), status="ok" if record.ok else "failed",
                         started_at=record.started_at, finished_at=record.finished_at,
                         seconds=round(record.finished_at - record.started_at, 3), error=record.error)
        elif record.kind == "item" and record.path.count("/") == 1:
            stage["items" if record.ok else "items_failed"] += 1
        elif record.kind == "model":
            stage["model_calls"] += 1
            stage["cached_calls"] += int(record.cached)
            stage["prompt_tokens"] += record.prompt_tokens
            stage["completion_tokens"] += record.completion_tokens
        if record.kind in ("agent", "agent_step"):
            _add_to_transcript(agents, record, unfinished)
    models = [r for r in records if r.kind == "model"]
    errors = [{"path": r.path, "kind": r.kind, "error": r.error} for r in records if not r.ok]
    return {**run.to_dict(), "stages": list(stages.values()),
            "agents": list(agents.values()), "errors": errors, "model_calls": len(models),
            "cached_calls": sum(r.cached for r in models), "prompt_tokens": sum(r.prompt_tokens for r in models),
            "completion_tokens": sum(r.completion_tokens for r in models)}


def _stage_row(name: str) -> dict[str, Any]:
    return {"stage": name, "kind": None, "status": "pending", "started_at": None, "finished_at": None,
            "seconds": None, "items": 0, "items_failed": 0, "model_calls": 0, "cached_calls": 0, "prompt_tokens": 0,
            "completion_tokens": 0, "error": None}


def _add_to_transcript(agents: dict[str, dict[str, Any]], record: StepRecord, unfinished: str) -> None:
    """File an agent's steps under the agent's path; its own record (written last) adds the answer."""
    path = record.path if record.kind == "agent" else record.path.rsplit("/", 1)[0]
    agent = agents.setdefault(path, {"path": path, "agent": record.attrs.get("agent"),
                                     "task": record.attrs.get("task"), "status": unfinished, "answer": None,
                                     "error": None, "steps": []})
    if record.kind == "agent":
        agent.update(status="ok" if record.ok else "failed", error=record.error,
                     answer=record.result.get("answer") if record.ok else None)
        return
    step = record.result if record.ok else {"index": record.attrs.get("step"), "kind": "failed",
                                            "error": record.error, "calls": []}
    agent["steps"] = sorted([*agent["steps"], step], key=lambda s: s.get("index") or 0)


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _short(value: Any, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_runs(runs: list[RunRecord]) -> str:
    """The runs as a table, newest first."""
    if not runs:
        return "no runs journaled"
    rows = [("RUN", "PIPELINE", "STATUS", "STARTED", "SECONDS", "ATTEMPTS")]
    for run in runs:
        seconds = "-" if run.finished_at is None else f"{run.finished_at - run.started_at:.2f}"
        rows.append((run.run_id, run.pipeline, run.status, _when(run.started_at), seconds, str(run.attempts)))
    return _table(rows)


def format_run(described: dict[str, Any]) -> str:
    """One run as `describe_run` gives it, as text: header, stages, agent transcripts, errors and the output."""
    d = described
    took = f" in {d['seconds']:.2f} s" if d["seconds"] is not None else ""
    lines = [f"run {d['run_id']}: pipeline '{d['pipeline']}', {d['status']}{took} (attempt {d['attempts']})",
             f"started {_when(d['started_at'])}; file {d['spec_file'] or '(text)'} (sha256 {d['spec_hash'][:12]})",
             f"inputs: {_short(d['inputs'], 200)}",
             f"model calls: {d['model_calls']} ({d['cached_calls']} from the cache), tokens: {d['prompt_tokens']} "
             f"prompt + {d['completion_tokens']} completion"]
    if d["stages"]:
        rows = [("STAGE", "KIND", "STATUS", "SECONDS", "ITEMS", "CALLS", "CACHED", "PROMPT", "COMPLETION")]
        for s in d["stages"]:
            items = "-" if not (s["items"] or s["items_failed"]) else \
                f"{s['items']}" + (f" (+{s['items_failed']} failed)" if s["items_failed"] else "")
            rows.append((s["stage"], s["kind"] or "-", s["status"],
                         "-" if s["seconds"] is None else f"{s['seconds']:.2f}", items, str(s["model_calls"]),
                         str(s["cached_calls"]), str(s["prompt_tokens"]), str(s["completion_tokens"])))
        lines += ["", _table(rows)]
    for agent in d["agents"]:
        lines += ["", f"agent {agent['agent']} at {agent['path']}: {agent['status']}; task: {_short(agent['task'])}"]
        for step in agent["steps"]:
            if step["kind"] == "answer":
                lines.append(f"  {step['index']} answer: {_short(step['answer'])}")
            elif step["kind"] == "calls":
                for call in step["calls"]:
                    mark = "->" if call["ok"] else "failed:"
                    lines.append(f"  {step['index']} {call['tool']}({_short(call['arguments'], 80)}) {mark} "
                                 f"{_short(call['result'], 80)}")
            else:
                lines.append(f"  {step['index']} {step['kind']}: {_short(step.get('error'))}")
    if d["errors"] or d["error"]:
        lines += ["", "errors:"]
        lines += [f"  {e['path']}: {_short(e['error'], 300)}" for e in d["errors"]]
        if d["error"] and not d["errors"]:
            lines.append(f"  run: {_short(d['error'], 300)}")
    if d["status"] == "finished":
        output = d["output"] if isinstance(d["output"], str) else json.dumps(d["output"], indent=2, default=str)
        lines += ["", "output:", output.strip()]
    return "\n".join(lines)
