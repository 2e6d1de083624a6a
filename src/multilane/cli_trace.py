"""`multilane run --trace`: the run's spans, kept in memory, drawn as a waterfall on the terminal with rich.

Each step of the run is a row on one time line: the run, its stages, items, agents, tool calls, retrievals and
model calls. A model call's bar shows where its time went: `░` waiting for the model to load, `▒` queued for a
slot of its lane, `█` running. The spans come from the OpenTelemetry SDK's in-memory exporter, beside whatever
exporter the pipeline file or the OTEL_* variables configure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from multilane.spec import TracingSpec
from multilane.tracing import export_provider

__all__ = ["TraceRecorder", "print_waterfall", "waterfall"]

_RUN, _QUEUE, _LOAD = "█", "▒", "░"
_STYLES = {"chat": "green", "text_completion": "green", "embeddings": "cyan", "retrieval": "cyan",
           "execute_tool": "magenta", "invoke_agent": "blue", "open_index": "cyan"}


class TraceRecorder:
    """A tracer provider that keeps a run's spans in memory (and exports them too, when the file or variables say)."""

    def __init__(self, setting: TracingSpec | None) -> None:
        exporting = None if setting is not None and setting.export == "off" else export_provider(setting)
        self.provider: TracerProvider = exporting or TracerProvider()
        self._memory = InMemorySpanExporter()
        self.provider.add_span_processor(SimpleSpanProcessor(self._memory))

    def spans(self) -> tuple[ReadableSpan, ...]:
        """The finished spans so far."""
        return self._memory.get_finished_spans()

    def close(self) -> None:
        """Flush and stop the exporters."""
        self.provider.shutdown()


@dataclass(frozen=True)
class _Row:
    span: ReadableSpan
    depth: int
    waits: tuple[ReadableSpan, ...]  # the span's load and queue children, drawn inside its bar
    failed_below: bool  # a step under this one failed too


def _rows(spans: Sequence[ReadableSpan]) -> list[_Row]:
    """The spans as a depth-first list under their roots, children in the order they started."""
    ids = {span.context.span_id for span in spans if span.context is not None}
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)
    rows: list[_Row] = []

    def visit(span: ReadableSpan, depth: int) -> None:
        under = sorted(children.get(span.context.span_id if span.context else None, []),
                       key=lambda s: s.start_time or 0)
        waits = tuple(s for s in under if (s.attributes or {}).get("multilane.wait"))
        failed = any(s.status.status_code is StatusCode.ERROR for s in under)
        rows.append(_Row(span, depth, waits, failed))
        for child in under:
            if child not in waits:
                visit(child, depth + 1)

    for root in sorted(children.get(None, []), key=lambda s: s.start_time or 0):
        visit(root, 0)
    return rows


def _label(span: ReadableSpan) -> str:
    """The span's name, with the item's index or the agent step's number where the name alone repeats."""
    a: dict[str, Any] = dict(span.attributes or {})
    if a.get("multilane.item.index") is not None and a.get("multilane.step") == "item":
        return f"{span.name} [{a['multilane.item.index']}]"
    if a.get("multilane.agent.step") is not None:
        return f"{span.name} #{a['multilane.agent.step']}"
    return span.name


def _seconds(ns: int) -> str:
    seconds = ns / 1e9
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _bar(row: _Row, t0: int, total: int, width: int) -> Text:
    span = row.span
    start, end = span.start_time or t0, span.end_time or span.start_time or t0
    first = min(int((start - t0) / total * width), width - 1)
    last = max(first + 1, min(round((end - t0) / total * width), width))
    style = _STYLES.get(str((span.attributes or {}).get("gen_ai.operation.name", "")), "blue")
    if span.status.status_code is StatusCode.ERROR:
        style = "red"
    text = Text(" " * first)
    for cell in range(first, last):
        at = t0 + (cell + 0.5) * total / width
        glyph, cell_style = _RUN, style
        for wait in row.waits:
            if (wait.start_time or 0) <= at < (wait.end_time or 0):
                kind = (wait.attributes or {}).get("multilane.wait")
                glyph, cell_style = (_LOAD, "yellow") if kind == "load" else (_QUEUE, "red")
        text.append(glyph, style=cell_style)
    return text


def _details(row: _Row) -> Text:
    a: dict[str, Any] = dict(row.span.attributes or {})
    parts: list[str] = []
    if a.get("gen_ai.usage.input_tokens") is not None and a.get("multilane.step") == "model":
        parts.append(f"{a['gen_ai.usage.input_tokens']}→{a.get('gen_ai.usage.output_tokens', 0)} tok")
    if a.get("multilane.model_loaded"):
        parts.append(f"load {float(a.get('multilane.load_s', 0)):.2f}s")
    if a.get("multilane.queued"):
        ahead = int(a.get("multilane.queue.ahead") or 0)
        parts.append(f"queued {float(a.get('multilane.queue_wait_s', 0)):.2f}s behind {a.get('multilane.slots.busy')}"
                     f"/{a.get('multilane.slots.total')} busy" + (f", {ahead} waiting" if ahead else ""))
    if a.get("multilane.time_to_first_token_s") is not None and a.get("gen_ai.operation.name") != "embeddings":
        parts.append(f"ttft {float(a['multilane.time_to_first_token_s']):.2f}s")
    if a.get("gen_ai.usage.cache_read.input_tokens"):
        parts.append(f"{a['gen_ai.usage.cache_read.input_tokens']} prompt tok from prefix cache")
    answered = a.get("multilane.answered_by")
    if answered in ("cache", "journal"):
        parts.append(f"from the {answered}")
    if a.get("multilane.retrieval.hits") is not None:
        hits = int(a["multilane.retrieval.hits"])
        parts.append(f"{hits} hit{'' if hits == 1 else 's'}")
    if a.get("multilane.index.status"):
        parts.append(f"{a['multilane.index.status']}, {a.get('multilane.index.chunks')} chunks")
    if a.get("multilane.item.count") is not None:
        parts.append(f"{a['multilane.item.count']} items")
    if a.get("multilane.cancelled"):
        parts.append("cancelled")
    text = Text(" · ".join(parts), style="dim")
    if row.span.status.status_code is StatusCode.ERROR:
        # the message once, where it arose; the steps above it only say that they failed
        message = "failed" if row.failed_below else (row.span.status.description or "failed").splitlines()[0]
        text.append((" · " if parts else "") + f"✗ {message}"[:100], style="red")
    return text


def waterfall(spans: Sequence[ReadableSpan], *, width: int = 40) -> RenderableType:
    """The spans as a waterfall: one row per step with its bar on a shared time line, its duration and figures."""
    rows = _rows(spans)
    if not rows:
        return Text("no spans were recorded")
    t0 = min(row.span.start_time or 0 for row in rows)
    t1 = max(row.span.end_time or 0 for row in rows)
    total = max(t1 - t0, 1)
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, padding=(0, 1))
    table.add_column("step", no_wrap=True)
    table.add_column(f"0 … {_seconds(total)}", no_wrap=True, width=width)
    table.add_column("took", justify="right", no_wrap=True)
    table.add_column("", overflow="fold")
    for row in rows:
        duration = (row.span.end_time or 0) - (row.span.start_time or 0)
        table.add_row(Text("  " * row.depth + _label(row.span)), _bar(row, t0, total, width), _seconds(duration),
                      _details(row))
    root = rows[0].span
    head = Text(f"trace {root.context.trace_id:032x}" if root.context else "trace", style="bold")
    run_id = (root.attributes or {}).get("multilane.run_id")
    if run_id:
        head.append(f" · run {run_id}")
    legend = Text.assemble((_RUN, "green"), " running  ", (_QUEUE, "red"), " queued for a slot  ",
                           (_LOAD, "yellow"), " waiting for the model to load", style="dim")
    return Group(head, table, legend)


def print_waterfall(spans: Sequence[ReadableSpan], console: Console | None = None) -> None:
    """Print the waterfall on stderr (a command's stdout stays its output)."""
    console = console or Console(stderr=True)
    if not console.is_terminal and console.width < 120:
        console.width = 120  # piped: lines as a wide terminal would show them
    console.print(waterfall(spans))
