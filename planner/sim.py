"""A discrete-event simulation of a disaggregated cluster (pure Python, heapq).

A request's life:

  1. arrives at the router, which queues it on the prefill instance with the
     fewest queued prompt tokens;
  2. waits until that instance is idle, then is prefilled in a batch (FCFS, up to
     max_num_seqs requests and max_num_batched_tokens new tokens; a prompt longer
     than the budget runs alone: no chunked prefill);
  3. its KV streams to decode layer by layer while the prefill runs; the first
     token is out when the prefill ends plus the exposed part of the transfer
     (TTFT);
  4. lands on the decode instance with the most free KV, waits there until
     max_num_seqs and the KV capacity admit it (blocks for prompt + output are
     reserved whole, so a running sequence never runs out);
  5. advances one token per decode step (continuous batching: steps run back to
     back while any sequence is running) until its output is complete.

Closed-loop workloads (concurrency N) start N requests at t = 0 and send the
next one when one completes. Events at equal times are taken in the order they
were scheduled, so a run is a function of its inputs.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from braid.planner.workload import Request


@dataclass
class _Decode:
    capacity: int
    running: list = field(default_factory=list)   # [request, tokens still to make]
    waiting: deque = field(default_factory=deque)
    used: int = 0
    ctx_sum: int = 0
    busy: bool = False
    peak_used: int = 0


@dataclass
class Result:
    ttft: dict
    tpot: dict
    finish: dict
    first_arrival: float
    last_finish: float
    output_tokens: int
    peak_kv_used: list
    kv_capacity: list

    @property
    def throughput(self) -> float:
        """Output tokens per second over the run."""
        return self.output_tokens / max(self.last_finish - self.first_arrival, 1e-12)


def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, -(-len(xs) * q // 100) - 1))
    return xs[int(k)]


class Simulation:
    """One cluster: n_p prefill instances of layout `p`, n_d decode instances of `d`."""

    def __init__(self, cost, p, n_p: int, d, n_d: int, requests: list[Request], concurrency: int | None = None):
        self.cost, self.p, self.d = cost, p, d
        cap = cost.kv_capacity_tokens(d)
        for r in requests:
            if r.prompt + r.output > cap:
                raise ValueError(f"request {r.rid}: {r.prompt + r.output} tokens exceed a decode instance's "
                                 f"KV capacity of {cap} tokens")
        self.requests = list(requests)
        self.concurrency = concurrency
        self.pq = [deque() for _ in range(n_p)]
        self.p_busy = [False] * n_p
        self.p_queued = [0] * n_p
        self.dec = [_Decode(cap) for _ in range(n_d)]
        self.heap, self.seq = [], itertools.count()
        self.arrival, self.ttft, self.finish, self.first = {}, {}, {}, {}
        self.pending = deque()

    def _at(self, t: float, kind: str, *payload) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, payload))

    def run(self) -> Result:
        if self.concurrency is None:
            for r in self.requests:
                self._at(r.arrival, "arrive", r)
        else:
            self.pending = deque(self.requests)
            for _ in range(min(self.concurrency, len(self.pending))):
                self._at(0.0, "arrive", self.pending.popleft())
        while self.heap:
            t, _, kind, payload = heapq.heappop(self.heap)
            getattr(self, "_on_" + kind)(t, *payload)
        missing = [r.rid for r in self.requests if r.rid not in self.finish]
        assert not missing, f"requests never completed: {missing[:5]}"
        return self._result()

    # -- prefill -----------------------------------------------------------------------------

    def _on_arrive(self, t: float, r: Request) -> None:
        self.arrival[r.rid] = t
        i = min(range(len(self.pq)), key=lambda k: (self.p_queued[k], k))
        self.pq[i].append(r)
        self.p_queued[i] += r.prompt - r.cached
        self._start_prefill(t, i)

    def _start_prefill(self, t: float, i: int) -> None:
        if self.p_busy[i] or not self.pq[i]:
            return
        batch, tokens = [], 0
        while self.pq[i] and len(batch) < self.p.max_num_seqs:
            new = self.pq[i][0].prompt - self.pq[i][0].cached
            if batch and tokens + new > self.p.max_num_batched_tokens:
                break
            batch.append(self.pq[i].popleft())
            tokens += new
        self.p_busy[i] = True
        dur = self.cost.prefill_time(self.p, [(r.prompt - r.cached, r.cached) for r in batch])
        self._at(t + dur, "prefilled", i, batch, dur, tokens)

    def _on_prefilled(self, t: float, i: int, batch: list, dur: float, tokens: int) -> None:
        self.p_busy[i] = False
        self.p_queued[i] -= tokens
        for r in batch:
            exposed = self.cost.transfer_time(self.p, self.d, r.prompt, dur)
            hops = self.cost.request_overhead_s
            self.ttft[r.rid] = t + exposed + hops - self.arrival[r.rid]
            self._at(t + exposed + hops, "landed", r)
        self._start_prefill(t, i)

    # -- decode ------------------------------------------------------------------------------

    def _on_landed(self, t: float, r: Request) -> None:
        j = min(range(len(self.dec)), key=lambda k: (self.dec[k].used - self.dec[k].capacity, k))
        self.dec[j].waiting.append(r)
        self._start_step(t, j)

    def _admit(self, inst: _Decode) -> None:
        while inst.waiting and len(inst.running) < self.d.max_num_seqs:
            r = inst.waiting[0]
            need = r.prompt + r.output
            if inst.used + need > inst.capacity:
                break  # FCFS: no overtaking by shorter requests
            inst.waiting.popleft()
            inst.used += need
            inst.ctx_sum += r.prompt
            inst.running.append([r, r.output - 1])  # the first token came from prefill
            inst.peak_used = max(inst.peak_used, inst.used)

    def _start_step(self, t: float, j: int) -> None:
        inst = self.dec[j]
        if inst.busy:
            return
        self._admit(inst)
        done = [e for e in inst.running if e[1] <= 0]
        for e in done:  # one-token outputs finish with their prefill
            self._complete(t, inst, e)
        if not inst.running:
            return
        inst.busy = True
        # Steps run back to back until a sequence finishes or another event is due:
        # one event for the run of steps, none of which changes the batch.
        batch, ctx, n, t_end = len(inst.running), inst.ctx_sum, 0, t
        until = min(e[1] for e in inst.running)
        horizon = self.heap[0][0] if self.heap else float("inf")
        while n < until and (n == 0 or t_end < horizon):  # at least one step: progress
            t_end += self.cost.decode_step_time(self.d, batch, ctx)
            ctx += batch
            n += 1
        self._at(t_end, "stepped", j, n)

    def _on_stepped(self, t: float, j: int, n: int) -> None:
        inst = self.dec[j]
        inst.busy = False
        inst.ctx_sum += n * len(inst.running)
        for e in inst.running:
            e[1] -= n
        for e in [e for e in inst.running if e[1] <= 0]:
            self._complete(t, inst, e)
        self._start_step(t, j)

    def _complete(self, t: float, inst: _Decode, entry: list) -> None:
        r = entry[0]
        inst.running.remove(entry)
        inst.used -= r.prompt + r.output
        inst.ctx_sum -= r.prompt + r.output - 1
        self.finish[r.rid] = t
        if self.concurrency is not None and self.pending:
            self._at(t, "arrive", self.pending.popleft())

    def _result(self) -> Result:
        tpot = {}
        for r in self.requests:
            if r.output > 1:
                first_token = self.arrival[r.rid] + self.ttft[r.rid]
                tpot[r.rid] = (self.finish[r.rid] - first_token) / (r.output - 1)
        return Result(ttft=dict(self.ttft), tpot=tpot, finish=dict(self.finish),
                      first_arrival=min(self.arrival.values()), last_finish=max(self.finish.values()),
                      output_tokens=sum(r.output for r in self.requests),
                      peak_kv_used=[d.peak_used for d in self.dec], kv_capacity=[d.capacity for d in self.dec])


def simulate(cost, p, n_p: int, d, n_d: int, requests: list[Request], concurrency: int | None = None) -> Result:
    return Simulation(cost, p, n_p, d, n_d, requests, concurrency).run()
