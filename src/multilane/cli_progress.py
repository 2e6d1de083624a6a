"""How the command line shows progress: live bars on stderr when it is a terminal, nothing when it is not.

The library reports `ProgressUpdate`s (see multilane.progress); this module renders them with rich. A bar
appears when a piece of long work starts and goes away when it ends, so a command's output is left as it
would be without them. Piped or redirected, a command prints no progress at all (`-v` logs the same steps).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from multilane.progress import ProgressUpdate, reporting


class _Count(ProgressColumn):
    """`12/40` when the work has a measure, else nothing."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{task.completed:.0f}/{task.total:.0f}", style="progress.download")


def stderr_console() -> Console:
    """The console progress is drawn on: the process's stderr, whatever it is when a line is written."""
    return Console(stderr=True)


class ProgressDisplay:
    """A progress callback that draws one bar per piece of work in progress on a terminal console.

    On a console that is not a terminal it draws nothing. Updates may come from worker threads.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or stderr_console()
        self._lock = threading.Lock()
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, update: ProgressUpdate) -> None:
        if not self.console.is_terminal:
            return
        with self._lock:
            if update.finished:
                self._finish(update.key)
                return
            bars = self._bars
            if bars is None:
                bars = self._bars = Progress(
                    SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24), _Count(),
                    TimeElapsedColumn(), console=self.console, transient=True, redirect_stdout=False)
                bars.start()
            task = self._tasks.get(update.key)
            if task is None:
                self._tasks[update.key] = bars.add_task(update.description, total=update.total,
                                                        completed=update.done)
            else:
                bars.update(task, completed=update.done, total=update.total)
            bars.refresh()  # every update shows at once, not only at the next tick

    def _finish(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None and self._bars is not None:
            self._bars.remove_task(task)
        if not self._tasks:
            self._stop()

    def _stop(self) -> None:
        bars, self._bars = self._bars, None
        if bars is not None:
            bars.stop()

    def close(self) -> None:
        """Take down whatever bars are left (work that ended with an error)."""
        with self._lock:
            self._tasks.clear()
            self._stop()


@contextmanager
def shown_progress(console: Console | None = None) -> Iterator[ProgressDisplay]:
    """Show the progress of the work done inside the block (see ProgressDisplay), and clear it at the end."""
    display = ProgressDisplay(console)
    try:
        with reporting(display):
            yield display
    finally:
        display.close()
