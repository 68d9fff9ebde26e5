"""An EngineCore on its own thread, driven from asyncio (the node servers).

The engine thread owns the EngineCore: it runs submitted calls between steps,
steps while there is work, and hands each TokenEvent to the asyncio loop,
where the request's subscriber queue receives it. Calls from asyncio
(`await engine.call(fn)`) run `fn(core)` on the engine thread, so the core is
never touched from two threads.

Errors: one request's failure (a call that raises, a row that cannot be sampled,
a failed step's batch) reaches that request's caller or subscriber only. Only a
dead rank (RankFailure, noticed within IDLE_WAIT_S even while idle) ends the
engine: every subscriber then gets an error event, later calls raise EngineDead,
and the `on_dead` listeners run on the loop (the node leaves the pool and exits).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Callable

from braid.engine.config import EngineConfig
from braid.engine.core import EngineCore, TokenEvent
from braid.engine.events import DuplicateRequest

IDLE_WAIT_S = 1.0
"""The longest the engine thread sleeps with nothing to do (a call or stop wakes it at once)."""

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine stopped (a rank failed or it was shut down)."""


class AsyncEngine:
    def __init__(self, cfg: EngineConfig, loop: asyncio.AbstractEventLoop | None = None, backoff_s: float = 0.002):
        self.core = EngineCore(cfg)  # blocking: starts every rank
        self.loop = loop or asyncio.get_event_loop()
        self.backoff_s = backoff_s
        """Pause between steps that only watch transfers in flight."""
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._subscribers: dict[str, asyncio.Queue] = {}
        self._stopping = threading.Event()
        self.dead: BaseException | None = None
        self._dead_listeners: list[Callable[[BaseException], Any]] = []
        self.load = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- asyncio side ----------------------------------------------------------
    async def call(self, fn: Callable[[EngineCore], Any]) -> Any:
        """Run fn(core) on the engine thread; its result or exception comes back here."""
        if self.dead is not None:
            raise EngineDead(str(self.dead))
        fut = self.loop.create_future()
        self._calls.put((fn, fut))
        return await fut

    def subscribe(self, request_id: str) -> asyncio.Queue:
        """Events of `request_id` from now on (create before the request can produce any)."""
        q = self._subscribers.get(request_id)
        if q is None:
            q = self._subscribers[request_id] = asyncio.Queue()
        return q

    def subscribe_new(self, request_id: str) -> asyncio.Queue:
        """Like subscribe, but DuplicateRequest when the id already has a subscriber: a
        second call with a live id must neither share nor (on its failure) drop that queue."""
        if request_id in self._subscribers:
            raise DuplicateRequest(f"request id {request_id!r} is already in use")
        return self.subscribe(request_id)

    def unsubscribe(self, request_id: str) -> None:
        self._subscribers.pop(request_id, None)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for ev in events:
            q = self._subscribers.get(ev.request_id)
            if q is not None:
                q.put_nowait(ev)

    def on_dead(self, callback: Callable[[BaseException], Any]) -> None:
        """callback(error) on the loop once the engine has died (at once if it has)."""
        if self.dead is not None:
            self.loop.call_soon_threadsafe(callback, self.dead)
        else:
            self._dead_listeners.append(callback)

    def _died(self, error: BaseException) -> None:
        """On the loop: tell every subscriber, then every on_dead listener."""
        for rid, q in list(self._subscribers.items()):
            q.put_nowait(TokenEvent(rid, None, True, "error", f"engine failed: {error}"))
        for cb in list(self._dead_listeners):
            try:
                cb(error)
            except Exception:  # noqa: BLE001 - one listener must not stop the others
                log.exception("engine death listener failed")

    async def stop(self) -> None:
        self._stopping.set()
        self._calls.put(None)  # wakes the engine thread if it waits for calls
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 60)
        await asyncio.get_running_loop().run_in_executor(None, self.core.shutdown)

    # -- engine thread ---------------------------------------------------------
    def _resolve(self, fut: asyncio.Future, ok: bool, value: Any) -> None:
        def set_it():
            if not fut.done():
                (fut.set_result if ok else fut.set_exception)(value)

        self.loop.call_soon_threadsafe(set_it)

    def _run_calls(self, block_s: float | None) -> None:
        """Run queued calls, waiting up to `block_s` (None: IDLE_WAIT_S) for the first."""
        try:
            item = self._calls.get_nowait() if block_s == 0 else self._calls.get(timeout=block_s or IDLE_WAIT_S)
        except queue.Empty:
            return
        while item is not None:  # None: stop() woke us
            fn, fut = item
            try:
                self._resolve(fut, True, fn(self.core))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._resolve(fut, False, e)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _snapshot(self) -> dict[str, int]:
        """The instance's load, named as the wire's `braid.v1.Load` fields (the node
        sends it as is); replaced whole after each pass, so readers on other threads
        see one consistent snapshot."""
        c = self.core
        return dict(
            queued_prefill_tokens=sum(len(s) for s in c.scheduler.waiting),
            free_kv_blocks=c.blocks.num_free,
            total_kv_blocks=c.blocks.num_blocks,
            running_seqs=len(c.scheduler.running),
            waiting_seqs=len(c.scheduler.waiting) + len(c.kv.incoming),
            reserved_blocks=c.kv.reserved_blocks(),
        )

    def _refresh_load(self) -> None:
        try:
            self.load = self._snapshot()
        except Exception:  # noqa: BLE001 - a load report is no reason to stop; keep the last one
            log.exception("engine load snapshot failed")

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                # with nothing to do, sleep on the call queue (near zero CPU); while
                # transfers are in flight and nothing else runs, back off a little
                # between the steps that watch them; after a model step, go on at once
                wait = self.core.next_step_in(self.backoff_s) if self.core.has_unfinished() else None
                self._run_calls(wait)
                if self.core.has_unfinished() and not self._stopping.is_set():
                    events = self.core.step()
                    if events:
                        self.loop.call_soon_threadsafe(self._deliver, events)
                self._refresh_load()
                fatal = self.core.fatal_error()  # a rank may die while nothing runs
                if fatal is not None:
                    raise fatal
        except BaseException as e:  # noqa: BLE001 - only fatal errors reach here: tell everyone
            log.exception("engine failed")
            self.dead = e
            self.loop.call_soon_threadsafe(self._died, e)
        finally:
            # answer calls still queued so no caller waits forever
            while True:
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    continue
                _, fut = item
                self._resolve(fut, False, EngineDead(str(self.dead or "engine stopped")))
