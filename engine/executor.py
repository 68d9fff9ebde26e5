"""Drives the ranks of one instance from rank 0.

Rank 0 lives in the calling process; ranks 1..world-1 are subprocesses running
`braid.engine.worker.main` that join through a TCPStore rank 0 binds on
a free loopback port (only there: braid.kv_transfer.stores). Each step, rank 0 broadcasts the encoded StepPlan (the
only command besides shutdown and a test-only gather) and runs its own share;
its StepResult comes back to the caller. A watchdog thread polls the subprocesses: when one exits
unexpectedly it records which, and kills the others so that any collective
rank 0 is blocked in fails at once; the step then raises RankFailure naming
the rank that died. No rank outlives the executor, and no rank outlives its
parent process.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time

import torch

from braid.engine.config import EngineConfig
from braid.engine.step_plan import StepPlan, StepResult
from braid.engine.worker import CMD_DRAFT, CMD_GATHER_KV, CMD_MTP, CMD_RANK_STATS, CMD_SHUTDOWN, CMD_STEP, RankStats, Worker
from braid.kv_transfer.stores import serve_store


class RankFailure(RuntimeError):
    """A rank of the instance died or failed; the engine cannot continue."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank} failed: {detail}")
        self.rank = rank


class Executor:
    """Rank 0's handle on every rank of the instance: spawns ranks 1..world-1,
    broadcasts each StepPlan, and turns any rank's death into RankFailure.
    `kv_layout` is the instance's KV layout descriptor (None without a KV role)."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.world = cfg.topology.world
        self.procs: list[subprocess.Popen] = []
        self.failure: RankFailure | None = None
        self._closing = False
        self._dead = False
        store = None
        if self.world > 1:
            # rank 0 hosts the rendezvous store for the whole life of the engine, on
            # loopback only (a plain TCPStore would listen on every interface)
            self.store = store = serve_store(
                "127.0.0.1", 0, self.world, datetime.timedelta(seconds=cfg.parallel.collective_timeout_s),
            )
            self._spawn(store.port)
        try:
            self.driver = Worker(cfg, 0, store)
        except Exception as e:
            self._kill_all()
            raise self.failure or e
        self.kv_layout = self.driver.connector.layout if self.driver.connector is not None else None
        if self.procs:
            threading.Thread(target=self._watch, daemon=True, name="rank-watchdog").start()

    def _spawn(self, port: int) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        for rank in range(1, self.world):
            cmd = [
                sys.executable, "-c", "import sys; from braid.engine.worker import main; main(sys.argv[1:])",
                "--rank", str(rank), "--store", f"127.0.0.1:{port}",
                "--config", self.cfg.to_json(), "--parent", str(os.getpid()),
            ]
            self.procs.append(subprocess.Popen(cmd, env=env))

    def _watch(self) -> None:
        while not self._closing:
            for rank, p in enumerate(self.procs, start=1):
                code = p.poll()
                if code is not None and not self._closing:
                    self.failure = RankFailure(rank, f"process exited with code {code}")
                    self._kill_all()
                    return
            time.sleep(0.05)

    def _kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def _failed(self, err: BaseException) -> RankFailure:
        """Name the rank behind a failed collective (waiting briefly for the watchdog)."""
        self._dead = True
        deadline = time.monotonic() + 5
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self._kill_all()
        return self.failure or RankFailure(0, f"{type(err).__name__}: {err}")

    def run(self, cmd: int, payload: torch.Tensor):
        """Broadcast a command and run rank 0's share; returns rank 0's result."""
        if self._dead or self.failure is not None:
            raise self.failure or RankFailure(0, "engine already failed")
        try:
            if self.world > 1:
                header = torch.tensor([cmd, payload.numel()], dtype=torch.int64)
                self.driver.par.world.broadcast(header, 0)
                self.driver.par.world.broadcast(payload, 0)
            return self.driver.handle(cmd, payload)
        except RankFailure:
            raise
        except Exception as e:
            if self.world == 1:
                raise
            raise self._failed(e) from e

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step on every rank; rank 0's result (logits, transfer progress)."""
        return self.run(CMD_STEP, plan.to_tensor())

    def draft(self, plan: StepPlan) -> torch.Tensor:
        """One pass of the draft model on every rank (speculative decoding); its logits."""
        return self.run(CMD_DRAFT, plan.to_tensor())

    def mtp(self, request: torch.Tensor) -> torch.Tensor:
        """MTP drafts on every rank (spec_decode/mtp.py encode_mtp_request): [S, max k]."""
        return self.run(CMD_MTP, request)

    def gather_kv(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Each rank's cache for these block ids, [L, n, C, H_local, B, D], indexed by rank."""
        return self.run(CMD_GATHER_KV, torch.tensor(block_ids, dtype=torch.int64))

    def rank_stats(self) -> list[RankStats]:
        """Per rank: weight bytes held and rows each routed expert computed."""
        return self.run(CMD_RANK_STATS, torch.zeros(0, dtype=torch.int64))

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.world > 1 and not self._dead and self.failure is None:
            try:
                header = torch.tensor([CMD_SHUTDOWN, 0], dtype=torch.int64)
                self.driver.par.world.broadcast(header, 0)
                for p in self.procs:
                    p.wait(timeout=30)
            except Exception:
                pass
        self._kill_all()
        self.driver.shutdown()
