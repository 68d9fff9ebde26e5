"""One rank: its model shard, its KV cache, and (for ranks > 0) the loop that
follows rank 0's broadcast commands.

Started by the executor as a subprocess calling `main([--rank R, --store HOST:PORT,
--config JSON, --parent PID])`; it exits when rank 0 says so, when its parent process goes
away, or on any error (which makes rank 0's next collective fail).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from braid.engine.config import EngineConfig, local_kv_heads
from braid.engine.loader import load_weights
from braid.engine.model_config import load_model_config
from braid.engine.model_runner import ModelRunner
from braid.engine.models import build_model
from braid.engine.step_plan import StepPlan
from braid.engine.parallel_state import ParallelState
from braid.engine.transfer import SendSpec, TransferWorker

CMD_SHUTDOWN = 0
CMD_STEP = 1
CMD_GATHER_KV = 2
CMD_KV_EXPECT = 3
CMD_KV_POLL = 4
CMD_KV_RELEASE = 5
CMD_KV_FINISH = 6

INCOMING, OUTGOING = 0, 1
ENDPOINT_BYTES = 256

def allocate_kv_cache(cfg: EngineConfig, model_cfg, device) -> torch.Tensor:
    """All layers' KV memory, allocated once: [layers, blocks, C, H_local, B, D]."""
    return torch.zeros(
        model_cfg.num_layers,
        cfg.cache.num_kv_blocks,
        model_cfg.cache_components,
        local_kv_heads(model_cfg, cfg.parallel.tensor_parallel_size),
        cfg.cache.block_size,
        model_cfg.cache_head_dim,
        dtype=cfg.torch_dtype,
        device=device,
    )


def _device_for(cfg: EngineConfig, rank: int) -> torch.device:
    if cfg.parallel.device == "cpu":
        return torch.device("cpu")
    if cfg.parallel.device == "npu":
        import torch_npu  # noqa: F401  (registers the npu device and hccl)
    return torch.device(cfg.parallel.device, rank % max(1, getattr(torch, cfg.parallel.device).device_count()))


class Worker:
    def __init__(self, cfg: EngineConfig, rank: int, store=None):
        self.cfg = cfg
        torch.set_num_threads(cfg.parallel.threads_per_rank or 1)
        torch.manual_seed(cfg.seed)
        self.model_cfg = load_model_config(cfg.model_path)
        device = _device_for(cfg, rank)
        topo = cfg.topology.for_rank(rank)
        self.par = ParallelState.initialize(topo, device, store, cfg.parallel.collective_timeout_s)
        dtype = cfg.torch_dtype
        with torch.device(device):
            self.model = build_model(self.model_cfg, self.par, dtype)
        load_weights(self.model, cfg.model_path, dtype)
        self.model.eval()
        self.kv_cache = allocate_kv_cache(cfg, self.model_cfg, device)
        for layer, attn in enumerate(self.model.attention_layers()):
            attn.cache = self.kv_cache[layer]
            attn.layer_idx = layer
        self.runner = ModelRunner(self.model, self.par, cfg.layout)
        self.transfer: TransferWorker | None = None
        if cfg.transfer.role is not None:
            self._start_transfer()

    def _start_transfer(self) -> None:
        """Open this rank's KV endpoints and learn every rank's, to describe the instance's layout."""
        from braid.kv_transfer.layout import describe_engine

        cfg = self.cfg
        self.transfer = TransferWorker(
            cfg.transfer.transport, self.rank, self.kv_cache, cfg.transfer.role, cfg.transfer.host, cfg.transfer.port, cfg.transfer.advertise_host
        )
        mine = torch.zeros(ENDPOINT_BYTES, dtype=torch.uint8)
        raw = self.transfer.endpoint.encode()
        if len(raw) > ENDPOINT_BYTES:
            raise ValueError(f"KV endpoint {self.transfer.endpoint!r} longer than {ENDPOINT_BYTES} bytes")
        mine[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        everyone = self.par.world.all_gather(mine)  # [world, ENDPOINT_BYTES]
        endpoints = [bytes(row.tolist()).rstrip(b"\0").decode() for row in everyone]
        self.transfer.layout = describe_engine(cfg, self.model_cfg, endpoints if cfg.transfer.role != "prefill" else None)

    @property
    def rank(self) -> int:
        return self.par.topo.rank

    def handle(self, cmd: int, payload: torch.Tensor):
        """Run one command; every rank calls this with the same payload. The
        return value matters on rank 0 only."""
        handler = self.handlers.get(cmd)
        if handler is None:
            raise RuntimeError(f"unknown command {cmd}")
        return handler(payload)

    @property
    def handlers(self):
        return {
            CMD_STEP: self._step,
            CMD_GATHER_KV: self._gather_kv,
            CMD_KV_EXPECT: self._kv_expect,
            CMD_KV_POLL: self._kv_poll,
            CMD_KV_RELEASE: self._kv_release,
            CMD_KV_FINISH: self._kv_finish,
        }

    def _step(self, payload: torch.Tensor) -> torch.Tensor:
        plan = StepPlan.decode(payload)
        on_layer = None
        if plan.transfers:
            on_layer = self.transfer.begin([self._send_spec(plan, t) for t in plan.transfers])
        return self.runner.run(plan, on_layer)

    @staticmethod
    def _send_spec(plan: StepPlan, t) -> SendSpec:
        from braid.proto import common_pb2

        seq = plan.seqs[t.seq_index]
        dest = common_pb2.KVLayout.FromString(t.dest_layout)
        return SendSpec(t.transfer_id, dest, t.dest_block_ids, seq.end, seq.block_table, t.timeout_ms / 1000)

    def _kv_expect(self, payload: torch.Tensor) -> None:
        """[tid, num_tokens, timeout_ms, block ids...]: register what this rank will
        receive; returns only once every rank has (so no byte arrives unexpected)."""
        tid, num_tokens, timeout_ms, *blocks = payload.tolist()
        self.transfer.expect(tid, num_tokens, blocks, timeout_ms / 1000)
        self.par.world.all_reduce(torch.zeros(1))

    def _kv_poll(self, payload: torch.Tensor) -> list[int]:
        """[direction, tids...] -> per tid 0 done, 1 pending, 2 failed, agreed by every rank (MAX)."""
        direction, *tids = payload.tolist()
        states = self.transfer.incoming_state(tids) if direction == INCOMING else self.transfer.outgoing_state(tids)
        return self.par.world.all_reduce(torch.tensor(states, dtype=torch.int64), op="max").tolist()

    def _kv_release(self, payload: torch.Tensor) -> None:
        """[direction, tids...]: forget these transfers on every rank; once this returns
        nothing of them is written or read any more, so their blocks may be reused."""
        direction, *tids = payload.tolist()
        for tid in tids:
            (self.transfer.release_incoming if direction == INCOMING else self.transfer.release_outgoing)(tid)
        self.par.world.all_reduce(torch.zeros(1))

    def _kv_finish(self, payload: torch.Tensor) -> None:
        """[tid, first_token, tid, first_token, ...]: end each transfer at its receivers."""
        values = payload.tolist()
        for tid, token in zip(values[0::2], values[1::2]):
            self.transfer.finish(tid, token)

    def _gather_kv(self, block_ids: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's cache rows for these block ids -> rank 0 (for tests and debugging)."""
        local = self.kv_cache[:, block_ids].contiguous()  # [L, n, C, H, B, D]
        return self.par.world.gather(local, 0)

    def shutdown(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
        self.par.shutdown()


def _exit_with_parent(parent: int) -> None:
    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def follow(worker: Worker) -> None:
    """Ranks > 0: run each command rank 0 broadcasts until told to stop."""
    header = torch.zeros(2, dtype=torch.int64)
    while True:
        worker.par.world.broadcast(header, 0)
        cmd, size = header.tolist()
        if cmd == CMD_SHUTDOWN:
            return
        payload = torch.empty(size, dtype=torch.int64)
        worker.par.world.broadcast(payload, 0)
        worker.handle(cmd, payload)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="one rank of a braid engine (started by the engine)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--store", required=True, help="HOST:PORT of rank 0's TCPStore")
    ap.add_argument("--config", required=True, help="EngineConfig as JSON")
    ap.add_argument("--parent", type=int, required=True)
    args = ap.parse_args(argv)
    _exit_with_parent(args.parent)
    cfg = EngineConfig.from_json(args.config)
    host, port = args.store.rsplit(":", 1)
    try:
        store = dist.TCPStore(
            host, int(port), cfg.topology.world, is_master=False,
            timeout=datetime.timedelta(seconds=cfg.parallel.collective_timeout_s),
        )
        worker = Worker(cfg, args.rank, store)
        follow(worker)
        worker.shutdown()
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
