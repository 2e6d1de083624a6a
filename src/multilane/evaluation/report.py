"""Evaluation results side by side: a text table, a JSON document and a bar chart (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multilane.evaluation.runner import EvalResult

# (label in the table, key in Summary.to_dict(), format)
_ROWS: tuple[tuple[str, str, str], ...] = (
    ("MRR", "mrr", "{:.3f}"),
    ("exact match", "exact_match", "{:.3f}"),
    ("token F1", "f1", "{:.3f}"),
    ("contains answer", "contains", "{:.3f}"),
    ("refusal accuracy", "refusal_accuracy", "{:.3f}"),
    ("false refusals", "false_refusals", "{:.3f}"),
    ("latency p50 (s)", "latency_p50", "{:.2f}"),
    ("latency p95 (s)", "latency_p95", "{:.2f}"),
    ("prompt tokens (mean)", "mean_prompt_tokens", "{:.0f}"),
    ("completion tokens (mean)", "mean_completion_tokens", "{:.1f}"),
)
_CHART = ("mrr", "exact_match", "f1", "contains", "refusal_accuracy")
_CHART_LABELS = {"mrr": "MRR", "exact_match": "exact match", "f1": "token F1", "contains": "contains answer",
                 "refusal_accuracy": "refusal accuracy"}


def to_json(results: Sequence[EvalResult]) -> dict[str, Any]:
    """Every result as one JSON-ready document."""
    return {"dataset": results[0].dataset if results else None, "results": [r.to_dict() for r in results]}


def format_table(results: Sequence[EvalResult]) -> str:
    """The results as columns of one table: settings, retrieval and answer metrics, latency, tokens, then by type."""
    if not results:
        return "no results"
    first = results[0]
    overall = [r.report.overall.to_dict() for r in results]
    ks = sorted({k for r in results for k in r.ks})
    rows: list[tuple[str, ...]] = [("", *(r.label for r in results))]
    rows.append(("retrieval", *(r.retrieval for r in results)))
    rows.append(("questions", *(str(r.report.overall.questions) for r in results)))
    for depth in ks:
        rows.append((f"recall@{depth}", *(_fmt(o.get(f"recall@{depth}"), "{:.3f}") for o in overall)))
    rows.extend((label, *(_fmt(o.get(key), fmt) for o in overall)) for label, key, fmt in _ROWS)
    rows.append(("failed runs", *(str(r.errors) for r in results)))
    rows.append(("seconds", *(f"{r.seconds:.1f}" for r in results)))
    lines = [f"dataset {first.dataset}", _columns(rows), ""]
    k: int | None = 3 if 3 in ks else (ks[-1] if ks else None)
    head = ("by type", *(f"{r.label}: recall@{k} / MRR / contains" if k else f"{r.label}: contains"
                         for r in results))
    by_type: list[tuple[str, ...]] = [head]
    types = list(dict.fromkeys(name for r in results for name in r.report.by_type))
    for name in types:
        cells = []
        count = 0
        for r in results:
            summary = r.report.by_type.get(name)
            if summary is None:
                cells.append("-")
                continue
            count = summary.questions
            data = summary.to_dict()
            if name == "no_answer":
                cells.append(f"refused {_fmt(data['refusal_accuracy'], '{:.3f}')}")
            elif k:
                cells.append(" / ".join(_fmt(data.get(key), "{:.3f}")
                                        for key in (f"recall@{k}", "mrr", "contains")))
            else:
                cells.append(_fmt(data.get("contains"), "{:.3f}"))
        by_type.append((f"{name} ({count})", *cells))
    lines.append(_columns(by_type))
    return "\n".join(lines)


def write_chart(results: Sequence[EvalResult], path: Path) -> None:
    """A grouped bar chart of retrieval and answer metrics, one colour per result."""
    from matplotlib.figure import Figure

    ks = sorted({k for r in results for k in r.ks})
    keys = [f"recall@{k}" for k in ks] + list(_CHART)
    labels = [f"recall@{k}" for k in ks] + [_CHART_LABELS[key] for key in _CHART]
    figure = Figure(figsize=(min(16.0, max(8.0, 0.6 * len(keys) * max(1, len(results)) + 2)), 4.8),
                    layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(results))
    for position, result in enumerate(results):
        values = result.report.overall.to_dict()
        heights = [float(values.get(key) or 0.0) for key in keys]
        offsets = [i + (position - (len(results) - 1) / 2) * width for i in range(len(keys))]
        bars = axes.bar(offsets, heights, width, label=result.label)
        axes.bar_label(bars, labels=[_fmt(values.get(key), "{:.2f}") for key in keys], fontsize=7, padding=2)
    axes.set_xticks(range(len(keys)), labels, rotation=20, ha="right")
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("score (higher is better)")
    axes.set_title(f"{Path(results[0].dataset).name}: {results[0].report.overall.questions} questions")
    axes.legend(loc="upper right", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
