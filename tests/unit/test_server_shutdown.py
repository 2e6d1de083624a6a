"""The server's shutdown on fake engines: what has not started gets a 503 at once, running calls get the grace,
those still running when it runs out are cut with a 503, and the log sums it up in one line."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from multilane.errors import RuntimeClosedError, StageError
from multilane.server.errors import api_error

pytestmark = pytest.mark.anyio

SPEC = """
models:
  assistant: {kind: generate, source: ./assistant, parallel: 2}
  embedder: {kind: embedding, source: ./embedder}
runtime: {max_queue: 8}
pipelines:
  echo:
    inputs: {question: str}
    stages:
      answer: {kind: reason, model: assistant, prompt: "Question: {{ inputs.question }}", max_tokens: 64}
    output: "{{ stages.answer.text }}"
"""


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "assistant", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def lane(s: Any) -> dict[str, Any]:
    (row,) = [row for row in s.runtime.ps() if row["name"] == "assistant"]
    return row


def slots(s: Any) -> tuple[int, int]:
    """The assistant lane's busy slots and queued calls; (0, 0) before it is loaded."""
    rows = [row for row in s.runtime.ps() if row["name"] == "assistant"]
    return (rows[0]["busy"], rows[0]["queued"]) if rows else (0, 0)


async def until(check: Any) -> None:
    """Wait until `check()` holds. A call's prompt is counted in a worker thread before it takes a slot or
    queues, which `wait_all_tasks_blocked` does not wait for; the test's `fail_after` bounds the wait."""
    while not check():  # noqa: ASYNC110 (the lanes offer no event for "a call reached me")
        await anyio.sleep(0.001)


def refused_for_shutdown(reply: httpx.Response) -> bool:
    body = reply.json()
    code = body["error"]["code"] if isinstance(body["error"], dict) else None
    return reply.status_code == 503 and reply.headers.get("retry-after") == "1" and code == "shutting_down"


def summary(logs: list[dict[str, Any]]) -> dict[str, Any]:
    (line,) = [entry for entry in logs if entry["event"] == "shut down"]
    return line


async def test_queued_and_new_calls_get_503_at_once_while_running_calls_finish(serve: Any, held: Any) -> None:
    engine = held("one two three", before_hold=1)
    replies: dict[str, httpx.Response] = {}

    with capture_logs() as logs, anyio.fail_after(60):
        async with serve(SPEC, assistant=engine) as s:
            async def call(name: str) -> None:
                replies[name] = await s.client.post("/v1/chat/completions", json=chat(name))

            async with anyio.create_task_group() as tg:
                for n, name in enumerate(("run-1", "run-2", "queued-1", "queued-2", "queued-3"), start=1):
                    tg.start_soon(call, name)
                    await until(lambda n=n: sum(slots(s)) == n)  # in this order: the first two run
                assert slots(s) == (2, 3)

                drained = anyio.Event()

                async def drain() -> None:
                    await s.app.state.shutdown.drain(60)
                    drained.set()

                tg.start_soon(drain)
                await until(lambda: len(replies) == 3)
                # At once, while the two running calls still hold their slots: the queued ones are refused ...
                assert sorted(replies) == ["queued-1", "queued-2", "queued-3"]
                assert all(refused_for_shutdown(reply) for reply in replies.values())
                assert "shutting down" in replies["queued-1"].json()["error"]["message"]
                # ... and so is a call that arrives now, on any route, OpenAI's or Ollama's.
                late = await s.client.post("/v1/chat/completions", json=chat("late"))
                ollama = await s.client.post("/api/chat", json={**chat("late"), "stream": False})
                assert refused_for_shutdown(late)
                assert ollama.status_code == 503 and ollama.headers["retry-after"] == "1"
                assert "shutting down" in ollama.json()["error"]
                assert not drained.is_set() and lane(s)["busy"] == 2
                engine.release.set()

    assert [replies[name].status_code for name in ("run-1", "run-2")] == [200, 200]
    assert all(replies[name].json()["choices"][0]["message"]["content"] == "one two three"
               for name in ("run-1", "run-2"))
    assert [call.prompt for call in engine.calls] == [f"<user>run-{i}\n<assistant>" for i in (1, 2)]
    line = summary(logs)
    assert (line["finished"], line["refused"], line["cut"]) == (2, 5, 0)
    assert line["log_level"] == "warning"
    # The refusals are summed up in that line, not logged one warning each.
    assert not [entry for entry in logs if entry["event"] == "request refused" and entry["log_level"] == "warning"]


async def test_calls_still_running_when_the_grace_runs_out_are_cut_with_a_503(serve: Any, held: Any) -> None:
    engine = held("one two three", before_hold=1)
    replies: dict[str, httpx.Response] = {}

    with capture_logs() as logs, anyio.fail_after(60):
        async with serve(SPEC, assistant=engine) as s:
            async def call(name: str, path: str, body: dict[str, Any]) -> None:
                replies[name] = await s.client.post(path, json=body)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "whole", "/v1/chat/completions", chat("whole"))
                tg.start_soon(call, "stream", "/v1/chat/completions", chat("stream", stream=True))
                await until(lambda: slots(s)[0] == 2)  # both hold mid-stream, and the engine never lets them go
                await s.app.state.shutdown.drain(0.05)
            busy_after = lane(s)["busy"]

    assert refused_for_shutdown(replies["whole"])
    assert "grace ran out" in replies["whole"].json()["error"]["message"]
    streamed = replies["stream"]
    assert streamed.status_code == 200  # it had begun: the cut comes as the stream's last event
    events = [block.removeprefix("data: ") for block in streamed.text.strip().split("\n\n")]
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "one "
    assert json.loads(events[-2])["error"]["code"] == "shutting_down" and events[-1] == "[DONE]"
    assert busy_after == 0 and all(call.aborted and call.finished for call in engine.calls)
    line = summary(logs)
    assert (line["finished"], line["refused"], line["cut"]) == (0, 0, 2)


async def test_a_pipeline_run_cut_by_the_shutdown_is_a_503_and_its_stream_ends_with_an_error_event(
        serve: Any, held: Any) -> None:
    engine = held("one two three", before_hold=1)
    replies: dict[str, httpx.Response] = {}

    with anyio.fail_after(60):
        async with serve(SPEC, assistant=engine) as s:
            async def run(name: str, stream: bool) -> None:
                replies[name] = await s.client.post("/v1/pipelines/echo/runs",
                                                    json={"inputs": {"question": name}, "stream": stream})

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "whole", False)
                tg.start_soon(run, "stream", True)
                await until(lambda: slots(s)[0] == 2)  # both runs' model calls hold their slots
                await s.app.state.shutdown.drain(0.05)

    assert refused_for_shutdown(replies["whole"])
    last = [block.removeprefix("data: ") for block in replies["stream"].text.strip().split("\n\n")][-2]
    assert json.loads(last)["error"]["code"] == "shutting_down"


async def test_a_shutdown_with_nothing_in_flight_logs_its_line_as_info(serve: Any) -> None:
    with capture_logs() as logs:
        async with serve(SPEC) as s:
            assert (await s.client.post("/v1/chat/completions", json=chat("before"))).status_code == 200
            await s.app.state.shutdown.drain(60)
    line = summary(logs)
    assert (line["finished"], line["refused"], line["cut"], line["log_level"]) == (0, 0, 0, "info")


def test_a_closed_runtime_is_a_503_with_retry_after_also_as_the_cause_of_a_stage_error() -> None:
    for exc in (RuntimeClosedError("closed"), StageError("ask", "answer", RuntimeClosedError("closed"))):
        err = api_error(exc)
        assert (err.status, err.code, err.headers) == (503, "shutting_down", {"Retry-After": "1"})
