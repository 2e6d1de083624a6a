"""The server's shutdown: refuse what has not started, give running calls a grace, then cut them; one log line.

`Shutdown` keeps the calls in flight (the `app.ShutdownGate` middleware registers them). `drain(grace)` refuses
new requests and every call waiting in a lane at once (503, Retry-After), lets running calls finish for up to
`grace` seconds, then cuts the rest: the routes answer them with a 503 (or an error event, in a stream that has
begun), and aborting them frees their engine requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import structlog

from multilane.errors import RuntimeClosedError
from multilane.lanes import Pool

log = structlog.get_logger(__name__)

RETRY_AFTER = "1"
"""Seconds a refused client is told to wait before it retries (elsewhere: this server is going away)."""
CUT_SECONDS = 5.0
"""How long the routes get to answer the calls that were cut, before they are cancelled outright."""
_POLL = 0.05


@dataclass
class _Call:
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    status: int | None = None  # what the call answered, once it started answering
    at_shutdown: bool = False  # running when the shutdown began
    cut: bool = False  # still running when the grace ran out


class Shutdown:
    """The calls a server has in flight, and how its shutdown treats them; counts what became of each."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._calls: dict[int, _Call] = {}
        self._cut: anyio.Event | None = None
        self._emptied: anyio.Event | None = None  # set when the last call in flight ends
        self.draining = False
        self.finished = 0  # running at shutdown, and answered
        self.refused = 0  # not started (queued in a lane, or arriving): 503 at once
        self.cut = 0  # still running when the grace ran out: cut, 503

    @property
    def running(self) -> int:
        """Calls in flight now."""
        return len(self._calls)

    def cut_event(self) -> anyio.Event:
        """Set when the grace has run out and the calls still running are to be answered as cut."""
        if self._cut is None:
            self._cut = anyio.Event()
        return self._cut

    def cut_error(self) -> RuntimeClosedError:
        """What a cut call fails with (a 503 with Retry-After)."""
        return RuntimeClosedError("the server shut down before this call finished (its grace ran out); retry it "
                                  "on another server")

    def begin(self) -> _Call:
        """Register a call that starts now."""
        call = _Call()
        self._calls[id(call)] = call
        return call

    def end(self, call: _Call) -> None:
        """A call has ended: count what became of it if the shutdown saw it."""
        self._calls.pop(id(call), None)
        if not self._calls and self._emptied is not None:
            self._emptied.set()
        if not call.at_shutdown:
            return
        if call.cut:
            self.cut += 1
        elif call.status == 503:
            self.refused += 1  # it waited in a lane, or reached one after the shutdown began
        else:
            self.finished += 1

    async def drain(self, grace: float, *, stop: Callable[[], bool] = lambda: False) -> None:
        """Refuse what has not started, wait up to `grace` seconds for running calls, then cut the rest.

        `stop()` returning True (a second Ctrl-C) ends the grace early. Logs one line with the counts.
        """
        self.draining = True
        for call in self._calls.values():
            call.at_shutdown = True
        self._pool.drain()  # calls waiting in a lane fail at once with RuntimeClosedError: 503
        await self._wait(grace, stop)
        if self._calls:
            for call in self._calls.values():
                call.cut = True
            self.cut_event().set()  # the routes answer their cut calls (503, or an error event mid-stream)
            await self._wait(CUT_SECONDS, lambda: False)
            for call in list(self._calls.values()):
                call.scope.cancel()  # a route that did not answer: the gate answers for it
            await self._wait(CUT_SECONDS, lambda: False)
        event = log.warning if self.refused or self.cut or self._calls else log.info
        event("shut down", finished=self.finished, refused=self.refused, cut=self.cut, grace_seconds=grace,
              **({"unanswered": len(self._calls)} if self._calls else {}))

    async def _wait(self, seconds: float, stop: Callable[[], bool]) -> None:
        """Wait until no call runs, `seconds` have passed, or `stop()` says so."""
        with anyio.move_on_after(seconds):
            while self._calls and not stop():
                self._emptied = anyio.Event()
                with anyio.move_on_after(_POLL):  # stop() reads a flag a signal handler sets: look now and then
                    await self._emptied.wait()
