"""The `multilane` command: exit codes and messages a user sees, with fake engines instead of real models."""

from __future__ import annotations

import json
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

import multilane.runtime
from multilane.cli import app
from multilane.lanes import LanePlan
from multilane.spec import Spec
from multilane.testing import FakeEmbeddingEngine, FakeGenerateEngine

PIPELINE = """
models:
  embedder: {kind: embedding, source: ./embedder}
  assistant: {kind: generate, source: ./assistant}
indexes:
  docs: {embedder: embedder, documents: "docs/*.md", chunk_tokens: 32, chunk_overlap: 4}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: docs, query: "{{ inputs.question }}", top_k: 1}
      answer: {kind: reason, model: assistant, prompt: "{{ stages.passages.text }} {{ inputs.question }}"}
    output: "{{ stages.answer.text }}"
"""


class ThreadedCliRunner(CliRunner):
    """Invokes the CLI in a fresh thread, as a user's shell would: with no event loop already running.

    In a full test session, the integration tests keep a session-wide event loop open on the main thread.
    """

    def invoke(self, *args: Any, **kwargs: Any) -> Result:  # type: ignore[override]
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(super().invoke, *args, **kwargs).result()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    """A runner whose cached indexes go under tmp_path."""
    monkeypatch.setenv("MULTILANE_HOME", str(tmp_path / "home"))
    return ThreadedCliRunner()


@pytest.fixture
def fake_models(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make the CLI's runtimes load fake engines; returns how many engines were made per model."""
    loads: dict[str, int] = {}

    async def plan_fake(name: str, spec: Spec) -> LanePlan:
        model = spec.model(name)

        async def load() -> Any:
            loads[name] = loads.get(name, 0) + 1
            if model.kind == "embedding":
                return FakeEmbeddingEngine()
            return FakeGenerateEngine("Lava is surface magma.")

        return LanePlan((name,), model.kind, model.source, load, parallel=model.parallel, context=model.context,
                        dtype="float32" if model.kind == "generate" else None)

    monkeypatch.setattr(multilane.runtime, "plan_model", plan_fake)
    return loads


def write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def write_docs(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "lava.md").write_text("# Lava\n\nMagma that reaches the surface is called lava.\n")


def test_validate_accepts_a_good_file(cli: CliRunner, tmp_path: Path) -> None:
    result = cli.invoke(app, ["validate", str(write(tmp_path, PIPELINE))])

    assert result.exit_code == 0, result.output
    assert "ok" in result.stdout
    assert "2 models, 1 indexes, 1 pipelines" in result.stdout


def test_validate_reports_malformed_yaml_with_file_and_line_and_no_traceback(cli: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  a: {kind: generate, source: x\n  b: 1\n")
    result = cli.invoke(app, ["validate", str(path)])

    assert result.exit_code == 1
    assert f"{path}:3" in result.stderr
    assert "invalid YAML" in result.stderr
    assert "Traceback" not in result.output


def test_validate_reports_an_unknown_model_with_its_field_path(cli: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, PIPELINE.replace("model: assistant", "model: assistent"))
    result = cli.invoke(app, ["validate", str(path)])

    assert result.exit_code == 1
    assert "pipelines.ask.stages.answer.model" in result.stderr
    assert "unknown model 'assistent'" in result.stderr
    assert "Traceback" not in result.output


AGENT_PIPELINE = """
models:
  assistant: {kind: generate, source: ./assistant}
pipelines:
  ask:
    stages:
      work: {kind: agent, agent: helper, task: hi}
"""


def test_validate_imports_the_agents_but_loads_no_model(cli: CliRunner, tmp_path: Path,
                                                         fake_models: dict[str, int]) -> None:
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "helper.py").write_text(
        "from pathlib import Path\nfrom multilane import Agent\n"
        "Path(__file__).with_name('imported').touch()\nhelper = Agent('helper', 'assistant')\n")
    result = cli.invoke(app, ["validate", str(write(tmp_path, AGENT_PIPELINE))])

    assert result.exit_code == 0, result.output
    assert "1 models, 0 indexes, 1 pipelines, 1 agents" in result.stdout
    assert (tmp_path / "agents" / "imported").exists() and fake_models == {}
    help_text = " ".join(cli.invoke(app, ["validate", "--help"]).stdout.split())
    assert "load no model and build no index" in help_text and "Python files" in help_text


def test_validate_reports_a_broken_agent_file_at_its_line(cli: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "helper.py").write_text("import multilane\n\nraise RuntimeError('half written')\n")
    result = cli.invoke(app, ["validate", str(write(tmp_path, AGENT_PIPELINE))])

    assert result.exit_code == 1
    assert f"{tmp_path / 'agents' / 'helper.py'}:3: cannot load agents: RuntimeError: half written" in result.stderr
    assert "Traceback" not in result.output


def test_run_unknown_pipeline_exits_1(cli: CliRunner, tmp_path: Path, fake_models: dict[str, int]) -> None:
    result = cli.invoke(app, ["run", str(write(tmp_path, PIPELINE)), "nope", "-i", "question=hi"])

    assert result.exit_code == 1
    assert "unknown pipeline 'nope'" in result.stderr
    assert not fake_models  # nothing was loaded


def test_run_missing_input_exits_1_naming_it(cli: CliRunner, tmp_path: Path, fake_models: dict[str, int]) -> None:
    result = cli.invoke(app, ["run", str(write(tmp_path, PIPELINE)), "ask"])

    assert result.exit_code == 1
    assert "missing input 'question'" in result.stderr
    assert "Traceback" not in result.output


def test_run_input_without_equals_sign_is_a_usage_error(cli: CliRunner, tmp_path: Path,
                                                        fake_models: dict[str, int]) -> None:
    result = cli.invoke(app, ["run", str(write(tmp_path, PIPELINE)), "ask", "-i", "question"])

    assert result.exit_code == 2
    assert "key=value" in result.stderr


def test_index_build_with_documents_matching_nothing_exits_1(cli: CliRunner, tmp_path: Path,
                                                            fake_models: dict[str, int]) -> None:
    result = cli.invoke(app, ["index", "build", str(write(tmp_path, PIPELINE)), "docs"])

    assert result.exit_code == 1
    assert "no files match" in result.stderr
    assert "docs/*.md" in result.stderr
    assert "Traceback" not in result.output


def test_index_build_with_fakes_reports_the_index(cli: CliRunner, tmp_path: Path,
                                                  fake_models: dict[str, int]) -> None:
    write_docs(tmp_path)
    result = cli.invoke(app, ["index", "build", str(write(tmp_path, PIPELINE)), "docs"])

    assert result.exit_code == 0, result.output
    assert "index 'docs'" in result.stdout
    assert "1 documents" in result.stdout
    assert fake_models == {"embedder": 1}  # building an index loads only its embedder


def test_run_prints_the_output(cli: CliRunner, tmp_path: Path, fake_models: dict[str, int]) -> None:
    write_docs(tmp_path)
    result = cli.invoke(app, ["run", str(write(tmp_path, PIPELINE)), "ask", "-i", "question=what is lava?"])

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "Lava is surface magma."


def test_run_logs_nothing_by_default_and_its_progress_with_v(cli: CliRunner, tmp_path: Path,
                                                              fake_models: dict[str, int]) -> None:
    write_docs(tmp_path)
    path = str(write(tmp_path, PIPELINE))
    args = ["run", path, "ask", "-i", "question=what is lava?"]
    quiet = cli.invoke(app, args)
    verbose = cli.invoke(app, [*args, "-v"])
    debug = cli.invoke(app, [*args, "-vv"])

    assert quiet.exit_code == verbose.exit_code == debug.exit_code == 0
    # Without -v: the answer on stdout and nothing on stderr (progress is drawn only on a terminal).
    assert quiet.stderr == ""
    for result in (verbose, debug):
        assert result.stdout.strip() == "Lava is surface magma."  # logs never go to stdout
        assert "run started" in result.stderr and "pipeline=ask" in result.stderr
    assert "stage started" not in verbose.stderr  # a debug event
    assert "stage started" in debug.stderr


def test_run_json_prints_the_whole_result(cli: CliRunner, tmp_path: Path, fake_models: dict[str, int]) -> None:
    write_docs(tmp_path)
    result = cli.invoke(app, ["run", str(write(tmp_path, PIPELINE)), "ask", "-i", "question=what is lava?",
                              "--json"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["output"] == "Lava is surface magma."
    assert data["run_id"]
    assert set(data["stages"]) == {"passages", "answer"}
    assert {e["stage"] for e in data["events"]} == {"passages", "answer"}


def test_run_trace_draws_the_run_as_a_waterfall_on_stderr_and_leaves_stdout_the_answer(
        cli: CliRunner, tmp_path: Path, fake_models: dict[str, int]) -> None:
    write_docs(tmp_path)
    result = cli.invoke(app, ["run", str(write(tmp_path, PIPELINE)), "ask", "-i", "question=what is lava?",
                              "--trace"])

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "Lava is surface magma."
    lines = result.stderr.rstrip().splitlines()
    assert lines[0].startswith("trace ") and " · run " in lines[0]
    assert lines[1].split()[0] == "step"
    rows = lines[2:-1]
    assert [" ".join(line.split()[:2]) for line in rows] == [
        "invoke_workflow ask", "stage passages", "retrieval docs", "open_index docs", "embeddings embedder",
        "stage answer", "chat assistant"]
    assert rows[0].startswith("invoke_workflow ask") and rows[1].startswith("  stage passages")  # nested
    chat = rows[-1]
    assert "█" in chat
    assert "tok" in chat and "load" in chat and "ttft" in chat  # the call that loaded the model says so
    assert "built, 1 chunks" in rows[3]
    assert "waiting for the model to load" in lines[-1]  # the legend


def test_run_trace_of_a_failing_run_shows_where_it_failed(cli: CliRunner, tmp_path: Path,
                                                          fake_models: dict[str, int]) -> None:
    path = write(tmp_path, PIPELINE.replace('documents: "docs/*.md"', 'documents: "nothing/*.md"'))
    result = cli.invoke(app, ["run", str(path), "ask", "-i", "question=what is lava?", "--trace"])

    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    failed = [line.split()[:2] for line in lines if "✗" in line]
    assert failed == [["invoke_workflow", "ask"], ["stage", "passages"], ["retrieval", "docs"],
                      ["open_index", "docs"]]
    build = next(line for line in lines if line.strip().startswith("open_index docs"))
    assert "✗ IndexBuildError: no files match" in build  # the message where it arose; above, only "failed"
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_index_build_with_a_missing_model_source_says_not_found(cli: CliRunner, tmp_path: Path) -> None:
    write_docs(tmp_path)
    path = write(tmp_path, PIPELINE.replace("source: ./embedder", "source: ./missing-model"))
    result = cli.invoke(app, ["index", "build", str(path), "docs"])  # the real engine loader

    assert result.exit_code == 1
    assert "not found" in result.stderr
    assert str(tmp_path / "missing-model") in result.stderr
    assert "Traceback" not in result.output


def test_ps_shows_the_loaded_lane_and_every_models_cost(cli: CliRunner, tmp_path: Path,
                                                         fake_models: dict[str, int]) -> None:
    result = cli.invoke(app, ["ps", str(write(tmp_path, PIPELINE)), "--load", "assistant"])

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "KIND", "DEVICE", "DTYPE"]
    assert lines[1].split()[:4] == ["assistant", "generate", "cpu", "float32"]
    assert "0/8" in lines[1]  # slots busy/total: parallel defaults to 8
    assert any(line.startswith("embedder: embedding") for line in lines)
    assert "1 of 3 lanes loaded" in result.stdout
    assert fake_models == {"assistant": 1}  # ps loads only what it was asked to


def test_ps_json_lists_lanes_and_usage(cli: CliRunner, tmp_path: Path, fake_models: dict[str, int]) -> None:
    result = cli.invoke(app, ["ps", str(write(tmp_path, PIPELINE)), "--load", "embedder", "--json"])

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [lane["name"] for lane in data["lanes"]] == ["embedder"]
    assert data["lanes"][0]["slots"] == 256  # an embedding lane admits 256 calls by default
    assert data["usage"]["loaded"] == 1


EVAL_PIPELINE = """
models:
  embedder: {kind: embedding, source: ./embedder}
  assistant: {kind: generate, source: ./assistant}
indexes:
  guide: {embedder: embedder, documents: "docs/*.md", chunk_tokens: 64, chunk_overlap: 0}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: guide, query: "{{ inputs.question }}", top_k: 2, mode: hybrid}
      answer: {kind: reason, model: assistant, prompt: "{{ stages.passages.text }} {{ inputs.question }}"}
"""
EVAL_DOCS = {"lava.md": "# Lava\nMagma that reaches the surface is called lava.\n",
             "otters.md": "# Otters\nSea otters hold hands while sleeping.\n"}
EVAL_QUESTIONS = [
    {"id": "lava", "question": "What is magma at the surface called?", "answer": "lava", "sources": ["lava.md"],
     "type": "single"},
    {"id": "moon", "question": "How far away is the moon?", "answer": "I don't know.", "type": "no_answer"},
]


def test_cli_eval_prints_the_table_and_writes_json_and_png(tmp_path: Path, cli: CliRunner,
                                                           fake_models: dict[str, int]) -> None:
    (tmp_path / "docs").mkdir()
    for name, text in EVAL_DOCS.items():
        (tmp_path / "docs" / name).write_text(text)
    spec = tmp_path / "p.yaml"
    spec.write_text(EVAL_PIPELINE)
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps(q) + "\n" for q in EVAL_QUESTIONS))

    done = cli.invoke(app, ["eval", str(spec), "ask", "--dataset", str(gold), "--retrieve-stage", "passages",
                            "--answer-stage", "answer", "--against", f"{spec}:ask", "--concurrency", "2",
                            "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png")])

    assert done.exit_code == 0, done.output
    assert "p.yaml:ask" in done.output and "recall@2" in done.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["label"] for r in report["results"]] == ["p.yaml:ask", "p.yaml:ask"]
    assert len(report["results"][0]["questions"]) == 2
    assert (tmp_path / "r.png").stat().st_size > 1000

    missing = cli.invoke(app, ["eval", str(spec), "ask", "--dataset", str(gold)])
    assert missing.exit_code == 1
    assert "error: say which stage of pipeline 'ask' retrieves and which answers" in missing.output
