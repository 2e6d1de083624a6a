"""The fault soak on the real stack (bench/soak.py): eviction, cancels, a killed engine core, a server's SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def test_a_soak_with_eviction_cancels_a_killed_engine_and_sigterm_loses_no_call_and_leaves_no_process(
        leftovers: Any) -> None:
    proc = subprocess.Popen([sys.executable, "bench/soak.py", "--seed", "1", "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=850)  # a guard against a hang, under pytest's own 900 s
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its engines and its server: all in its session
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    figures = json.loads(out.strip().splitlines()[-1])
    runtime, serve = figures["runtime"], figures["serve"]

    # Part one: 64 calls under a budget for one generate model at a time, a quarter cancelled, one core killed.
    assert runtime["calls"] == 64
    assert runtime["lost"] == 0, figures
    assert runtime["unnamed_errors"] == {}, figures  # every failure is a named MultilaneError
    assert runtime["completed"] > 0 and runtime["cancelled"] > 0, figures
    assert runtime["completed"] + runtime["cancelled"] + sum(runtime["named_errors"].values()) == 64
    assert len(runtime["engines_killed"]) == 1, figures
    assert runtime["evictions"]["smol"] >= 1, figures  # the budget held one generate model: gemma evicted smol
    assert runtime["engine_processes_left"] == [], figures

    # Part two: every HTTP call got a 200 or a 503 with Retry-After; the server exited cleanly, leaving nothing.
    assert serve["lost"] == 0 and serve["other"] == 0, figures
    assert serve["ok"] > 0 and serve["refused_503"] > 0, figures
    assert serve["refused_503_without_retry_after"] == 0, figures
    assert serve["refused_shutting_down"] > 0, figures  # SIGTERM found calls queued and refused them
    assert serve["exit_code"] == 0 and serve["tracebacks"] == 0, figures
    assert serve["processes_left"] == [], figures

    assert figures["lost"] == 0 and figures["engine_processes_left"] == 0
    remaining = leftovers(proc.pid)  # nothing of the driver's session outlived it either
    assert remaining == [], f"processes outlived the soak: {remaining}"
