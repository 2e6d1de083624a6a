"""The run journal: every run and its steps in SQLite, for looking at runs, resuming them, replaying them
without a model, and an exact cache of model calls.

The parts: `store` (the file, its single writer and its readers), `layers` (the step layers that record,
resume, replay and cache, over the seam in `multilane.steps`) and `report` (what `multilane runs show` prints).
"""

from __future__ import annotations

from pathlib import Path

from multilane.journal.layers import CacheCounts, CacheLayer, JournalLayer, ReplayLayer, ResumeLayer
from multilane.journal.report import describe_run, format_run, format_runs
from multilane.journal.store import Journal, LoadedRun, RunRecord, StepRecord, list_runs, load_run
from multilane.sources import multilane_home
from multilane.spec import Spec

__all__ = [
    "CacheCounts",
    "CacheLayer",
    "Journal",
    "JournalLayer",
    "LoadedRun",
    "ReplayLayer",
    "ResumeLayer",
    "RunRecord",
    "StepRecord",
    "default_journal_path",
    "describe_run",
    "format_run",
    "format_runs",
    "journal_path",
    "list_runs",
    "load_run",
]


def default_journal_path() -> Path:
    """Where runs are journaled when the pipeline file does not say: `MULTILANE_HOME/journal.db`."""
    return multilane_home() / "journal.db"


def journal_path(spec: Spec) -> Path | None:
    """The journal file a pipeline file's runs go to (`runtime.journal`), or None when it is off."""
    setting = spec.runtime.journal
    if setting == "off":
        return None
    return default_journal_path() if setting is None else spec.resolve_path(setting)
