"""The journal's SQLite file: what it holds, the single writer that fills it, and reading it back.

Each record (a run started or ended, a step finished, a cache entry) is one transaction, so a process killed
at any moment leaves every record before it whole and none half-written. The file is in WAL mode, so readers
(`multilane runs`, another process's resume) never wait for the writer.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import psutil
import structlog

from multilane.errors import JournalError, UnknownRunError

__all__ = [
    "CachePut",
    "Journal",
    "JournalRecord",
    "LoadedRun",
    "RunEnded",
    "RunRecord",
    "RunStarted",
    "StepDone",
    "StepRecord",
    "list_runs",
    "load_run",
    "read_cache",
]

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 30.0  # another process writing the same journal holds its lock for one record at most

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    inputs TEXT NOT NULL,
    stages TEXT NOT NULL,          -- the pipeline's stage names, in declaration order
    spec_file TEXT,
    spec_hash TEXT NOT NULL,
    status TEXT NOT NULL,          -- running | finished | failed | cancelled
    output TEXT,
    error TEXT,
    started_at REAL NOT NULL,      -- unix seconds
    finished_at REAL,
    attempts INTEGER NOT NULL,
    pid INTEGER NOT NULL,          -- the process running it (a dead one means the run was interrupted)
    host TEXT NOT NULL,
    pid_started REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_start ON runs (started_at);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    path TEXT NOT NULL,            -- the call path: stage:research/item:2/agent/step:1/tool:0
    kind TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    input_hash TEXT NOT NULL,
    attrs TEXT NOT NULL,           -- what went in: prompt messages, options, schema, tool arguments ...
    result TEXT,                   -- what came out
    error TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (run_id, path)
);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    result TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


@functools.cache
def _owner() -> tuple[int, str, float]:
    """This process, as a run's owner: pid, host, and when the process started (pids are reused)."""
    return os.getpid(), socket.gethostname(), psutil.Process().create_time()


def _owner_alive(pid: int, host: str, started: float) -> bool:
    """Whether the process that wrote a run is still alive; a run on another host is taken to be."""
    if host != socket.gethostname():
        return True
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------------------------------------
# Records: what the writer commits, each in its own transaction


class JournalRecord(Protocol):
    """One thing to write, as one transaction."""

    def apply(self, db: sqlite3.Connection) -> None:
        """Write this record (the writer commits it)."""
        ...


@dataclass(frozen=True)
class RunStarted:
    """A run started, or an interrupted one was resumed (attempt > 1)."""

    run_id: str
    pipeline: str
    inputs: Mapping[str, Any]
    stages: Sequence[str]
    spec_file: str | None
    spec_hash: str
    attempt: int = 1
    started_at: float = field(default_factory=time.time)

    def apply(self, db: sqlite3.Connection) -> None:
        """Insert the run, or mark a resumed one running again."""
        pid, host, pid_started = _owner()
        if self.attempt == 1:
            db.execute("INSERT INTO runs (run_id, pipeline, inputs, stages, spec_file, spec_hash, status, "
                       "started_at, attempts, pid, host, pid_started) "
                       "VALUES (?, ?, ?, ?, ?, ?, 'running', ?, 1, ?, ?, ?)",
                       (self.run_id, self.pipeline, _dump(self.inputs), _dump(list(self.stages)), self.spec_file,
                        self.spec_hash, self.started_at, pid, host, pid_started))
        else:
            db.execute("UPDATE runs SET status = 'running', error = NULL, finished_at = NULL, attempts = ?, "
                       "stages = ?, spec_hash = ?, pid = ?, host = ?, pid_started = ? WHERE run_id = ?",
                       (self.attempt, _dump(list(self.stages)), self.spec_hash, pid, host, pid_started,
                        self.run_id))


@dataclass(frozen=True)
class RunEnded:
    """A run finished, failed or was cancelled."""

    run_id: str
    status: str  # finished | failed | cancelled
    output: Any = None
    error: str | None = None
    finished_at: float = field(default_factory=time.time)

    def apply(self, db: sqlite3.Connection) -> None:
        """Set the run's status, output or error, and end time."""
        db.execute("UPDATE runs SET status = ?, output = ?, error = ?, finished_at = ? WHERE run_id = ?",
                   (self.status, None if self.status != "finished" else _dump(self.output), self.error,
                    self.finished_at, self.run_id))


@dataclass(frozen=True)
class StepDone:
    """A step of a run that finished (ok) or failed; a later attempt at the same path replaces it."""

    run_id: str
    path: str
    kind: str
    attempt: int
    ok: bool
    input_hash: str
    attrs: Mapping[str, Any]
    result: Any
    error: str | None
    started_at: float
    finished_at: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False

    def apply(self, db: sqlite3.Connection) -> None:
        """Insert (or replace) the step's row."""
        db.execute("INSERT OR REPLACE INTO steps (run_id, path, kind, attempt, ok, input_hash, attrs, result, error, "
                   "prompt_tokens, completion_tokens, cached, started_at, finished_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (self.run_id, self.path, self.kind, self.attempt, int(self.ok), self.input_hash,
                    _dump(self.attrs), None if not self.ok else _dump(self.result), self.error, self.prompt_tokens,
                    self.completion_tokens, int(self.cached), self.started_at, self.finished_at))


@dataclass(frozen=True)
class CachePut:
    """A model call's result, kept under its cache key."""

    key: str
    model: str
    result: Any
    created_at: float = field(default_factory=time.time)

    def apply(self, db: sqlite3.Connection) -> None:
        """Insert (or replace) the entry."""
        db.execute("INSERT OR REPLACE INTO cache (key, model, result, created_at) VALUES (?, ?, ?, ?)",
                   (self.key, self.model, _dump(self.result), self.created_at))


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class RunRecord:
    """A journaled run; `status` is `interrupted` for a run whose process died while it was running."""

    run_id: str
    pipeline: str
    inputs: dict[str, Any]
    stages: list[str]
    spec_file: str | None
    spec_hash: str
    status: str
    output: Any
    error: str | None
    started_at: float
    finished_at: float | None
    attempts: int
    pid: int
    host: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the run."""
        seconds = None if self.finished_at is None else round(self.finished_at - self.started_at, 3)
        return {"run_id": self.run_id, "pipeline": self.pipeline, "status": self.status, "inputs": self.inputs,
                "stage_names": self.stages,
                "output": self.output, "error": self.error, "started_at": self.started_at,
                "finished_at": self.finished_at, "seconds": seconds, "attempts": self.attempts,
                "spec_file": self.spec_file, "spec_hash": self.spec_hash, "pid": self.pid, "host": self.host}


@dataclass(frozen=True)
class StepRecord:
    """A journaled step."""

    path: str
    kind: str
    attempt: int
    ok: bool
    input_hash: str
    attrs: dict[str, Any]
    result: Any
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    started_at: float
    finished_at: float


@dataclass(frozen=True)
class LoadedRun:
    """A run and its steps by call path."""

    run: RunRecord
    steps: dict[str, StepRecord]


_RUN_COLUMNS = ("run_id, pipeline, inputs, stages, spec_file, spec_hash, status, output, error, started_at, "
                "finished_at, attempts, pid, host, pid_started")


def _run_record(row: tuple[Any, ...]) -> RunRecord:
    (run_id, pipeline, inputs, stages, spec_file, spec_hash, status, output, error, started_at, finished_at,
     attempts, pid, host, pid_started) = row
    if status == "running" and not _owner_alive(pid, host, pid_started):
        status = "interrupted"
    return RunRecord(run_id, pipeline, json.loads(inputs), json.loads(stages), spec_file, spec_hash, status,
                     None if output is None else json.loads(output), error, started_at, finished_at, attempts, pid,
                     host)


@contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection]:
    if not path.is_file():
        raise JournalError(f"no journal at {path}: nothing has been journaled there yet (runtime.journal sets "
                           "where runs are journaled)")
    try:
        with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS)) as db:
            yield db
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal at {path}: {exc}") from exc


def list_runs(path: Path, *, limit: int = 20, pipeline: str | None = None,
              status: str | None = None) -> list[RunRecord]:
    """The latest runs, newest first; `status` filters on the status shown (`interrupted` included)."""
    where: list[str] = []
    args: list[Any] = []
    if pipeline is not None:
        where.append("pipeline = ?")
        args.append(pipeline)
    if status is not None:  # an interrupted run is stored as running: whether its process lives is seen on reading
        where.append("status = ?")
        args.append("running" if status == "interrupted" else status)
    query = f"SELECT {_RUN_COLUMNS} FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
    query += " ORDER BY started_at DESC"
    if status not in ("running", "interrupted"):
        query += f" LIMIT {int(limit)}"
    with _reading(path) as db:
        rows = db.execute(query, args).fetchall()
    runs = [_run_record(row) for row in rows]
    return [run for run in runs if status is None or run.status == status][:limit]


def load_run(path: Path, run_id: str) -> LoadedRun:
    """A run and every step journaled for it; raises UnknownRunError when the journal has no such run."""
    with _reading(path) as db:
        row = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise UnknownRunError(f"no run '{run_id}' in the journal at {path}; `multilane runs list` shows the "
                                  "runs it has")
        rows = db.execute("SELECT path, kind, attempt, ok, input_hash, attrs, result, error, prompt_tokens, "
                          "completion_tokens, cached, started_at, finished_at FROM steps WHERE run_id = ? "
                          "ORDER BY started_at", (run_id,)).fetchall()
    steps = {r[0]: StepRecord(r[0], r[1], r[2], bool(r[3]), r[4], json.loads(r[5]),
                              None if r[6] is None else json.loads(r[6]), r[7], r[8], r[9], bool(r[10]), r[11], r[12])
             for r in rows}
    return LoadedRun(_run_record(row), steps)


def read_cache(path: Path, key: str) -> Any:
    """A cached model call's result, or None."""
    with _reading(path) as db:
        row = db.execute("SELECT result FROM cache WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


# ---------------------------------------------------------------------------------------------
# Writing


class _Barrier:
    """Writes nothing: once the writer reaches it, everything queued before it is committed."""

    def apply(self, db: sqlite3.Connection) -> None:
        """Nothing to write."""


@dataclass
class _Pending:
    record: JournalRecord
    done: anyio.Event | None  # set once written, when the writer waits (durable journals)
    error: BaseException | None = None


class Journal:
    """A run journal in one SQLite file: a single writer task commits records taken from a bounded queue.

    The writes run in a worker thread, so they never block the event loop. When a record cannot be written
    (disk full, a read-only folder) the error is logged once and runs go on without it, unless the journal is
    `durable`: then the write that failed raises JournalError, and the run fails.
    """

    def __init__(self, path: Path, *, durable: bool = False, queue_size: int = 1024) -> None:
        self.path = path
        self.durable = durable
        self._send, self._receive = anyio.create_memory_object_stream[_Pending](max_buffer_size=queue_size)
        self._db: sqlite3.Connection | None = None
        self._open_error: str | None = None
        self._failing = False
        self._limiter = anyio.CapacityLimiter(1)
        self._stopped = anyio.Event()
        self.failures = 0  # records that could not be written

    @property
    def writable(self) -> bool:
        """Whether the last write (or the opening) succeeded."""
        return self._db is not None and not self._failing

    async def open(self) -> None:
        """Create the file and its tables (in a worker thread); raises JournalError when it fails and is durable."""
        try:
            self._db = await anyio.to_thread.run_sync(self._connect, limiter=self._limiter)
        except (sqlite3.Error, OSError) as exc:
            self._open_error = f"cannot open the journal at {self.path}: {exc}"
            if self.durable:
                raise JournalError(f"{self._open_error}; fix the path or its permissions, or set "
                                   "runtime.durable: false to run without a journal") from exc
            self._failed(self._open_error)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Prompts and outputs are private: only the owner may read the file (SQLite gives its -wal the same mode).
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: safe against a killed process
            db.execute("PRAGMA foreign_keys = ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"it has the layout of journal version {version}, and this multilane "
                                            f"writes version {SCHEMA_VERSION}; move it away to start a new one")
            with db:
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    async def write_forever(self) -> None:
        """The writer: commit queued records, each in its own transaction, until `close()`."""
        try:
            async with self._receive:
                async for first in self._receive:
                    batch = [first]
                    while len(batch) < 64:  # one trip to the thread for what queued meanwhile
                        try:
                            batch.append(self._receive.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    with anyio.CancelScope(shield=True):  # a record taken from the queue is written
                        await anyio.to_thread.run_sync(self._apply, batch, limiter=self._limiter)
                    for pending in batch:
                        if pending.error is not None:
                            self._failed(f"cannot write the journal at {self.path}: {pending.error}")
                        elif self._failing:
                            self._failing = False
                            log.warning("journal writes again", path=str(self.path))
                        if pending.done is not None:
                            pending.done.set()
        finally:
            self._stopped.set()

    def _apply(self, batch: list[_Pending]) -> None:
        for pending in batch:
            try:
                if self._db is None:
                    raise sqlite3.OperationalError(self._open_error or "the journal is closed")
                with self._db:  # one transaction per record: committed whole, or rolled back
                    pending.record.apply(self._db)
            except Exception as exc:  # disk full, read-only, locked too long, a value JSON cannot hold
                pending.error = exc

    def _failed(self, message: str) -> None:
        self.failures += 1
        if not self._failing:
            self._failing = True
            log.error("journal write failed; runs go on without a journal (set runtime.durable: true to stop them "
                      "instead)", error=message, path=str(self.path))

    async def record(self, record: JournalRecord) -> None:
        """Queue a record (waiting while the queue is full); a durable journal waits until it is committed."""
        if self._db is None and not self.durable:
            return  # it could not be opened, and that was logged
        pending = _Pending(record, anyio.Event() if self.durable else None)
        try:
            await self._send.send(pending)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            if self.durable:
                raise JournalError(f"the journal at {self.path} is closed; the runtime is closing") from None
            return
        if pending.done is not None:
            await pending.done.wait()
            if pending.error is not None:
                raise JournalError(f"cannot write the journal at {self.path}: {pending.error}; the run stops "
                                   "because runtime.durable is true") from pending.error

    async def flush(self) -> None:
        """Wait until every record queued so far is committed (or failed), so that reads see them."""
        if self._db is None:
            return
        pending = _Pending(_Barrier(), anyio.Event())
        try:
            await self._send.send(pending)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        assert pending.done is not None
        await pending.done.wait()

    async def close(self) -> None:
        """Write what is queued, then close the file."""
        self._send.close()
        with anyio.CancelScope(shield=True):
            if self._db is not None:
                await self._stopped.wait()
                db, self._db = self._db, None
                await anyio.to_thread.run_sync(db.close, limiter=self._limiter)

    # ---- reading (in worker threads)

    def _check_readable(self) -> None:
        if self._db is None:
            raise JournalError(self._open_error or f"the journal at {self.path} is closed")

    async def runs(self, *, limit: int = 20, pipeline: str | None = None,
                   status: str | None = None) -> list[RunRecord]:
        """The latest runs, newest first (what this process queued included)."""
        self._check_readable()
        await self.flush()
        return await anyio.to_thread.run_sync(
            functools.partial(list_runs, self.path, limit=limit, pipeline=pipeline, status=status))

    async def load(self, run_id: str) -> LoadedRun:
        """A run with its steps (what this process queued included); raises UnknownRunError when there is none."""
        self._check_readable()
        await self.flush()
        return await anyio.to_thread.run_sync(load_run, self.path, run_id)

    async def cached(self, key: str) -> Any:
        """A cache entry's result, or None."""
        if self._db is None:
            return None
        try:
            return await anyio.to_thread.run_sync(read_cache, self.path, key)
        except JournalError as exc:
            log.warning("journal cache lookup failed", error=str(exc))
            return None
