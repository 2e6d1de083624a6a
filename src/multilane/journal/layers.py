"""The layers a run's steps go through (see `multilane.steps`): record, resume, replay, cache.

A run gets `[JournalLayer, CacheLayer]`; a resumed run `[ResumeLayer, JournalLayer, CacheLayer]`, so steps
that the journal already holds are neither run nor written again; a replay `[ReplayLayer]` alone, which
answers every leaf (model, embed, search, plain tool) from the recording and records nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from multilane.errors import ReplayError
from multilane.journal.store import CachePut, Journal, RunEnded, RunStarted, StepDone, StepRecord
from multilane.steps import COMPLETION, Proceed, Step, canonical_json, completion_from_json

__all__ = ["CacheCounts", "CacheLayer", "JournalLayer", "ReplayLayer", "ResumeLayer", "is_deterministic"]

log = structlog.get_logger(__name__)


class JournalLayer:
    """Records the run as it starts and ends, and every step as it finishes (ok or failed), in the journal."""

    def __init__(self, journal: Journal, *, attempt: int = 1) -> None:
        self._journal = journal
        self._attempt = attempt

    async def around(self, step: Step, proceed: Proceed) -> Any:
        """Run the step and record how it went."""
        if step.kind == "run":
            return await self._run(step, proceed)
        started = time.time()
        try:
            result = await proceed()
        except Exception as exc:
            await self._journal.record(self._done(step, started, error=f"{type(exc).__name__}: {exc}"))
            raise
        await self._journal.record(self._done(step, started, encoded=step.codec.encode(result)))
        return result

    def _done(self, step: Step, started: float, *, encoded: Any = None, error: str | None = None) -> StepDone:
        tokens: dict[str, Any] = {}
        if step.kind == "model" and isinstance(encoded, dict):
            tokens = {"prompt_tokens": int(encoded.get("prompt_tokens") or 0),
                      "completion_tokens": int(encoded.get("completion_tokens") or 0),
                      "cached": bool((encoded.get("extra") or {}).get("cached"))}
        return StepDone(step.run_id, step.path, step.kind, self._attempt, error is None, step.input_hash,
                        dict(step.attrs), encoded, error, started, time.time(), **tokens)

    async def _run(self, step: Step, proceed: Proceed) -> Any:
        attrs = step.attrs
        await self._journal.record(RunStarted(step.run_id, attrs["pipeline"], attrs["inputs"], attrs["stages"],
                                              attrs["spec_file"], attrs["spec_hash"], self._attempt))
        try:
            result = await proceed()
        except Exception as exc:
            await self._journal.record(RunEnded(step.run_id, "failed", error=str(exc)))
            raise
        except BaseException:  # cancelled: the run may be resumed
            with anyio.CancelScope(shield=True):
                await self._journal.record(RunEnded(step.run_id, "cancelled", error="cancelled"))
            raise
        await self._journal.record(RunEnded(step.run_id, "finished", output=step.codec.encode(result)))
        return result


class ResumeLayer:
    """Answers a step from the journal when an earlier attempt finished it with the same inputs.

    Steps recorded without a way back (an agent, an agent step) run again, over their recorded model and tool
    calls, which is how the agent's conversation is rebuilt without calling anything.
    """

    def __init__(self, finished: Mapping[str, StepRecord]) -> None:
        self._finished = {path: record for path, record in finished.items() if record.ok}
        self.reused = 0

    async def around(self, step: Step, proceed: Proceed) -> Any:
        """Return the recorded result, or run the step."""
        record = self._finished.get(step.path)
        decode = step.codec.decode
        if record is None or decode is None or record.kind != step.kind:
            return await proceed()
        if record.input_hash != step.input_hash:
            log.info("step inputs changed since the journal recorded it; running it again", path=step.path)
            return await proceed()
        self.reused += 1
        return decode(record.result)


class ReplayLayer:
    """Answers every leaf step (model, embed, search, plain tool) from a recorded run; runs the rest.

    A leaf the recording does not have is a ReplayError; one whose inputs changed (an edited template) gets
    the recorded output anyway, with a warning, since trying a change against a real past run is the point.
    """

    def __init__(self, run_id: str, recorded: Mapping[str, StepRecord]) -> None:
        self._run_id = run_id
        self._recorded = recorded
        self.changed: list[str] = []  # paths whose inputs differ from the recording

    async def around(self, step: Step, proceed: Proceed) -> Any:
        """Return the recorded output of a leaf; run anything else."""
        if not step.leaf:
            return await proceed()
        record = self._recorded.get(step.path)
        if record is None or record.kind != step.kind:
            raise ReplayError(f"run '{self._run_id}' has no recorded {step.kind} call at {step.path}: the pipeline "
                              "makes a call the recording does not have (it changed since, or the run stopped "
                              "before it)")
        if record.input_hash != step.input_hash:
            self.changed.append(step.path)
            log.warning("replayed step has different inputs than the recording; using the recorded output",
                        path=step.path)
        if not record.ok:
            raise ReplayError(f"the recorded {step.kind} call at {step.path} failed: {record.error}")
        assert step.codec.decode is not None  # every leaf can be decoded
        return step.codec.decode(record.result)


@dataclass
class CacheCounts:
    """Cache lookups of one model's calls."""

    hits: int = 0
    misses: int = 0


def is_deterministic(options: Mapping[str, Any]) -> bool:
    """Whether sampling options give the same output each time: greedy (temperature 0) or a fixed seed."""
    return options.get("temperature") == 0 or options.get("seed") is not None


class CacheLayer:
    """An exact cache of deterministic model calls whose stage or model says `cache: true`.

    The key is the model's identity (weights and engine settings), the prompt messages, the sampling options
    and the JSON schema. Entries live in memory and, with a journal, in its file, so they outlast the process.
    Identical calls made at the same time reach the engine once: the others wait for its result.
    """

    def __init__(self, *, identity: Callable[[str], Awaitable[str]], wanted: Callable[[str], bool],
                 counts: dict[str, CacheCounts], journal: Journal | None = None, memory_entries: int = 4096) -> None:
        self._identity = identity
        self._wanted = wanted
        self._counts = counts
        self._journal = journal
        self._memory: OrderedDict[str, Any] = OrderedDict()
        self._memory_entries = memory_entries
        self._inflight: dict[str, anyio.Event] = {}

    async def around(self, step: Step, proceed: Proceed) -> Any:
        """Answer a cacheable model call from the cache, or make it and keep its result."""
        if step.kind != "model":
            return await proceed()
        attrs = step.attrs
        model = str(attrs["model"])
        wanted = attrs["cache"] if attrs.get("cache") is not None else self._wanted(model)
        if not wanted or not is_deterministic(attrs["options"]):
            return await proceed()
        key = await self._key(model, attrs)
        counts = self._counts.setdefault(model, CacheCounts())
        found = await self._lookup(key)
        if found is not None:
            self._keep(key, found)
            counts.hits += 1
            log.debug("cache hit", model=model, path=step.path)
            done = completion_from_json(found)
            return dataclasses.replace(done, extra={**done.extra, "cached": True})
        counts.misses += 1
        self._inflight[key] = done_event = anyio.Event()
        try:
            result = await proceed()
            encoded = COMPLETION.encode(result)
            self._keep(key, encoded)
        finally:
            del self._inflight[key]
            done_event.set()
        if self._journal is not None:
            await self._journal.record(CachePut(key, model, encoded))
        return result

    async def _lookup(self, key: str) -> Any:
        """The cached result: from memory, from the journal, or once the same call under way now is done.

        None means the caller makes the call: no identical call is under way as it returns.
        """
        if key not in self._memory and key not in self._inflight and self._journal is not None:
            found = await self._journal.cached(key)
            if found is not None:
                return found
        while (running := self._inflight.get(key)) is not None:
            await running.wait()  # when that call failed, this one may be made itself
        return self._memory.get(key)

    async def _key(self, model: str, attrs: Mapping[str, Any]) -> str:
        identity = await self._identity(model)
        keyed = {"identity": identity, "messages": attrs["messages"], "options": attrs["options"],
                 "schema": attrs["schema"], "truncate": attrs["truncate"]}
        return hashlib.sha256(canonical_json(keyed).encode()).hexdigest()

    def _keep(self, key: str, value: Any) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)
