"""Quiet by default: used as a library, Multilane prints nothing, and its events go to the host's logging."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog

from multilane.logs import LOGGER, route_to_logging

HOST = textwrap.dedent('''
    import json, logging, sys
    import anyio
    from multilane import Runtime, parse_spec
    from multilane.testing import FakeGenerateEngine

    SPEC = """
    models:
      assistant: {kind: generate, source: ./assistant}
    pipelines:
      ask:
        inputs: {question: str}
        stages:
          answer: {kind: reason, model: assistant, prompt: "{{ inputs.question }}"}
        output: "{{ stages.answer.text }}"
    """

    async def engines(name, spec):
        return FakeGenerateEngine("forty-two")

    async def run():
        async with Runtime(parse_spec(SPEC, file="t.yaml", base_dir="."), engines=engines) as rt:
            return await rt.run("ask", question="why?")

    quiet = anyio.run(run)  # no handler installed: nothing may be printed

    class Keep(logging.Handler):
        records = []
        def emit(self, record):
            self.records.append({"name": record.name, "level": record.levelname, "message": record.getMessage()})

    logging.getLogger().addHandler(Keep())
    logging.getLogger().setLevel(logging.DEBUG)
    loud = anyio.run(run)
    print(json.dumps({"outputs": [quiet.output, loud.output], "run_id": loud.run_id, "records": Keep.records}))
''')


def test_the_package_logger_has_a_null_handler_and_no_other() -> None:
    handlers = logging.getLogger(LOGGER).handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    assert all(isinstance(h, logging.NullHandler) for h in handlers)


def test_a_run_prints_nothing_without_a_handler_and_its_events_reach_the_handler_a_host_installs(
        tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(HOST)

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a log line, not a warning
    body = json.loads(done.stdout)  # and stdout holds only what the host printed
    assert body["outputs"] == ["forty-two", "forty-two"]
    records = body["records"]
    started = [r for r in records if r["message"].startswith("run started")]
    assert len(started) == 1
    assert started[0]["name"] == "multilane.pipeline.executor"
    assert started[0]["level"] == "INFO"
    assert f"run_id={body['run_id']}" in started[0]["message"]  # the run id bound in context is in the message
    assert "pipeline=ask" in started[0]["message"]
    assert any(r["level"] == "DEBUG" and r["message"].startswith("stage started") for r in records)


def test_events_follow_the_level_the_host_sets_and_keep_their_exception(caplog: pytest.LogCaptureFixture) -> None:
    structlog.reset_defaults()
    route_to_logging()
    log = structlog.get_logger("multilane.test")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        log.info("hidden", n=1)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("stage crashed", stage="answer")

    assert [r.getMessage() for r in caplog.records] == ["stage crashed stage=answer"]
    record = caplog.records[0]
    assert record.levelno == logging.ERROR and record.name == "multilane.test"
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_importing_multilane_sets_quiet_defaults_only_where_the_user_set_nothing() -> None:
    code = ("import os, multilane; print(os.environ['VLLM_LOGGING_LEVEL'], os.environ['TORCH_CPP_LOG_LEVEL'], "
            "os.environ['HF_HUB_DISABLE_PROGRESS_BARS'])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS")}

    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    asked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={**env, "VLLM_LOGGING_LEVEL": "DEBUG"})

    assert quiet.stdout.split() == ["ERROR", "ERROR", "1"]
    assert asked.stdout.split() == ["DEBUG", "ERROR", "1"]
