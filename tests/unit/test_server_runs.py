"""The journal over HTTP on fake engines: GET /v1/runs, GET /v1/runs/{id}, and resume and replay by POST."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from multilane import Runtime, SamplingOptions
from multilane.server import create_app
from multilane.testing import FakeGenerateEngine

pytestmark = pytest.mark.anyio

SPEC = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  fan:
    inputs: {topic: str}
    stages:
      plan:
        kind: tool_call
        model: assistant
        prompt: "Plan questions about {{ inputs.topic }}"
        schema: {type: object, properties: {qs: {type: array, items: {type: string}}}, required: [qs]}
      each: {kind: reason, model: assistant, for_each: stages.plan.json.qs, max_concurrency: 1,
             prompt: "Answer {{ item }}"}
    output: "{{ stages.each['items'] | map(attribute='text') | join(', ') }}"
"""


class Flaky:
    """A reply that fails calls about `q1` while `failing` is set."""

    def __init__(self) -> None:
        self.failing = True

    def __call__(self, prompt: str, options: SamplingOptions) -> str:
        if "Plan questions" in prompt:
            return json.dumps({"qs": ["q0", "q1"]})
        if self.failing and "q1" in prompt:
            raise RuntimeError("engine hiccup")
        return "re " + prompt.split()[-2].strip("<>")


@pytest.fixture
def serve(fake_runtime: Callable[..., tuple[Runtime, Any]]) -> Callable[..., Any]:
    @asynccontextmanager
    async def make(spec: str = SPEC, **engines: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
        rt, _ = fake_runtime(spec, **engines)
        app = create_app(rt, api_key="k")
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                         headers={"Authorization": "Bearer k"}) as client:
                yield client, rt

    return make


async def test_runs_are_listed_shown_resumed_and_replayed_over_http(serve: Callable[..., Any]) -> None:
    flaky = Flaky()
    engine = FakeGenerateEngine(flaky)
    async with serve(assistant=engine) as (client, _):
        failed = await client.post("/v1/pipelines/fan/runs", json={"inputs": {"topic": "lava"}})
        assert failed.status_code == 500

        listed = (await client.get("/v1/runs")).json()
        assert listed["object"] == "list" and len(listed["data"]) == 1
        run = listed["data"][0]
        assert (run["pipeline"], run["status"], run["inputs"]) == ("fan", "failed", {"topic": "lava"})
        run_id = run["run_id"]

        shown = (await client.get(f"/v1/runs/{run_id}")).json()
        assert [(s["stage"], s["status"]) for s in shown["stages"]] == [("plan", "ok"), ("each", "failed")]
        assert any("engine hiccup" in e["error"] for e in shown["errors"])

        flaky.failing = False
        before = len(engine.calls)
        resumed = await client.post(f"/v1/runs/{run_id}/resume")
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["output"] == "re q0, re q1" and resumed.json()["run_id"] == run_id
        assert [c.prompt.split()[-2] for c in engine.calls[before:]] == ["q1"]

        calls = len(engine.calls)
        replayed = await client.post(f"/v1/runs/{run_id}/replay")
        assert replayed.status_code == 200 and replayed.json()["output"] == "re q0, re q1"
        assert len(engine.calls) == calls

        again = await client.post(f"/v1/runs/{run_id}/resume", json={"force": True})
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "resume_refused"
        assert "already finished" in again.json()["error"]["message"]
        assert (await client.get("/v1/runs?status=finished&limit=5")).json()["data"][0]["run_id"] == run_id


async def test_unknown_runs_and_a_server_without_a_journal_get_clear_errors(serve: Callable[..., Any]) -> None:
    async with serve() as (client, _):
        missing = await client.get("/v1/runs/nope")
        assert missing.status_code == 404 and "no run 'nope' in the journal" in missing.json()["error"]["message"]
        assert (await client.post("/v1/runs/nope/resume")).status_code == 404
        assert (await client.get("/v1/runs?limit=0")).status_code == 422
    async with serve(SPEC.replace("models:", "runtime: {journal: off}\nmodels:")) as (client, _):
        off = await client.get("/v1/runs")
        assert off.status_code == 503 and off.json()["error"]["code"] == "journal_unavailable"
        assert "runtime.journal is off" in off.json()["error"]["message"]
