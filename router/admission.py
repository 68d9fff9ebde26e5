"""Admission control: at most `max_inflight` requests run, at most `max_queued` wait.

A request's path through it:

1. `acquire()`: with a free slot (and so, by the invariant below, nobody
   waiting) the request is admitted at once. Otherwise it joins a FIFO queue,
   unless `max_queued` requests already wait: then `Overloaded` is raised and
   the router answers RESOURCE_EXHAUSTED.
2. `release()` hands the slot straight to the oldest waiter, so a newcomer can
   never overtake the queue; with nobody waiting the slot becomes free.
3. A waiter cancelled in the queue (client gone, deadline, `asyncio.wait_for`
   timing out) leaves it. One cancelled just after being handed a slot passes
   the slot on, so no slot leaks.

Invariant: `queued > 0` implies `inflight == max_inflight`.

asyncio only, one event loop; the router bounds queueing time with the
request's deadline (`asyncio.wait_for(admission.acquire(), t)` is safe).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass


class Overloaded(Exception):
    """The queue is full (the router answers RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class AdmissionStats:
    """Counts for metrics."""

    inflight: int
    queued: int
    max_inflight: int
    max_queued: int
    admitted_total: int
    rejected_total: int
    cancelled_total: int
    """Waiters that left the queue cancelled."""


class AdmissionControl:
    """A FIFO, cancellation-safe semaphore with a bounded queue."""

    def __init__(self, max_inflight: int, max_queued: int):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued}")
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self._inflight = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._admitted = 0
        self._rejected = 0
        self._cancelled = 0

    @property
    def inflight(self) -> int:
        """Requests holding a slot."""
        return self._inflight

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            inflight=self._inflight,
            queued=len(self._waiters),
            max_inflight=self.max_inflight,
            max_queued=self.max_queued,
            admitted_total=self._admitted,
            rejected_total=self._rejected,
            cancelled_total=self._cancelled,
        )

    async def acquire(self) -> None:
        """Take a slot, waiting in FIFO order; Overloaded when the queue is full."""
        if self._inflight < self.max_inflight:
            self._inflight += 1
            self._admitted += 1
            return
        if len(self._waiters) >= self.max_queued:
            self._rejected += 1
            raise Overloaded(
                f"overloaded: {self._inflight} requests running and {len(self._waiters)} queued "
                f"(max_inflight={self.max_inflight}, max_queued={self.max_queued})"
            )
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            self._leave(fut)
            raise
        self._admitted += 1

    def _leave(self, fut: asyncio.Future) -> None:
        """A cancelled waiter's exit: out of the queue, or pass on a slot it was just handed."""
        self._cancelled += 1
        if fut.done() and not fut.cancelled():
            self.release()
            return
        with contextlib.suppress(ValueError):  # release() may have popped it already
            self._waiters.remove(fut)

    def release(self) -> None:
        """Give back a slot: to the oldest live waiter, else to the free pool."""
        if self._inflight <= 0:
            raise RuntimeError("release() without a matching acquire()")
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot changes hands; inflight stays
                return
        self._inflight -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """`async with admission.slot():` acquire, and release on every exit."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()
