"""`multilane runs list|show|resume|replay` on fake engines: what a user sees, and exit codes."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from click.testing import Result
from typer.testing import CliRunner

from multilane import Runtime, SamplingOptions, load_spec
from multilane.cli import app
from multilane.testing import FakeGenerateEngine

T = TypeVar("T")

FAN = """
models:
  assistant: {kind: generate, source: ./assistant}
runtime: {journal: runs.db}
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
      summary: {kind: reason, model: assistant, prompt: "Sum up {{ stages.each['items'] | length }} answers"}
    output: "{{ stages.summary.text }}"
"""


def reply(prompt: str, options: SamplingOptions) -> str:
    if "Plan questions" in prompt:
        return json.dumps({"qs": ["q0", "q1", "q2"]})
    return "re " + prompt.split()[-2].strip("<>")


def in_thread(fn: Callable[[], Awaitable[T]]) -> T:
    """Run async code as a user's program would: in a thread of its own, with no event loop already running."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(anyio.run, fn).result()


def invoke(*args: str) -> Result:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(CliRunner().invoke, app, list(args)).result()


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "fan.yaml"
    path.write_text(FAN)
    return path


class Engines:
    """Fake engines for the CLI's runtimes (Runtime.from_file is given them); counts the calls they get."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on

        def answer(prompt: str, options: SamplingOptions) -> str:
            if self.fail_on is not None and self.fail_on in prompt:
                raise RuntimeError("engine hiccup")
            return reply(prompt, options)

        self.engine = FakeGenerateEngine(answer)

    async def __call__(self, name: str, spec: Any) -> Any:
        return self.engine


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> Engines:
    made = Engines()
    original = Runtime.from_file.__func__  # type: ignore[attr-defined]

    def from_file(cls: type[Runtime], path: Any, **kwargs: Any) -> Runtime:
        kwargs.setdefault("engines", made if not kwargs.get("offline") else None)
        return original(cls, path, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(Runtime, "from_file", classmethod(from_file))
    return made


def record(pipeline: Path, engines: Engines, topic: str, *, fail_on: str | None = None) -> str:
    """Run the pipeline once (failing at the call whose prompt holds `fail_on`); returns the run's id."""
    engines.fail_on = fail_on

    async def go() -> str:
        async with Runtime.from_file(pipeline) as rt:
            try:
                return (await rt.run("fan", topic=topic)).run_id
            except Exception:
                assert rt.journal is not None
                return (await rt.journal.runs(limit=1))[0].run_id

    run_id = in_thread(go)
    engines.fail_on = None
    return run_id


def test_runs_list_shows_each_run_newest_first_and_filters(pipeline: Path, engines: Engines) -> None:
    done = record(pipeline, engines, "otters")
    failed = record(pipeline, engines, "lava", fail_on="q1")

    shown = invoke("runs", "list", "--file", str(pipeline))
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].split() == ["RUN", "PIPELINE", "STATUS", "STARTED", "SECONDS", "ATTEMPTS"]
    assert lines[1].split()[:3] == [failed, "fan", "failed"] and lines[2].split()[:3] == [done, "fan", "finished"]

    as_json = invoke("runs", "list", "--journal", str(pipeline.parent / "runs.db"), "--status", "failed", "--json")
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.output)
    assert [(r["run_id"], r["status"], r["inputs"]) for r in rows] == [(failed, "failed", {"topic": "lava"})]


def test_runs_show_prints_stages_errors_and_output(pipeline: Path, engines: Engines) -> None:
    failed = record(pipeline, engines, "lava", fail_on="q1")

    shown = invoke("runs", "show", failed, "-f", str(pipeline))
    assert shown.exit_code == 0, shown.output
    assert f"run {failed}: pipeline 'fan', failed" in shown.output
    rows = [line.split()[:3] for line in shown.output.splitlines()]
    assert ["plan", "tool_call", "ok"] in rows and ["each", "reason", "failed"] in rows
    assert "stage:each/item:1/model: RuntimeError: engine hiccup" in shown.output

    as_json = json.loads(invoke("runs", "show", failed, "-f", str(pipeline), "--json").output)
    assert [(s["stage"], s["status"], s["items"], s["items_failed"]) for s in as_json["stages"]] == [
        ("plan", "ok", 0, 0), ("each", "failed", 1, 1), ("summary", "pending", 0, 0)]


def test_runs_show_of_an_unknown_run_or_journal_exits_1_saying_so(pipeline: Path, tmp_path: Path,
                                                                    engines: Engines) -> None:
    record(pipeline, engines, "otters")
    unknown = invoke("runs", "show", "nope", "-f", str(pipeline))
    assert unknown.exit_code == 1
    assert "error: no run 'nope' in the journal at" in unknown.output and "Traceback" not in unknown.output
    missing = invoke("runs", "list", "--journal", str(tmp_path / "none.db"))
    assert missing.exit_code == 1 and f"error: no journal at {tmp_path / 'none.db'}" in missing.output


def test_runs_resume_finishes_a_failed_run_without_repeating_what_finished(pipeline: Path,
                                                                           engines: Engines) -> None:
    failed = record(pipeline, engines, "lava", fail_on="q1")
    before = len(engines.engine.calls)

    resumed = invoke("runs", "resume", failed, "--journal", str(pipeline.parent / "runs.db"))

    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.strip() == "re answers"
    assert [c.prompt.split()[-2] for c in engines.engine.calls[before:]] == ["q1", "q2", "answers"]
    again = invoke("runs", "resume", failed, "--journal", str(pipeline.parent / "runs.db"))
    assert again.exit_code == 1 and f"run '{failed}' already finished" in again.output


def test_runs_resume_refuses_a_changed_file_unless_forced(pipeline: Path, engines: Engines) -> None:
    failed = record(pipeline, engines, "lava", fail_on="q1")
    pipeline.write_text(FAN.replace("Sum up", "Summarise"))
    journal = str(pipeline.parent / "runs.db")

    refused = invoke("runs", "resume", failed, "--journal", journal)
    assert refused.exit_code == 1
    assert f"was started with a different version of {pipeline}" in refused.output

    forced = invoke("runs", "resume", failed, "--journal", journal, "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output)["run_id"] == failed


def test_runs_replay_prints_the_recorded_output_and_loads_no_model(pipeline: Path, engines: Engines) -> None:
    done = record(pipeline, engines, "otters")
    calls = len(engines.engine.calls)
    load_spec(pipeline)  # the file still loads as it is

    replayed = invoke("runs", "replay", done, "-f", str(pipeline), "--json")

    assert replayed.exit_code == 0, replayed.output
    result = json.loads(replayed.output)
    assert (result["run_id"], result["output"]) == (done, "re answers")
    assert len(engines.engine.calls) == calls  # the offline runtime got no engine at all
