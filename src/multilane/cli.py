"""The `multilane` command: a thin shell over the Runtime."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from multilane.cli_progress import shown_progress
from multilane.errors import MultilaneError
from multilane.logs import configure_logging

app = typer.Typer(help="Multilane: agent and RAG pipelines on resident local models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
index_app = typer.Typer(help="Build and inspect document indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")
runs_app = typer.Typer(help="Look at journaled runs, resume interrupted ones, replay recorded ones.",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")

Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True,
                                      help="Log progress to stderr; -vv also debug and the model libraries' logs.")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _parse_inputs(pairs: list[str]) -> dict[str, Any]:
    """Turn `key=value` pairs into run inputs; values are coerced to the declared types later."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--input expects key=value, got '{pair}'", 2)
        inputs[key.strip()] = value
    return inputs


def _coerce(pipeline: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Convert command-line strings to the types the pipeline declares (int, float, bool, list as JSON)."""
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        declared = pipeline.inputs.get(key)
        kind = declared.type if declared else "str"
        try:
            if kind == "int":
                out[key] = int(value)
            elif kind == "float":
                out[key] = float(value)
            elif kind == "bool":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1", "yes")
            elif kind == "list":
                parsed = json.loads(value) if value.lstrip().startswith("[") else [
                    v.strip() for v in value.split(",") if v.strip()]
                if not isinstance(parsed, list):
                    raise ValueError(value)
                out[key] = parsed
            else:
                out[key] = value
        except ValueError:
            _fail(f"input '{key}' should be {kind}, got '{value}'", 2)
    return out


@app.command()
def run(file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).")],
        pipeline: Annotated[str, typer.Argument(help="Pipeline to run.")],
        input: Annotated[list[str] | None, typer.Option("--input", "-i", help="An input as key=value.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
        trace: Annotated[bool, typer.Option(
            "--trace", help="Print the run as a waterfall of its stages and calls, with queue and load times "
                            "(on stderr).")] = False,
        verbose: Verbose = 0) -> None:
    """Run a pipeline once and print its output."""
    configure_logging(verbose)
    from multilane.project import load_spec
    from multilane.runtime import Runtime

    async def go() -> None:
        spec = load_spec(file)
        recorder = _trace_recorder(spec) if trace else None
        try:
            async with Runtime(spec, tracer_provider=recorder.provider if recorder else None) as rt:
                declared = rt.spec.pipeline(pipeline)
                result = await rt.run(pipeline, _coerce(declared, _parse_inputs(input or [])))
        finally:
            if recorder is not None:
                await anyio.to_thread.run_sync(recorder.close)
                if recorder.spans():  # also for a run that failed: the waterfall shows where
                    from multilane.cli_trace import print_waterfall

                    print_waterfall(recorder.spans())
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        elif isinstance(result.output, str):
            typer.echo(result.output.strip())
        else:
            typer.echo(json.dumps(result.output, indent=2, default=str))

    _run_async(go)


def _trace_recorder(spec: Any) -> Any:
    """Where `run --trace` keeps the run's spans; the OpenTelemetry SDK is an extra."""
    try:
        from multilane.cli_trace import TraceRecorder
    except ImportError:
        _fail("--trace needs the OpenTelemetry SDK: pip install 'multilane[otel]'")
    return TraceRecorder(spec.runtime.tracing)


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).")]) -> None:
    """Check a pipeline file as loading it would, but load no model and build no index.

    The YAML, names, templates and JSON schemas are checked. When the file declares or uses agents, their
    Python files (the agents/ folder and allowed modules only) are imported, so that the agents are checked too.
    """
    configure_logging()
    from multilane.project import load_spec

    try:
        spec = load_spec(file)
    except MultilaneError as exc:
        _fail(str(exc))
    agents = f", {len(spec.agents)} agents" if spec.agents else ""
    typer.echo(f"{file}: ok ({len(spec.models)} models, {len(spec.indexes)} indexes, "
               f"{len(spec.pipelines)} pipelines{agents})")


@index_app.command("build")
def index_build(file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).")],
                index: Annotated[str, typer.Argument(help="Index to build.")],
                rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild even if unchanged.")] = False,
                verbose: Verbose = 0) -> None:
    """Build (or reuse, when its documents are unchanged) a declared index."""
    configure_logging(verbose)
    from multilane.runtime import Runtime

    async def go() -> None:
        async with Runtime.from_file(file) as rt:
            opened = await rt.index(index, rebuild=rebuild)
        typer.echo(f"index '{index}': {opened.status}, {opened.documents} documents, {opened.chunks} chunks, "
                   f"{opened.device}, at {opened.path}")

    _run_async(go)


@app.command()
def ps(file: Annotated[Path | None, typer.Argument(help="Pipeline file (YAML); not needed with --url.")] = None,
       load: Annotated[list[str] | None, typer.Option("--load", help="Load this model first (repeatable).")] = None,
       url: Annotated[str | None, typer.Option("--url", help="Read the lanes of a running server instead.")] = None,
       api_key: Annotated[str | None, typer.Option("--api-key", envvar="MULTILANE_API_KEY",
                                                   help="The server's API key (with --url).")] = None,
       as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
       verbose: Verbose = 0) -> None:
    """Show the lanes of a pipeline file (what each model costs, what is loaded after --load) or of a server."""
    configure_logging(verbose)
    if url is not None:
        _ps_url(url, api_key, as_json)
        return
    if file is None:
        _fail("give a pipeline file, or --url of a running server", 2)
    path: Path = file  # type: ignore[assignment]  # _fail exits
    from multilane.runtime import Runtime

    async def go() -> None:
        async with Runtime.from_file(path) as rt:
            for name in load or []:
                await rt.load(name)
            rows = rt.ps()
            plans = {name: await rt.plan(name) for name in rt.spec.models}
            usage = rt.pool.usage()
        if as_json:
            typer.echo(json.dumps({"lanes": rows, "usage": usage}, indent=2, default=str))
            return
        typer.echo(format_ps(rows))
        typer.echo("")
        typer.echo(format_plans(rt.spec, plans, usage))

    _run_async(go)


def _ps_url(url: str, api_key: str | None, as_json: bool) -> None:
    """Print the lanes a running server reports on /api/ps, as `multilane ps` does."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/api/ps", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url}: {exc}")
    if response.status_code != 200:
        try:
            detail = response.json().get("error", response.text)
        except ValueError:
            detail = response.text
        _fail(f"{url} answered {response.status_code}: {detail}")
    body = response.json()
    rows = [model["multilane"] for model in body.get("models", []) if "multilane" in model]
    if as_json:
        typer.echo(json.dumps({"lanes": rows, "usage": body.get("usage")}, indent=2, default=str))
        return
    typer.echo(format_ps(rows))
    usage = body.get("usage")
    if usage:
        from multilane.memory import format_bytes

        budget = usage["budget_bytes"]
        typer.echo(f"\nbudget {format_bytes(budget) if budget else 'unlimited'}, in use "
                   f"{format_bytes(usage['used_bytes'])}, {usage['loaded']} of {usage['max_loaded_models']} "
                   "lanes loaded")


@app.command()
def serve(file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).")],
          host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8700,
          api_key: Annotated[str | None, typer.Option(
              "--api-key", envvar="MULTILANE_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /healthz.")] = None,
          grace: Annotated[int, typer.Option("--grace", help="Seconds in-flight calls get to finish on SIGTERM.")] = 10,
          max_body: Annotated[str, typer.Option("--max-body", help="Largest request body, e.g. 4MiB.")] = "4MiB",
          max_tokens: Annotated[int, typer.Option("--max-tokens",
                                                  help="max_tokens of calls that give none.")] = 512,
          verbose: Verbose = 0) -> None:
    """Serve a pipeline file over HTTP: OpenAI- and Ollama-compatible routes, pipeline runs, metrics."""
    configure_logging(verbose)
    from multilane.server import serve as run_server
    from multilane.spec import parse_size

    try:
        limit = parse_size(max_body)
    except ValueError as exc:
        _fail(f"--max-body: {exc}", 2)
    if not verbose:
        typer.echo(f"multilane: serving {file} on http://{host}:{port} (loading models first)", err=True)
    try:
        with shown_progress():  # models that load at start, or later on demand
            run_server(file, host=host, port=port, api_key=api_key or None, grace=grace, max_body_bytes=limit,
                       log_level="info" if verbose else "warning", default_max_tokens=max_tokens)
    except MultilaneError as exc:
        _fail(str(exc))


def format_ps(rows: list[dict[str, Any]]) -> str:
    """The loaded lanes as a table, like `ollama ps`."""
    from multilane.memory import format_bytes

    header = ("NAME", "KIND", "DEVICE", "DTYPE", "WEIGHTS", "KV", "SLOTS", "QUEUED", "CACHE", "CONTEXT", "LOADED",
              "UNTIL")
    table = [header]
    for row in rows:
        expires = row["expires_at"]
        until = ("forever" if expires == "forever" else "busy" if expires is None
                 else time.strftime("%H:%M:%S", time.localtime(float(expires))))
        table.append((",".join(row["models"]), row["kind"], row["device"], row.get("dtype") or "-",
                      format_bytes(row["weights_bytes"]),
                      format_bytes(row["kv_bytes"]) if row["kv_bytes"] else "-", _slots(row), _queued(row),
                      f"{row['cache_hit_rate']:.0%}" if row.get("cache_hit_rate") is not None else "-",
                      str(row["context"] or "-"), time.strftime("%H:%M:%S", time.localtime(row["loaded_at"])), until))
    if len(table) == 1:
        return "no lanes loaded"
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table)


def _slots(row: dict[str, Any]) -> str:
    """Busy of all slots, and how many are reserved for urgent calls: `3/16 (2 reserved)`."""
    text = f"{row['busy']}/{row['slots']}"
    return f"{text} ({row['reserved_slots']} reserved)" if row.get("reserved_slots") else text


def _queued(row: dict[str, Any]) -> str:
    """Waiting calls, by priority when more than one priority waits: `5 (p0: 1, p5: 4)`."""
    by_priority = row.get("queued_by_priority") or {}
    if len(by_priority) < 2:
        return str(row["queued"])
    return f"{row['queued']} ({', '.join(f'p{p}: {n}' for p, n in by_priority.items())})"


def format_plans(spec: Any, plans: dict[str, Any], usage: dict[str, Any]) -> str:
    """What each declared model costs when loaded, against the budget."""
    from multilane.memory import format_bytes

    lines = [f"{name}: {plan.kind}, {format_bytes(plan.cost)} ({plan.arithmetic()}), keep_alive "
             f"{spec.model(name).keep_alive}" for name, plan in plans.items()]
    budget = usage["budget_bytes"]
    lines.append(f"budget {format_bytes(budget) if budget else 'unlimited'}, in use "
                 f"{format_bytes(usage['used_bytes'])}, {usage['loaded']} of {usage['max_loaded_models']} "
                 "lanes loaded")
    return "\n".join(lines)


@app.command()
def bench(suites: Annotated[list[str] | None, typer.Argument(
              help="Suites to run: throughput, embedding, search, rag, swap, prefix, priority (default: all).")] = None,
          folder: Annotated[Path, typer.Option("--dir", help="The benchmarks folder.")] = Path("bench"),
          verbose: Verbose = 0) -> None:
    """Run the benchmarks under bench/ and write a table, JSON and a chart to bench/results/."""
    configure_logging(verbose)
    import importlib.util

    script = folder / "suites.py"
    if not script.is_file():
        _fail(f"no benchmarks at {script}; run from a checkout of the project or pass --dir")
    spec = importlib.util.spec_from_file_location("multilane_bench_suites", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = suites or list(module.SUITES)
    unknown = [name for name in names if name not in module.SUITES]
    if unknown:
        _fail(f"unknown suite '{unknown[0]}' (suites: {', '.join(module.SUITES)})", 2)

    results: dict[str, Any] = {}

    async def go() -> None:
        results.update(await module.run(names))

    _run_async(go)
    out = folder / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    if "throughput" in results:
        module.chart(results, out / "throughput.png")
    typer.echo(module.table(results))
    typer.echo(f"\nresults: {out / 'latest.json'}")


JournalOption = Annotated[Path | None, typer.Option(
    "--journal", help="The journal file (default: --file's runtime.journal, else MULTILANE_HOME/journal.db).")]
FileOption = Annotated[Path | None, typer.Option(
    "--file", "-f", help="Pipeline file (YAML); for resume and replay, default: the file the run started from.")]
RunId = Annotated[str, typer.Argument(help="The run's id (`multilane runs list` shows them).")]


def _journal_file(journal: Path | None, file: Path | None) -> Path:
    """The journal to read: --journal, else the pipeline file's runtime.journal, else the default one."""
    from multilane.journal import default_journal_path, journal_path
    from multilane.spec import read_spec, read_spec_file

    if journal is not None:
        return journal
    if file is None:
        return default_journal_path()
    try:
        spec = read_spec(read_spec_file(file), str(file), file.absolute().parent, file)
    except MultilaneError as exc:
        _fail(str(exc))
    path = journal_path(spec)
    if path is None:
        _fail(f"{file} keeps no journal (runtime.journal: off)")
    return path  # type: ignore[return-value]  # _fail exits


def _run_file(path: Path, run_id: str, file: Path | None) -> Path:
    """The pipeline file to resume or replay a run with: --file, else the one the run started from."""
    from multilane.journal import load_run

    if file is not None:
        return file
    try:
        recorded = load_run(path, run_id).run.spec_file
    except MultilaneError as exc:
        _fail(str(exc))
    if recorded is None:
        _fail(f"run '{run_id}' was started from pipeline text, not a file; pass --file")
    return Path(recorded)  # type: ignore[arg-type]  # _fail exits


def _echo_result(result: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    elif isinstance(result.output, str):
        typer.echo(result.output.strip())
    else:
        typer.echo(json.dumps(result.output, indent=2, default=str))


@runs_app.command("list")
def runs_list(journal: JournalOption = None, file: FileOption = None,
              limit: Annotated[int, typer.Option("--limit", "-n", help="How many runs, newest first.")] = 20,
              pipeline: Annotated[str | None, typer.Option("--pipeline", help="Only runs of this pipeline.")] = None,
              status: Annotated[str | None, typer.Option(
                  "--status", help="Only runs in this status: running, interrupted, finished, failed, cancelled.")
              ] = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False) -> None:
    """List journaled runs, newest first: id, pipeline, status (interrupted when its process died), timings."""
    from multilane.journal import format_runs, list_runs

    try:
        runs = list_runs(_journal_file(journal, file), limit=limit, pipeline=pipeline, status=status)
    except MultilaneError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps([run.to_dict() for run in runs], indent=2, default=str))
    else:
        typer.echo(format_runs(runs))


@runs_app.command("show")
def runs_show(run_id: RunId, journal: JournalOption = None, file: FileOption = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False) -> None:
    """Show a run: status, inputs, stages with timings and tokens, agent transcripts, errors, output."""
    from multilane.journal import describe_run, format_run, load_run

    try:
        described = describe_run(load_run(_journal_file(journal, file), run_id))
    except MultilaneError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(described, indent=2, default=str) if as_json else format_run(described))


@runs_app.command("resume")
def runs_resume(run_id: RunId, journal: JournalOption = None, file: FileOption = None,
                force: Annotated[bool, typer.Option(
                    "--force", help="Resume even though the pipeline file changed since the run started.")] = False,
                as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
                verbose: Verbose = 0) -> None:
    """Finish an interrupted (or failed) run: what its journal holds is reused, the rest runs; print its output."""
    configure_logging(verbose)
    from multilane.runtime import Runtime

    path = _journal_file(journal, file)
    spec_file = _run_file(path, run_id, file)

    async def go() -> None:
        async with Runtime.from_file(spec_file, journal=path) as rt:
            result = await rt.resume(run_id, force=force)
        _echo_result(result, as_json)

    _run_async(go)


@runs_app.command("replay")
def runs_replay(run_id: RunId, journal: JournalOption = None, file: FileOption = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
                verbose: Verbose = 0) -> None:
    """Run a recorded run again from its recorded model, retrieval and tool outputs, loading no model."""
    configure_logging(verbose)
    from multilane.runtime import Runtime

    path = _journal_file(journal, file)
    spec_file = _run_file(path, run_id, file)

    async def go() -> None:
        async with Runtime.from_file(spec_file, journal=path, offline=True) as rt:
            result = await rt.replay(run_id)
        _echo_result(result, as_json)

    _run_async(go)


@app.command("eval")
def eval_(file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).")],
          pipeline: Annotated[str, typer.Argument(help="Pipeline to measure.")],
          dataset: Annotated[Path, typer.Option("--dataset", help="Gold set (JSONL), e.g. examples/eval/x.jsonl.")],
          concurrency: Annotated[int, typer.Option("--concurrency", min=1,
                                                   help="Questions in flight at once.")] = 8,
          against: Annotated[list[str] | None, typer.Option(
              "--against", help="Measure this pipeline file too, side by side: OTHER.yaml (same pipeline name) "
                                "or OTHER.yaml:PIPELINE; repeatable.")] = None,
          retrieve_stage: Annotated[str | None, typer.Option(
              "--retrieve-stage", help="The retrieve stage whose passages are scored ('none': skip).")] = None,
          answer_stage: Annotated[str | None, typer.Option(
              "--answer-stage", help="The reason or agent stage whose text is the answer ('none': skip).")] = None,
          question_input: Annotated[str | None, typer.Option(
              "--question-input", help="The input that takes the question (default: the only one).")] = None,
          json_out: Annotated[Path | None, typer.Option("--json", help="Write every result as JSON here.")] = None,
          png_out: Annotated[Path | None, typer.Option("--png", help="Write a bar chart of the metrics here.")] = None,
          verbose: Verbose = 0) -> None:
    """Measure retrieval (recall@k, MRR) and answers (exact match, F1, contains, refusals) on a gold set."""
    configure_logging(verbose)
    from multilane.evaluation import load_gold_set
    from multilane.evaluation.report import format_table, to_json, write_chart
    from multilane.project import load_spec

    targets = [(file, pipeline), *(_against(other, pipeline) for other in against or [])]
    try:
        gold = load_gold_set(dataset)
        specs = {path: load_spec(path) for path, _ in targets}
        for path, name in targets:
            specs[path].pipeline(name)
    except MultilaneError as exc:
        _fail(str(exc))
    results: list[Any] = []

    async def go() -> None:
        from multilane.runtime import Runtime

        # One runtime per file, one pipeline after another: their latencies are measured alone, and a file's
        # pipelines share its lanes and indexes.
        for path in dict.fromkeys(path for path, _ in targets):
            async with Runtime(specs[path]) as rt:
                for name in [n for p, n in targets if p == path]:
                    result = await rt.evaluate(
                        name, gold, concurrency=concurrency, retrieve_stage=retrieve_stage,
                        answer_stage=answer_stage, question_input=question_input)
                    results.append(result)

    _run_async(go)
    typer.echo(format_table(results))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(to_json(results), indent=2) + "\n", encoding="utf-8")
        typer.echo(f"\nresults: {json_out}")
    if png_out is not None:
        write_chart(results, png_out)
        typer.echo(f"chart: {png_out}")


def _against(value: str, pipeline: str) -> tuple[Path, str]:
    """OTHER.yaml (the same pipeline) or OTHER.yaml:PIPELINE."""
    path, sep, name = value.rpartition(":")
    if sep and path and not Path(value).exists():
        return Path(path), name
    return Path(value), pipeline


def _run_async(fn: Any) -> None:
    """Run a command's async body, showing the progress of its long work on a terminal."""
    try:
        with shown_progress():
            anyio.run(fn)
    except MultilaneError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def main() -> None:
    """Entry point of the `multilane` console script."""
    app()


if __name__ == "__main__":
    main()
