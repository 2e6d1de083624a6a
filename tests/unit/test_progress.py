"""Progress of long work: the library reports it through a callback, the CLI draws it only on a terminal."""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import Result
from rich.console import Console
from typer.testing import CliRunner

import multilane.cli_progress
import multilane.runtime
import multilane.sources
from multilane import ProgressUpdate, Runtime, Spec
from multilane.cli import app
from multilane.cli_progress import ProgressDisplay, shown_progress
from multilane.lanes import LanePlan
from multilane.progress import reporting, step
from multilane.sources import resolve_source
from multilane.testing import FakeEmbeddingEngine, FakeGenerateEngine

PIPELINE = """
models:
  embedder: {kind: embedding, source: ./embedder}
  assistant: {kind: generate, source: ./assistant}
indexes:
  docs: {embedder: embedder, documents: "docs/*.md", chunk_tokens: 16, chunk_overlap: 0}
pipelines:
  ask:
    inputs: {question: str}
    stages:
      passages: {kind: retrieve, index: docs, query: "{{ inputs.question }}", top_k: 1}
      answer: {kind: reason, model: assistant, prompt: "{{ stages.passages.text }} {{ inputs.question }}"}
    output: "{{ stages.answer.text }}"
"""


def seen_by(updates: list[ProgressUpdate]) -> Callable[[ProgressUpdate], None]:
    return updates.append


def write_project(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    words = " ".join(f"lava{i}" for i in range(120))
    (tmp_path / "docs" / "lava.md").write_text(f"# Lava\n\n{words}\n")
    path = tmp_path / "t.yaml"
    path.write_text(textwrap.dedent(PIPELINE))
    return path


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(force_terminal=True, file=out, width=100), out


# ---- the library's hook


def test_a_step_reports_its_start_its_advances_and_its_end() -> None:
    updates: list[ProgressUpdate] = []
    with reporting(seen_by(updates)), step("index:docs", "embedding index 'docs'", total=10) as advance:
        advance(4)
        advance(10)

    assert [(u.done, u.total, u.finished) for u in updates] == [(0, 10, False), (4, 10, False), (10, 10, False),
                                                                (10, 10, True)]
    assert {u.key for u in updates} == {"index:docs"} and not any(u.failed for u in updates)


def test_a_step_that_fails_ends_as_failed_and_the_error_goes_on() -> None:
    updates: list[ProgressUpdate] = []
    with pytest.raises(RuntimeError, match="disk full"), reporting(seen_by(updates)), \
            step("convert:x", "converting x.gguf"):
        raise RuntimeError("disk full")

    assert [(u.finished, u.failed) for u in updates] == [(False, False), (True, True)]


def test_without_a_callback_a_step_reports_nothing_and_costs_nothing() -> None:
    with step("load:a", "loading model 'a'", total=3) as advance:
        advance(2)  # nowhere to go: no error


@pytest.mark.anyio
async def test_progress_reaches_work_done_in_worker_threads() -> None:
    updates: list[ProgressUpdate] = []

    def convert() -> None:
        with step("convert:m", "converting m.gguf"):
            pass

    with reporting(seen_by(updates)):
        await anyio.to_thread.run_sync(convert)

    assert [u.description for u in updates] == ["converting m.gguf", "converting m.gguf"]


# ---- what the library reports


@pytest.mark.anyio
async def test_a_runtime_reports_model_loads_and_the_chunks_an_index_build_embeds(tmp_path: Path) -> None:
    path = write_project(tmp_path)
    updates: list[ProgressUpdate] = []

    async def engines(name: str, spec: Spec) -> Any:
        return FakeEmbeddingEngine() if name == "embedder" else FakeGenerateEngine("Lava.")

    async with Runtime.from_file(path, engines=engines, index_root=tmp_path / "indexes",
                                 progress=seen_by(updates)) as rt:
        await rt.run("ask", question="what is lava?")
        first_run = list(updates)
        await rt.run("ask", question="and magma?")

    loads = [u for u in first_run if u.key.startswith("load:")]
    assert [(u.description, u.finished) for u in loads] == [
        ("loading model 'embedder'", False), ("loading model 'embedder'", True),
        ("loading model 'assistant'", False), ("loading model 'assistant'", True)]
    embedded = [u for u in first_run if u.key == "index:docs"]
    assert embedded[0].description == "embedding index 'docs'" and embedded[0].done == 0
    assert embedded[-1].finished and embedded[-1].done == embedded[-1].total and embedded[-1].total > 1
    assert updates == first_run  # the second run reuses the lanes and the index: no more progress

    reopened: list[ProgressUpdate] = []

    async with Runtime.from_file(path, engines=engines, index_root=tmp_path / "indexes",
                                 progress=reopened.append) as rt:
        await rt.index("docs")
    assert [u.key for u in reopened] == ["load:embedder", "load:embedder"]  # the saved index is reused


def test_a_gguf_conversion_is_reported_once_and_not_when_it_is_cached(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def convert(gguf: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(multilane.sources, "_convert_gguf", convert)
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    updates: list[ProgressUpdate] = []
    with reporting(seen_by(updates)):
        resolve_source("./tiny.gguf", base_dir=tmp_path, home=tmp_path / "home")
        converted = list(updates)
        resolve_source("./tiny.gguf", base_dir=tmp_path, home=tmp_path / "home")

    assert [(u.description, u.finished) for u in converted] == [
        ("converting tiny.gguf to a bf16 checkpoint (once)", False),
        ("converting tiny.gguf to a bf16 checkpoint (once)", True)]
    assert updates == converted


# ---- how the CLI shows it


def test_the_display_draws_bars_with_counts_on_a_terminal() -> None:
    console, out = terminal()
    with shown_progress(console), step("load:assistant", "loading model 'assistant'"):
        with step("index:guide", "embedding index 'guide'", total=40) as advance:
            advance(12)
        console.file.flush()

    drawn = out.getvalue()
    assert "loading model 'assistant'" in drawn
    assert "embedding index 'guide'" in drawn and "12/40" in drawn


def test_the_display_draws_nothing_when_the_console_is_not_a_terminal() -> None:
    out = io.StringIO()
    display = ProgressDisplay(Console(file=out, width=100))
    display(ProgressUpdate("load:a", "loading model 'a'"))
    display(ProgressUpdate("index:g", "embedding index 'g'", 3, 10))
    display(ProgressUpdate("load:a", "loading model 'a'", finished=True))
    display.close()

    assert out.getvalue() == ""


def test_the_display_takes_down_bars_of_work_that_failed() -> None:
    console, out = terminal()
    display = ProgressDisplay(console)
    display(ProgressUpdate("load:a", "loading model 'a'"))
    display.close()
    display(ProgressUpdate("load:b", "loading model 'b'"))  # a later piece of work draws afresh
    display(ProgressUpdate("load:b", "loading model 'b'", finished=True))

    assert "loading model 'b'" in out.getvalue()


class ThreadedCliRunner(CliRunner):
    """Invokes the CLI in a fresh thread, with no event loop already running (as in tests/unit/test_cli.py)."""

    def invoke(self, *args: Any, **kwargs: Any) -> Result:  # type: ignore[override]
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(super().invoke, *args, **kwargs).result()


@pytest.fixture
def fake_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI's runtimes load fake engines, and keep their indexes under tmp_path."""
    monkeypatch.setenv("MULTILANE_HOME", str(tmp_path / "home"))

    async def plan_fake(name: str, spec: Spec) -> LanePlan:
        model = spec.model(name)

        async def load() -> Any:
            return FakeEmbeddingEngine() if model.kind == "embedding" else FakeGenerateEngine("Lava is magma.")

        return LanePlan((name,), model.kind, model.source, load, parallel=model.parallel, context=model.context)

    monkeypatch.setattr(multilane.runtime, "plan_model", plan_fake)


def test_cli_run_draws_progress_on_a_terminal_and_prints_only_the_answer(
        tmp_path: Path, fake_models: None, monkeypatch: pytest.MonkeyPatch) -> None:
    console, drawn = terminal()
    monkeypatch.setattr(multilane.cli_progress, "stderr_console", lambda: console)
    result = ThreadedCliRunner().invoke(app, ["run", str(write_project(tmp_path)), "ask", "-i", "question=lava?"])

    assert result.exit_code == 0, result.output
    assert result.stdout == "Lava is magma.\n" and result.stderr == ""
    assert "loading model 'embedder'" in drawn.getvalue()
    assert "embedding index 'docs'" in drawn.getvalue()
    assert "loading model 'assistant'" in drawn.getvalue()


def test_cli_prints_no_progress_when_stderr_is_not_a_terminal(tmp_path: Path, fake_models: None) -> None:
    path = str(write_project(tmp_path))
    runner = ThreadedCliRunner()
    built = runner.invoke(app, ["index", "build", path, "docs"])
    ran = runner.invoke(app, ["run", path, "ask", "-i", "question=lava?"])

    assert built.exit_code == 0 and ran.exit_code == 0, built.output + ran.output
    assert built.stderr == "" and ran.stderr == ""
    assert built.stdout.startswith("index 'docs': built, 1 documents") and ran.stdout == "Lava is magma.\n"
