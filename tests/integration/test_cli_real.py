"""The main job from the command line, as a user runs it: a real process, real models, clean exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "multilane.cli"]


def test_cli_runs_the_example_rag_pipeline_and_leaves_no_process_behind(leftovers: Any) -> None:
    proc = subprocess.Popen(
        [*CLI, "run", "pipelines/rag.yaml", "ask", "--input", "question=Who built the lighthouse at Cape Orrin?"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = proc.communicate(timeout=600)

    assert proc.returncode == 0, err[-3000:]
    assert "Holloway" in out
    assert "Passages used:" in out
    assert "history/cape-orrin-lighthouse.md" in out
    assert "Traceback" not in err
    remaining = leftovers(proc.pid)
    assert remaining == [], f"engine processes outlived the CLI: {remaining}"


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

