"""The main job from the command line, as a user runs it: a real process, real models, clean exit."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "multilane.cli"]


def test_cli_runs_the_example_rag_pipeline_prints_only_the_answer_and_leaves_no_process_behind(
        leftovers: Any, request: pytest.FixtureRequest) -> None:
    # The run's own temp folder, to see what it leaves there; short, since a unix socket's path is.
    temp = Path(tempfile.mkdtemp(prefix="cli-"))
    request.addfinalizer(lambda: shutil.rmtree(temp, ignore_errors=True))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_RPC_BASE_PATH"} | {"TMPDIR": str(temp)}
    proc = subprocess.Popen(
        [*CLI, "run", "pipelines/rag.yaml", "ask", "--input", "question=Who built the lighthouse at Cape Orrin?"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    out, err = proc.communicate(timeout=600)

    assert proc.returncode == 0, err[-3000:]
    answer, _, passages = out.partition("\n\nPassages used:\n")
    assert "Holloway" in answer
    assert "history/cape-orrin-lighthouse.md" in passages
    # stdout is the output template and nothing else: no vLLM notices, no progress bars.
    assert all(re.fullmatch(r"  \[\d\] \S+ \(score \d\.\d\d\)", line) for line in passages.strip("\n").splitlines())
    assert "WARNING" not in answer and "pid=" not in answer
    # stderr: nothing (no logs, no library start-up noise, no leaked-resource warning at exit, and no progress,
    # which is drawn only when stderr is a terminal).
    assert err == ""
    remaining = leftovers(proc.pid)
    assert remaining == [], f"engine processes outlived the CLI: {remaining}"
    # vLLM's ZeroMQ sockets went to the process's own folder, which is gone with it.
    sockets = [p for p in temp.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
    assert sockets == [] and not list(temp.glob("multilane-vllm-*")), sorted(temp.rglob("*"))


def test_cli_reports_a_spec_error_with_file_and_line_and_no_traceback(tmp_path: Path) -> None:
    spec = (ROOT / "pipelines" / "rag.yaml").read_text().replace("model: assistant", "model: asistant")
    broken = tmp_path / "rag.yaml"
    broken.write_text(spec)
    line = next(i for i, text in enumerate(spec.splitlines(), 1) if "model: asistant" in text)

    done = subprocess.run([*CLI, "run", str(broken), "ask", "-i", "question=hi"], capture_output=True, text=True,
                          timeout=120)

    assert done.returncode == 1
    assert f"rag.yaml:{line} pipelines.ask.stages.answer.model: unknown model 'asistant'" in done.stderr
    assert "Traceback" not in done.stderr

