"""The lanes page's JSON (GET /v1/lanes) on fake engines, the page's files, and where the API key is needed."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import anyio
import pytest

from multilane.lanes import LaneMetrics
from multilane.server.lanes_page import TokenRates
from multilane.server.recent_runs import RecentRunBuffer, RunSummary
from multilane.testing import FakeGenerateEngine

pytestmark = pytest.mark.anyio

SPEC = """
models:
  assistant: {kind: generate, source: ./assistant, parallel: 2, keep_alive: 5m}
  embedder: {kind: embedding, source: ./embedder, keep_alive: -1}
  spare: {kind: generate, source: ./spare}
runtime: {max_queue: 4, memory_budget: 1GiB}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      topic: {kind: embed, model: embedder, text: "{{ inputs.question }}"}
      draft: {kind: reason, model: assistant, prompt: "Q: {{ inputs.question }}", max_tokens: 16}
      answer: {kind: reason, model: assistant, prompt: "{{ stages.draft.text }} {{ stages.topic.dimension }}",
               max_tokens: 16}
    output: "{{ stages.answer.text }}"
  extract:
    inputs: {text: str}
    stages:
      fields:
        kind: tool_call
        model: assistant
        prompt: "{{ inputs.text }}"
        schema: {type: object, properties: {year: {type: integer}}, required: [year]}
"""


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


async def test_before_any_call_only_the_pinned_lane_is_loaded_and_every_model_is_listed(serve: Any) -> None:
    async with serve(SPEC) as s:
        body = (await s.client.get("/v1/lanes")).json()

    assert [lane["name"] for lane in body["lanes"]] == ["embedder"]  # keep_alive -1 loads at start
    assert body["lanes"][0]["expires_at"] == "forever" and body["lanes"][0]["expires_in"] is None
    models = by_name(body["models"])
    assert set(models) == {"assistant", "embedder", "spare"}
    assert not models["assistant"]["loaded"] and models["embedder"]["lane"] == "embedder"
    assert body["usage"]["budget_bytes"] == 1024**3 and body["usage"]["max_loaded_models"] == 3
    assert body["runs"] == [] and body["rate_window_seconds"] > 0


async def test_a_call_shows_in_its_lanes_counters_tokens_per_second_and_keep_alive_countdown(serve: Any) -> None:
    async with serve(SPEC, assistant=FakeGenerateEngine("one two three four")) as s:
        r = await s.client.post("/v1/chat/completions", json={
            "model": "assistant", "messages": [{"role": "user", "content": "Count"}], "max_tokens": 8})
        body = (await s.client.get("/v1/lanes")).json()

    assert r.status_code == 200
    lane = by_name(body["lanes"])["assistant"]
    assert (lane["busy"], lane["slots"], lane["queued"], lane["max_queue"]) == (0, 2, 0, 4)
    assert lane["requests"] == 1 and lane["completion_tokens"] == 4 and lane["prompt_tokens"] > 0
    assert lane["tokens_per_second"] > 0  # four tokens within the last few seconds
    assert 0 < lane["expires_in"] <= 300 and lane["keep_alive"] == "5m"
    assert lane["memory_bytes"] == lane["weights_bytes"] + lane["kv_bytes"]
    assert by_name(body["models"])["assistant"]["completion_tokens"] == 4


async def test_a_running_call_holds_a_slot_and_stops_the_keep_alive_clock(serve: Any,
                                                                          held: Callable[..., Any]) -> None:
    engine = held("slow reply here")
    async with serve(SPEC, assistant=engine) as s, anyio.create_task_group() as tg:
        call = {"model": "assistant", "prompt": "Hi", "max_tokens": 8}
        tg.start_soon(functools.partial(s.client.post, "/v1/completions", json=call))
        await engine.holding.wait()
        during = by_name((await s.client.get("/v1/lanes")).json()["lanes"])["assistant"]
        engine.release.set()

    assert (during["busy"], during["slots"]) == (1, 2)
    assert during["expires_in"] is None  # in use: the clock starts when the lane goes idle
    assert during["requests"] == 1


async def test_pipeline_runs_appear_newest_first_with_their_stage_timelines(serve: Any) -> None:
    async with serve(SPEC, assistant=FakeGenerateEngine("the answer")) as s:
        whole = await s.client.post("/v1/pipelines/ask/runs", json={"inputs": {"question": "What?"}})
        streamed = await s.client.post("/v1/pipelines/ask/runs",
                                       json={"inputs": {"question": "Again?"}, "stream": True})
        runs = (await s.client.get("/v1/lanes")).json()["runs"]
        one = (await s.client.get("/v1/lanes", params={"runs": 1})).json()["runs"]

    assert whole.status_code == 200 and streamed.status_code == 200
    assert [run["status"] for run in runs] == ["finished", "finished"]
    assert runs[1]["run_id"] == whole.json()["run_id"]  # the first run is the older one
    assert runs[0]["run_id"] and runs[0]["run_id"] != runs[1]["run_id"]
    assert one == runs[:1]
    for run in runs:
        stages = {span["stage"]: span for span in run["stages"]}
        assert set(stages) == {"topic", "draft", "answer"}
        assert (stages["topic"]["kind"], stages["topic"]["model"]) == ("embed", "embedder")
        assert (stages["draft"]["kind"], stages["draft"]["model"]) == ("reason", "assistant")
        assert stages["draft"]["tokens"] == 2 and stages["topic"]["tokens"] is None
        # answer reads draft: on the timeline it starts when draft has finished
        assert stages["answer"]["start"] >= stages["draft"]["start"] + stages["draft"]["seconds"] - 1e-3
        assert all(span["ok"] and span["seconds"] >= 0 for span in stages.values())
        assert run["seconds"] >= stages["answer"]["start"] + stages["answer"]["seconds"] - 1e-3


async def test_a_failed_run_is_listed_with_its_error_and_bad_inputs_are_not(serve: Any) -> None:
    async with serve(SPEC, assistant=FakeGenerateEngine(lambda prompt, options: "no json here")) as s:
        failed = await s.client.post("/v1/pipelines/extract/runs", json={"inputs": {"text": "Built in 1887."}})
        streamed = await s.client.post("/v1/pipelines/extract/runs",
                                       json={"inputs": {"text": "Built in 1887."}, "stream": True})
        refused = await s.client.post("/v1/pipelines/extract/runs", json={"inputs": {}})
        runs = (await s.client.get("/v1/lanes")).json()["runs"]

    assert failed.status_code == 500 and streamed.status_code == 200 and refused.status_code == 422
    assert [run["status"] for run in runs] == ["failed", "failed"]
    assert all("not valid JSON" in run["error"] for run in runs)
    assert [span["stage"] for span in runs[0]["stages"]] == ["fields"] and not runs[0]["stages"][0]["ok"]


async def test_the_recent_runs_buffer_keeps_the_newest_runs_only() -> None:
    buffer = RecentRunBuffer(size=3)
    for i in range(5):
        buffer.record(RunSummary(f"run-{i}", "ask", "finished", 1000.0 + i, 0.5))

    assert [run.run_id for run in await buffer.recent(10)] == ["run-4", "run-3", "run-2"]
    assert [run.run_id for run in await buffer.recent(1)] == ["run-4"]


def test_tokens_per_second_is_measured_over_the_last_window_of_counters() -> None:
    now = [0.0]
    metrics = {"assistant": LaneMetrics(), "embedder": LaneMetrics()}
    rates = TokenRates(metrics, window=10.0, clock=lambda: now[0])
    rates.sample()
    assert rates.rates()["assistant"] == (0.0, 0.0)  # one sample: nothing to measure yet
    for _ in range(20):  # 20 s at 50 tokens and 2 calls a second
        now[0] += 1.0
        metrics["assistant"].completion_tokens += 50
        metrics["assistant"].requests += 2
        metrics["embedder"].requests += 1
        rates.sample()
    assert rates.rates()["assistant"] == (50.0, 2.0)
    assert rates.rates()["embedder"] == (0.0, 1.0)
    for _ in range(10):  # then 10 s with nothing: the window has forgotten the busy seconds
        now[0] += 1.0
        rates.sample()
    assert rates.rates()["assistant"] == (0.0, 0.0)


async def test_the_page_and_its_files_are_open_and_the_lanes_need_the_key(serve: Any) -> None:
    async with serve(SPEC, api_key="s3cret") as s:
        page = await s.client.get("/")
        script = await s.client.get("/static/lanes.js")
        style = await s.client.get("/static/lanes.css")
        missing = await s.client.get("/v1/lanes")
        keyed = await s.client.get("/v1/lanes", headers={"Authorization": "Bearer s3cret"})
        elsewhere = await s.client.get("/static/%2e%2e/v1/lanes")  # the server sees /static/../v1/lanes
        models = await s.client.get("/v1/models")

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'src="/static/lanes.js"' in page.text and 'href="/static/lanes.css"' in page.text
    assert script.status_code == 200 and "/v1/lanes" in script.text
    assert style.status_code == 200
    assert missing.status_code == 401 and keyed.status_code == 200
    assert elsewhere.status_code == 404 and "usage" not in elsewhere.text  # no way around the key
    assert models.status_code == 401  # API clients still need the key as before


def test_the_page_fetches_nothing_from_elsewhere() -> None:
    static = files("multilane.server") / "static"
    names = sorted(entry.name for entry in static.iterdir())
    assert names == ["favicon.svg", "index.html", "lanes.css", "lanes.js"]
    for name in names:
        text = (static / name).read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), name
        assert "@import" not in text and "innerHTML" not in text, name
