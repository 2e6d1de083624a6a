"""The journal after SIGKILLs at random moments (seeded): still readable, consistent, and every run resumable.

Processes on fake engines run and resume pipelines concurrently and are killed at seeded random moments; after
each kill the journal must pass SQLite's integrity and foreign-key checks and hold only whole records, and a
last process resumes every interrupted run to the output a run without kills gives.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from multilane.journal import list_runs, load_run

SEED = 20251125
KILLS = 6
NEW_RUNS = 5  # per process

SCRIPT = textwrap.dedent('''
    import json, re, sys
    from pathlib import Path

    import anyio

    from multilane import Runtime, parse_spec
    from multilane.logs import configure_logging
    from multilane.testing import FakeGenerateEngine

    SPEC = """
    models:
      assistant: {kind: generate, source: ./assistant}
    runtime: {journal: JOURNAL}
    pipelines:
      fan:
        inputs: {topic: str}
        stages:
          plan:
            kind: tool_call
            model: assistant
            prompt: "Plan questions about {{ inputs.topic }}"
            schema: {type: object, properties: {qs: {type: array, items: {type: string}}}, required: [qs]}
          each: {kind: reason, model: assistant, for_each: stages.plan.json.qs, max_concurrency: 2,
                 prompt: "Answer {{ item }} about {{ inputs.topic }}"}
          summary: {kind: reason, model: assistant, prompt: "Sum up {{ stages.each['items'] | length }} answers"}
        output: "{{ inputs.topic }}: {{ stages.each['items'] | map(attribute='text') | join(', ') }}"
    """


    def reply(prompt, options):
        if "Plan questions" in prompt:
            return json.dumps({"qs": ["q0", "q1", "q2", "q3"]})
        asked = re.search(r"Answer (\\S+)", prompt)
        return "re " + asked.group(1) if asked else "summed"


    async def main(first, count):
        spec = parse_spec(SPEC, "kills.yaml", Path.cwd())
        engine = FakeGenerateEngine(reply, token_delay=0.04)

        async def engines(name, spec):
            return engine

        async with Runtime(spec, engines=engines) as rt:
            interrupted = [run.run_id for run in await rt.journal.runs(limit=1000)
                           if run.status in ("interrupted", "cancelled")]
            print("started", flush=True)
            async with anyio.create_task_group() as tg:
                for run_id in interrupted:
                    tg.start_soon(rt.resume, run_id)
                for i in range(first, first + count):
                    tg.start_soon(rt.run, "fan", {"topic": f"topic-{i}"})
        print("done", flush=True)


    if __name__ == "__main__":
        configure_logging(0)
        anyio.run(main, int(sys.argv[1]), int(sys.argv[2]))
''')


def expected_output(topic: str) -> str:
    return f"{topic}: re q0, re q1, re q2, re q3"


def check_consistent(journal: Path) -> None:
    """SQLite finds nothing wrong, every row is whole JSON, and a finished step's children finished before it."""
    with sqlite3.connect(journal) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        for attrs, result, ok in db.execute("SELECT attrs, result, ok FROM steps"):
            json.loads(attrs)
            assert (result is not None) == bool(ok)
            if result is not None:
                json.loads(result)
    for run in list_runs(journal, limit=10_000):
        steps = load_run(journal, run.run_id).steps
        for path, step in steps.items():
            if step.kind == "stage" and step.ok and path == "stage:each":
                assert all(steps[f"stage:each/item:{i}"].ok for i in range(4)), run.run_id
            if step.kind == "item" and step.ok:
                assert steps[f"{path}/model"].ok
        if run.status == "finished":
            assert run.output == expected_output(run.inputs["topic"])
            assert {p for p, s in steps.items() if s.ok and s.kind == "stage"} == {
                "stage:plan", "stage:each", "stage:summary"}


def start(script: Path, first: int, count: int) -> subprocess.Popen[str]:
    """Start a process that resumes the interrupted runs and starts `count` new ones; return once it is running."""
    log = script.parent / "runs.log"
    with log.open("a") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(first), str(count)], cwd=script.parent,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "started", log.read_text()[-3000:]
    return proc


def test_the_journal_stays_consistent_through_random_kills_and_every_run_resumes(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    script = tmp_path / "runs.py"
    script.write_text(SCRIPT.replace("JOURNAL", str(journal)))
    rng = random.Random(SEED)
    killed_mid_run = 0
    for kill in range(KILLS):
        proc = start(script, kill * NEW_RUNS, NEW_RUNS)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        check_consistent(journal)
        killed_mid_run += bool(list_runs(journal, status="interrupted"))

    assert killed_mid_run >= KILLS // 2  # the seed makes most kills land while runs are under way
    last = start(script, 0, 0)
    assert last.stdout is not None
    out = last.stdout.read()
    assert last.wait(120) == 0 and out.strip() == "done", (tmp_path / "runs.log").read_text()[-3000:]

    check_consistent(journal)
    runs = list_runs(journal, limit=10_000)
    assert runs and all(run.status == "finished" for run in runs), [(r.run_id, r.status) for r in runs]
    assert sorted(run.inputs["topic"] for run in runs) == sorted({run.inputs["topic"] for run in runs})
    assert any(run.attempts > 1 for run in runs)  # some runs were resumed after a kill
