"""One rank: its model shard, its KV cache, its half of the KV connector, and
(for ranks > 0) the loop that follows rank 0's broadcast commands: a STEP
(a StepPlan: sequences to run and the connector's metadata), SHUTDOWN, the
test-only GATHER_KV, or RANK_STATS (weights held and expert load per rank).

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
from dataclasses import dataclass

import torch
import torch.distributed as dist

from braid.engine.config import EngineConfig, cache_layers, local_kv_heads
from braid.engine.loader import load_weights
from braid.engine.model_config import load_model_config
from braid.engine.graph_runner import DecodeGraphs
from braid.engine.model_runner import ModelRunner
from braid.engine.spec_decode.mtp import decode_mtp_request
from braid.engine.models import build_model
from braid.engine.kv_connector.worker import KVConnectorWorker
from braid.engine.layers.linear import deferred_weights
from braid.engine.layers.moe import MoE
from braid.engine.parallel_state import ParallelState
from braid.engine.step_plan import StepPlan, StepResult

CMD_SHUTDOWN = 0
CMD_STEP = 1
CMD_GATHER_KV = 2
"""Test-only: every rank's cache rows for some blocks, gathered on rank 0."""
CMD_RANK_STATS = 3
"""Each rank's weight bytes and rows computed per routed expert, gathered on rank 0."""
CMD_DRAFT = 4
"""Run a StepPlan on the draft model (speculative decoding); rank 0 gets its logits."""
CMD_MTP = 5
"""Chain the MTP layer from the last step's hidden states (speculative decoding); rank 0 gets the drafts."""


@dataclass(frozen=True)
class RankStats:
    weight_bytes: int
    """Bytes of every parameter this rank holds."""
    expert_weight_bytes: int
    """Of which routed experts' weights."""
    expert_rows: torch.Tensor
    """[MoE layers, num_experts] token rows each routed expert computed on this rank
    since start (zero for experts it does not hold)."""

def allocate_kv_cache(cfg: EngineConfig, model_cfg, device) -> torch.Tensor:
    """All layers' KV memory, allocated once: [layers, blocks, C, H_local, B, D] (the
    model's layers, then its MTP layer's when the instance runs it: config.cache_layers)."""
    return torch.zeros(
        cache_layers(model_cfg, cfg),
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
    """One rank of an instance: its model shard, its preallocated KV cache, its
    process groups and its KVConnectorWorker. Every rank runs each StepPlan the
    same way; only rank 0's StepResult is used (by the Executor)."""

    def __init__(self, cfg: EngineConfig, rank: int, store=None):
        self.cfg = cfg
        torch.set_num_threads(cfg.parallel.threads_per_rank or 1)
        torch.manual_seed(cfg.seed)
        self.model_cfg = load_model_config(cfg.model_path)
        device = _device_for(cfg, rank)
        topo = cfg.topology.for_rank(rank)
        self.par = ParallelState.initialize(topo, device, store, cfg.parallel.collective_timeout_s)
        dtype = cfg.torch_dtype
        keep_fp8 = cfg.fp8_weights == "keep"
        # with keep, linear weights are placeholders until the loader knows which are float8
        with torch.device(device), deferred_weights(keep_fp8):
            self.model = build_model(self.model_cfg, self.par, dtype)
        load_weights(self.model, cfg.model_path, dtype, keep_fp8=keep_fp8)
        self.model.eval()
        self._prepack(self.model)
        self.kv_cache = allocate_kv_cache(cfg, self.model_cfg, device)
        mtp = cache_layers(self.model_cfg, cfg) > self.model_cfg.num_layers
        for layer, attn in enumerate(self.model.attention_layers() + self.model.mtp_attention_layers()[:int(mtp)]):
            attn.cache = self.kv_cache[layer]
            attn.layer_idx = layer
        graphs = self._graphs(device) if cfg.parallel.graph_mode and not mtp else None  # MTP: eager
        self.runner = ModelRunner(self.model, self.par, cfg.layout, mtp=mtp, graphs=graphs)
        if graphs is not None:
            graphs.warm_up()
        self.draft_runner = self._load_draft(device) if cfg.speculative.method == "draft" else None
        self.connector: KVConnectorWorker | None = None
        if cfg.transfer.role is not None:
            t = cfg.transfer
            self.connector = KVConnectorWorker(t.transport, t.role, self.rank, self.kv_cache, t.host, t.port,
                                               t.advertise_host, t.receiver_limits())
            self.connector.describe(cfg, self.model_cfg, self.par.world)

    def _load_draft(self, device) -> ModelRunner:
        """The draft model on this rank: the target's process groups and layout, its own
        KV cache with the same block ids (so a sequence's block table serves both)."""
        cfg = self.cfg
        path = cfg.speculative.draft_model
        draft_cfg = load_model_config(path)
        with torch.device(device):
            model = build_model(draft_cfg, self.par, cfg.torch_dtype)
        load_weights(model, path, cfg.torch_dtype)
        model.eval()
        self._prepack(model)
        self.draft_cache = allocate_kv_cache(cfg, draft_cfg, device)
        for layer, attn in enumerate(model.attention_layers()):
            attn.cache = self.draft_cache[layer]
            attn.layer_idx = layer
        return ModelRunner(model, self.par, cfg.layout)

    def _prepack(self, model: torch.nn.Module) -> None:
        """Linear weights into oneDNN's packed layout on CPU (parallel.cpu_packed_weights)."""
        if self.cfg.parallel.cpu_packed_weights:
            for m in model.modules():
                if hasattr(m, "prepack"):
                    m.prepack()

    def _graphs(self, device) -> DecodeGraphs:
        """Graph mode's compiled decode graphs; block tables as wide as max_model_len needs."""
        cfg = self.cfg
        width = -(-cfg.scheduler.max_model_len // cfg.layout.virtual_block_size)
        return DecodeGraphs(self.model, cfg.parallel.graph_batch_sizes, width, device)

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
        return {CMD_STEP: self._step, CMD_GATHER_KV: self._gather_kv, CMD_RANK_STATS: self._rank_stats,
                CMD_DRAFT: self._draft, CMD_MTP: self._mtp}

    def _step(self, payload: torch.Tensor) -> StepResult:
        """Apply the step's connector metadata, run the model if the step has
        sequences (sending KV layer by layer), then report transfer progress."""
        plan = StepPlan.from_tensor(payload)
        for src, dst in plan.copies:  # copy on write of a partly shared prefix block, before anything writes it
            self.kv_cache[:, dst] = self.kv_cache[:, src]
        on_layer = self.connector.start_step(plan.kv, plan.seqs) if self.connector is not None else None
        logits, prompt_lps = self.runner.run(plan, on_layer) if plan.seqs else (None, {})
        if self.connector is None:
            return StepResult(logits, prompt_logprobs=prompt_lps)
        states, firsts, errors, kv_bytes = self.connector.end_step(plan.kv, self.par.world)
        return StepResult(logits, states, firsts, errors, kv_bytes, prompt_lps)

    def _draft(self, payload: torch.Tensor) -> torch.Tensor:
        """One pass of the draft model (no KV transfer, no prompt logprobs): its logits."""
        if self.draft_runner is None:
            raise RuntimeError("this engine has no draft model")
        logits, _ = self.draft_runner.run(StepPlan.from_tensor(payload))
        return logits

    def _mtp(self, payload: torch.Tensor) -> torch.Tensor:
        """The MTP layer's drafts (runner.propose_mtp) for the sequences of a proposal."""
        if not self.runner.mtp:
            raise RuntimeError("this engine does not run the MTP layer (speculative.method mtp)")
        return self.runner.propose_mtp(*decode_mtp_request(payload))

    def _gather_kv(self, block_ids: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's cache rows for these block ids -> rank 0 (for tests and debugging)."""
        local = self.kv_cache[:, block_ids].contiguous()  # [L, n, C, H, B, D]
        return self.par.world.gather(local, 0)

    def _rank_stats(self, _payload: torch.Tensor) -> list[RankStats] | None:
        moe_layers = [m for m in self.model.modules() if isinstance(m, MoE)]
        experts = self.model_cfg.moe.num_experts if self.model_cfg.moe else 0
        rows = torch.zeros(len(moe_layers), experts, dtype=torch.int64)
        for i, m in enumerate(moe_layers):
            rows[i, m.first_expert : m.first_expert + m.expert_rows.numel()] = m.expert_rows
        # a packed weight (cpu_packed_weights) is held beside its emptied parameter
        named = [(n, p) for n, p in self.model.named_parameters()]
        named += [(n + "._packed", m._packed) for n, m in self.model.named_modules() if getattr(m, "_packed", None) is not None]
        total = sum(p.numel() * p.element_size() for _, p in named)
        routed = sum(p.numel() * p.element_size() for n, p in named if ".experts." in n)
        got = self.par.world.gather(torch.cat([torch.tensor([total, routed]), rows.flatten()]), 0)
        if got is None:
            return None
        return [RankStats(int(v[0]), int(v[1]), v[2:].view(len(moe_layers), experts)) for v in got]

    def shutdown(self) -> None:
        if self.connector is not None:
            self.connector.close()
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
