"""Micro-batching: concurrent single-item calls coalesced into one batched call, with no background task.

The first caller to join an empty batch leads it: it waits up to `max_wait` (or until the batch is full),
runs the batched function for everyone, and hands each caller its own result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

import anyio
import anyio.lowlevel

from multilane.errors import MultilaneError

In = TypeVar("In")
Out = TypeVar("Out")

__all__ = ["BatchError", "BatchStats", "MicroBatcher"]


class BatchError(MultilaneError, RuntimeError):
    """A batched function broke its contract (wrong number of results) or was interrupted mid-batch."""


@dataclass(frozen=True)
class BatchStats:
    """A snapshot of what a batcher has dispatched so far."""

    batches: int
    items: int
    largest_batch: int
    mean_batch_size: float


@dataclass(eq=False)
class _Slot(Generic[In, Out]):
    """One item waiting in a batch, and later its result or error."""

    item: In
    result: Out | None = None
    error: BaseException | None = None
    ok: bool = False


@dataclass(eq=False)
class _Batch(Generic[In, Out]):
    """Items gathered for one call of the batched function, and who is leading it."""

    deadline: float
    slots: list[_Slot[In, Out]] = field(default_factory=list)
    full: anyio.Event = field(default_factory=anyio.Event)
    wakeup: anyio.Event = field(default_factory=anyio.Event)
    leading: bool = False
    dispatched: bool = False
    done: bool = False


class MicroBatcher(Generic[In, Out]):
    """Coalesces concurrent single-item calls into one batched call.

    `fn` takes a list of items and returns one result per item, in order; an `Exception` instance in an item's
    slot fails that caller alone, while an exception raised by `fn` fails every caller of that batch.
    `fn` is awaited on the event loop by the leading caller: pass one that uses `anyio.to_thread` for blocking work.
    """

    def __init__(
        self,
        fn: Callable[[list[In]], Awaitable[Sequence[Out | Exception]]],
        *,
        max_batch_size: int = 64,
        max_wait: float = 0.002,
        name: str = "batch",
        validate: Callable[[In], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"batcher '{name}': max_batch_size must be at least 1, got {max_batch_size}")
        if not max_wait >= 0:  # also rejects nan
            raise ValueError(f"batcher '{name}': max_wait must be a number of seconds >= 0, got {max_wait}")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = float(max_wait)
        self.name = name
        self._validate = validate
        self._open: _Batch[In, Out] | None = None
        self._batches = 0
        self._items = 0
        self._largest = 0

    def stats(self) -> BatchStats:
        """Return how many batches and items went to `fn`, the largest batch and the mean batch size."""
        mean = self._items / self._batches if self._batches else 0.0
        return BatchStats(self._batches, self._items, self._largest, mean)

    async def submit(self, item: In) -> Out:
        """Add one item to the next batch and return its result (or raise its error)."""
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[In]) -> list[Out]:
        """Add several items, kept together and in order, and return their results in order.

        More than `max_batch_size` items are split across consecutive batches; the first failed item's error is raised.
        """
        if self._validate is not None:
            for item in items:
                self._validate(item)
        if not items:
            await anyio.lowlevel.checkpoint()
            return []
        placed = self._enqueue(items)
        try:
            for batch, _ in placed:
                await self._join(batch)
        except BaseException:
            for batch, slots in placed:
                self._withdraw(batch, slots)
            raise
        results: list[Out] = []
        for _, slots in placed:
            for slot in slots:
                if slot.error is not None:
                    raise slot.error
                if not slot.ok:
                    raise BatchError(f"batcher '{self.name}': the batch was interrupted before it produced results")
                results.append(cast(Out, slot.result))
        return results

    def _enqueue(self, items: Sequence[In]) -> list[tuple[_Batch[In, Out], list[_Slot[In, Out]]]]:
        """Put items into the open batch (closing it early if they do not fit) in chunks of at most max_batch_size."""
        placed: list[tuple[_Batch[In, Out], list[_Slot[In, Out]]]] = []
        size = self.max_batch_size
        for start in range(0, len(items), size):
            chunk = [_Slot[In, Out](item) for item in items[start : start + size]]
            batch = self._open
            if batch is not None and len(batch.slots) + len(chunk) > size:
                self._close(batch)
                batch = None
            if batch is None:
                batch = _Batch[In, Out](deadline=anyio.current_time() + self.max_wait)
                self._open = batch
            batch.slots.extend(chunk)
            if len(batch.slots) >= size:
                self._close(batch)
            placed.append((batch, chunk))
        return placed

    async def _join(self, batch: _Batch[In, Out]) -> None:
        """Wait until the batch is done, leading it whenever nobody else is."""
        while not batch.done:
            if batch.leading or batch.dispatched:
                await batch.wakeup.wait()
                continue
            batch.leading = True
            try:
                with anyio.CancelScope(deadline=batch.deadline):
                    await batch.full.wait()
            except BaseException:
                batch.leading = False  # hand over: the caller withdraws its items and wakes the others
                raise
            self._close(batch)
            batch.dispatched = True
            with anyio.CancelScope(shield=True):
                await self._run(batch)
            await anyio.lowlevel.checkpoint_if_cancelled()  # a leader cancelled meanwhile still delivered results

    async def _run(self, batch: _Batch[In, Out]) -> None:
        """Call fn once for the batch and fill in every slot; wake all waiters however it ends."""
        slots = batch.slots
        try:
            if not slots:
                return
            self._batches += 1
            self._items += len(slots)
            self._largest = max(self._largest, len(slots))
            try:
                results = await self._fn([slot.item for slot in slots])
            except Exception as exc:
                for slot in slots:
                    slot.error = exc
                return
            if not isinstance(results, Sequence) or len(results) != len(slots):
                got = f"{len(results)} results" if isinstance(results, Sequence) else type(results).__name__
                error = BatchError(
                    f"batcher '{self.name}': the batched function returned {got} for {len(slots)} items; "
                    "it must return a list with one result per item, in order"
                )
                for slot in slots:
                    slot.error = error
                return
            for slot, result in zip(slots, results, strict=True):
                if isinstance(result, Exception):
                    slot.error = result
                else:
                    slot.result = result
                    slot.ok = True
        finally:
            batch.done = True
            self._notify(batch)

    def _close(self, batch: _Batch[In, Out]) -> None:
        """Stop the batch taking items and wake its leader to dispatch it now."""
        batch.full.set()
        if self._open is batch:
            self._open = None

    def _withdraw(self, batch: _Batch[In, Out], slots: list[_Slot[In, Out]]) -> None:
        """Take a cancelled caller's items out of a batch not yet dispatched, and let another waiter lead."""
        if batch.dispatched:
            return
        gone = {id(slot) for slot in slots}
        batch.slots = [slot for slot in batch.slots if id(slot) not in gone]
        if not batch.slots and self._open is batch:
            self._open = None
        self._notify(batch)

    @staticmethod
    def _notify(batch: _Batch[In, Out]) -> None:
        """Wake every caller waiting on the batch so each re-checks whether it is done or needs a leader."""
        wakeup, batch.wakeup = batch.wakeup, anyio.Event()
        wakeup.set()
