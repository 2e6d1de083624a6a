"""Progress of long work (converting a GGUF file, loading a model, embedding an index) for whoever shows it.

Library code never prints: it reports `ProgressUpdate`s to the callback of the current context, set with
`reporting(callback)` (a context variable, so it reaches worker threads and code deep in the call stack),
and the command line renders them. Without a callback, reporting costs nothing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressUpdate:
    """Where one piece of long work stands: `total` is None when only its start and end are known."""

    key: str  # identifies the work across its updates: "load:assistant", "index:guide", "convert:<file>"
    description: str  # what it does, for people: "loading model 'assistant'"
    done: int = 0
    total: int | None = None
    finished: bool = False
    failed: bool = False


ProgressCallback = Callable[[ProgressUpdate], None]
"""Receives progress updates; it may be called from worker threads, and must not block for long."""

_current: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar("multilane_progress",
                                                                                    default=None)


def current() -> ProgressCallback | None:
    """The callback that progress goes to in this context, if any."""
    return _current.get()


@contextmanager
def reporting(callback: ProgressCallback | None) -> Iterator[None]:
    """Send the progress of the work done inside the block to `callback` (None leaves the current one)."""
    if callback is None:
        yield
        return
    token = _current.set(callback)
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def step(key: str, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Report a piece of work: its start, then `advance(done)` as it goes, then its end (also when it fails)."""
    callback = _current.get()
    if callback is None:
        yield lambda done: None
        return
    done = 0

    def advance(value: int) -> None:
        nonlocal done
        done = value
        callback(ProgressUpdate(key, description, done, total))

    callback(ProgressUpdate(key, description, 0, total))
    try:
        yield advance
    except BaseException:
        callback(ProgressUpdate(key, description, done, total, finished=True, failed=True))
        raise
    callback(ProgressUpdate(key, description, total if total is not None else done, total, finished=True))
