"""The `multilane` command: a thin shell over the Runtime."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from multilane.errors import MultilaneError
from multilane.logs import configure_logging

app = typer.Typer(help="Multilane: agent and RAG pipelines on resident local models.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
index_app = typer.Typer(help="Build and inspect document indexes.", no_args_is_help=True)
app.add_typer(index_app, name="index")

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress (info level) to stderr.")]


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


def _progress(index: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\rindex '{index}': embedded {done}/{total} chunks{end}")
    elif done >= total:
        sys.stderr.write(f"index '{index}': embedded {total} chunks\n")
    sys.stderr.flush()


@app.command()
def run(file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).")],
        pipeline: Annotated[str, typer.Argument(help="Pipeline to run.")],
        input: Annotated[list[str] | None, typer.Option("--input", "-i", help="An input as key=value.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON.")] = False,
        verbose: Verbose = False) -> None:
    """Run a pipeline once and print its output."""
    configure_logging("info" if verbose else "warning")
    from multilane.runtime import Runtime

    async def go() -> None:
        async with Runtime.from_file(file, progress=_progress) as rt:
            declared = rt.spec.pipeline(pipeline)
            result = await rt.run(pipeline, _coerce(declared, _parse_inputs(input or [])))
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        elif isinstance(result.output, str):
            typer.echo(result.output.strip())
        else:
            typer.echo(json.dumps(result.output, indent=2, default=str))

    _run_async(go)


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).")]) -> None:
    """Check a pipeline file without loading any model."""
    configure_logging("warning")
    from multilane.spec import load_spec

    try:
        spec = load_spec(file)
    except MultilaneError as exc:
        _fail(str(exc))
    typer.echo(f"{file}: ok ({len(spec.models)} models, {len(spec.indexes)} indexes, "
               f"{len(spec.pipelines)} pipelines)")


@index_app.command("build")
def index_build(file: Annotated[Path, typer.Argument(help="Pipeline file (YAML).")],
                index: Annotated[str, typer.Argument(help="Index to build.")],
                rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild even if unchanged.")] = False,
                verbose: Verbose = False) -> None:
    """Build (or reuse, when its documents are unchanged) a declared index."""
    configure_logging("info" if verbose else "warning")
    from multilane.runtime import Runtime

    async def go() -> None:
        async with Runtime.from_file(file, progress=_progress) as rt:
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
       verbose: Verbose = False) -> None:
    """Show the lanes of a pipeline file (what each model costs, what is loaded after --load) or of a server."""
    configure_logging("info" if verbose else "warning")
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
          verbose: Verbose = False) -> None:
    """Serve a pipeline file over HTTP: OpenAI- and Ollama-compatible routes, pipeline runs, metrics."""
    configure_logging("info" if verbose else "warning")
    from multilane.server import serve as run_server
    from multilane.spec import parse_size

    try:
        limit = parse_size(max_body)
    except ValueError as exc:
        _fail(f"--max-body: {exc}", 2)
    if not verbose:
        typer.echo(f"multilane: serving {file} on http://{host}:{port} (loading models first)", err=True)
    try:
        run_server(file, host=host, port=port, api_key=api_key or None, grace=grace, max_body_bytes=limit,
                   log_level="info" if verbose else "warning", default_max_tokens=max_tokens)
    except MultilaneError as exc:
        _fail(str(exc))


def format_ps(rows: list[dict[str, Any]]) -> str:
    """The loaded lanes as a table, like `ollama ps`."""
    from multilane.memory import format_bytes

    header = ("NAME", "KIND", "DEVICE", "DTYPE", "WEIGHTS", "KV", "SLOTS", "QUEUED", "CONTEXT", "LOADED", "UNTIL")
    table = [header]
    for row in rows:
        expires = row["expires_at"]
        until = ("forever" if expires == "forever" else "busy" if expires is None
                 else time.strftime("%H:%M:%S", time.localtime(float(expires))))
        table.append((",".join(row["models"]), row["kind"], row["device"], row.get("dtype") or "-",
                      format_bytes(row["weights_bytes"]),
                      format_bytes(row["kv_bytes"]) if row["kv_bytes"] else "-", f"{row['busy']}/{row['slots']}",
                      str(row["queued"]), str(row["context"] or "-"),
                      time.strftime("%H:%M:%S", time.localtime(row["loaded_at"])), until))
    if len(table) == 1:
        return "no lanes loaded"
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table)


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
              help="Suites to run: throughput, embedding, search, rag, swap (default: all).")] = None,
          folder: Annotated[Path, typer.Option("--dir", help="The benchmarks folder.")] = Path("bench"),
          verbose: Verbose = False) -> None:
    """Run the benchmarks under bench/ and write a table, JSON and a chart to bench/results/."""
    configure_logging("info" if verbose else "warning")
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


def _run_async(fn: Any) -> None:
    try:
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
