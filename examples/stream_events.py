"""Stream a pipeline run's events as they happen: each stage starting and finishing, and the answer's tokens.

Run it from the project's folder (the first run builds the example index; loading the model takes about 20 s
on a CPU):

    python examples/stream_events.py "Who built the lighthouse at Cape Orrin?"
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio

from multilane import MultilaneError, Runtime

PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "rag.yaml"
QUESTION = "Who built the lighthouse at Cape Orrin?"


def summary(result: dict[str, Any]) -> str:
    """A few words on a stage's result: what a retrieve stage found, what a reason stage generated."""
    if "passages" in result:
        return ", ".join(f"{p['source']} ({p['score']:.2f})" for p in result["passages"])
    if "completion_tokens" in result:
        return f"{result['completion_tokens']} tokens, {result['finish_reason']}"
    return ""


async def main(question: str) -> None:
    async with Runtime.from_file(PIPELINE) as rt, rt.stream("ask", question=question) as events:
        midline = False  # tokens were printed without a newline yet
        async for event in events:
            if event.type == "token":
                print(event.data["text"], end="", flush=True)
                midline = True
                continue
            if midline:
                print()
                midline = False
            if event.type == "run_started":
                print(f"run {event.run_id} started: {event.data['pipeline']}")
            elif event.type == "stage_started":
                print(f"[{event.stage}] started ({event.data['kind']})")
            elif event.type == "stage_finished":
                print(f"[{event.stage}] finished in {event.data['seconds']:.2f}s: {summary(event.data['result'])}")
            elif event.type == "stage_failed":
                print(f"[{event.stage}] failed: {event.data['error']}")
            elif event.type == "run_finished":
                print(f"run finished in {event.data['seconds']:.2f}s")


if __name__ == "__main__":  # vLLM starts its engine core in a child process: keep the guard
    try:
        anyio.run(main, " ".join(sys.argv[1:]) or QUESTION)
    except MultilaneError as exc:
        sys.exit(f"error: {exc}")
