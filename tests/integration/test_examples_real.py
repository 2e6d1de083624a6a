"""The programs under examples/ run as a user runs them: real processes on the real stack, with clean exits.

The two scripts use Multilane as a library through its Python API, so they also prove it quiet by default:
whatever they print is their own, and stderr stays empty (no logs, no vLLM or torch start-up notices, no
leaked-resource warning at exit).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_script(name: str, *args: str) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = proc.communicate(timeout=600)
    return proc, out, err


def test_stream_events_prints_each_stage_as_it_starts_and_finishes_and_the_answer_as_it_is_generated(
        leftovers: Any) -> None:
    proc, out, err = run_script("stream_events.py", "Who built the lighthouse at Cape Orrin?")

    assert proc.returncode == 0, err[-3000:]
    assert err == ""
    lines = out.splitlines()
    assert re.fullmatch(r"run [0-9a-f]+ started: ask", lines[0])

    def at(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    retrieve, retrieved = at("[passages] started (retrieve)"), at("[passages] finished in ")
    reason, reasoned = at("[answer] started (reason)"), at("[answer] finished in ")
    assert 0 < retrieve < retrieved < reason < reasoned == len(lines) - 2
    assert lines[retrieved].split(": ", 1)[1].startswith("../examples/data/history/cape-orrin-lighthouse.md (")
    streamed = "\n".join(lines[reason + 1:reasoned])  # the tokens, printed as they came
    assert "Holloway" in streamed
    assert re.search(r": \d+ tokens, stop$", lines[reasoned])
    assert re.fullmatch(r"run finished in \d+\.\d\ds", lines[-1])
    assert leftovers(proc.pid) == []


def test_clerk_agent_answers_from_the_guide_and_counts_days_with_its_own_tool(leftovers: Any) -> None:
    proc, out, err = run_script("clerk_agent.py")

    assert proc.returncode == 0, err[-3000:]
    assert err == ""
    lighthouse, days = out.split("question: ")[1:]
    assert lighthouse.startswith("Who built the lighthouse at Cape Orrin?\nanswer: ")
    answer = lighthouse.splitlines()[1]
    assert "Holloway" in answer  # a name only the corpus knows
    assert re.search(r"^  step 1: lookup\(\{'query': '.+'\}\) -> ok: \[1\] "
                     r"\(\.\./examples/data/history/cape-orrin-lighthouse\.md\)", lighthouse, re.MULTILINE)
    # The custom @tool: the model called it with the days from the question, and answered with its result.
    assert "\n  step 1: days_between({'first': 100, 'last': 220}) -> ok: 120\n" in days
    assert days.splitlines()[1] == "answer: 120"
    assert leftovers(proc.pid) == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_service_answers_through_one_runtime_and_closes_it_at_shutdown(tmp_path: Path, leftovers: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "service.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, str(EXAMPLES / "service.py"), "--port", str(port)], cwd=ROOT,
                                stdout=sink, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            while True:  # the lifespan builds the index and loads both models before the port opens
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    health = client.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(1)
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            assert sorted(m for lane in health.json()["lanes"] for m in lane["models"]) == ["assistant", "embedder"]

            questions = ["Who built the lighthouse at Cape Orrin?", "What is Fellrind cheese washed with?",
                         "Who built the lighthouse at Cape Orrin?"]
            with ThreadPoolExecutor(len(questions)) as pool:  # concurrent requests share the runtime's lanes
                answers = list(pool.map(lambda q: client.post("/ask", json={"question": q}), questions))
            assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
            first, cheese, again = (a.json() for a in answers)
            assert "Holloway" in first["answer"] and "Holloway" in again["answer"]
            assert first["sources"][0]["source"] == "../examples/data/history/cape-orrin-lighthouse.md"
            assert cheese["sources"][0]["source"] == "../examples/data/village/fellrind-cheese.md"
            assert len({first["run_id"], cheese["run_id"], again["run_id"]}) == 3

            bad = client.post("/ask", json={"question": ""})
            assert bad.status_code == 422
            after = client.get("/health").json()
            assert after["lanes"] == health.json()["lanes"]  # the same lanes: nothing was loaded per request
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "Application shutdown complete." in output
    assert "Traceback" not in output and "leaked" not in output
    assert leftovers(proc.pid) == []  # the lifespan closed the runtime, which stopped the engine processes
