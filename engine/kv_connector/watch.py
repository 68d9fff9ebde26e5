"""When a step that only watches transfers in flight is worth running on the ranks.

Such a step (no sequence to run: a decode node waiting for a prefill's KV, a
prefill node for its sends to drain) costs every rank a broadcast and an
all-reduce. The driver polls every couple of milliseconds; before, each poll ran
one: 500 a second on every rank for a whole prefill, half a core of a 2-core
host taken from the prefill beside it. Now one runs when rank 0's own transports
report an ended transfer (then every poll for WATCH_FAST_S: the other ranks'
pieces land about then), at a lease's deadline, and at least every WATCH_SYNC_S
(a failure only another rank saw).
"""
from __future__ import annotations

import time

WATCH_SYNC_S = 0.05
WATCH_FAST_S = 0.1


class TransferWatch:
    def __init__(self):
        self.last_run = 0.0
        self.ended = 0
        self.fast_until = 0.0

    def ran(self, now: float) -> None:
        """A step reached the ranks at `now`."""
        self.last_run = now

    def step_due(self, batch, scheduler, kv, connector) -> bool:
        """Whether the step about to run (`batch`: the scheduler's, or None) must reach the
        ranks; `kv` is the connector's scheduler half, `connector` rank 0's worker half."""
        if batch is not None or kv.has_queued() or scheduler.waiting or scheduler.running or not kv.in_flight():
            return True
        if connector is None:
            return True
        now = time.monotonic()
        ended = connector.poll_local()
        if ended != self.ended:
            self.ended = ended
            self.fast_until = now + WATCH_FAST_S
        deadline = kv.next_deadline()
        return (deadline is not None and deadline <= now) or now < self.fast_until or now - self.last_run >= WATCH_SYNC_S
