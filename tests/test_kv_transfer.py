"""KV pushed from a prefill instance into a decode instance, engine to engine,
over real transports on loopback (each instance with its own rank processes)."""
from __future__ import annotations

import time

import pytest
import torch

from braid.engine.config import EngineConfig
from braid.engine.core import EngineCore
from braid.engine.kv_connector.types import TransferTarget
from braid.engine.kv_layout import ShardLayout
from braid.engine.sampling import SamplingParams
from conftest import prompt_of

B = 4
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def model_path(checkpoints, name: str) -> str:
    """conftest's checkpoints, or a DeepSeek-V2 one from test_deepseek_v2 (built beside them)."""
    if name.startswith("ds-"):
        import os

        from deepseek_fixtures import CONFIGS, build_deepseek

        path = os.path.join(checkpoints.root, name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            build_deepseek(path, CONFIGS[name])
        return path
    return checkpoints.get(name)


def engine(checkpoints, name, role, transport, tp=1, pcp=1, dcp=1, blocks=96) -> EngineCore:
    return EngineCore(
        EngineConfig.build(
            model_path(checkpoints, name),
            tensor_parallel_size=tp,
            prefill_context_parallel_size=pcp,
            decode_context_parallel_size=dcp,
            block_size=B,
            num_kv_blocks=blocks,
            kv_role=role,
            kv_transport=transport,
        )
    )


def reserve_target(D: EngineCore, rid: str, prompt, params, lease_s: float) -> TransferTarget:
    """Reserve on D and claim it (as D's Decode stream does); the target P pushes into."""
    reservation = D.reserve(rid, prompt, params, lease_s)
    D.claim(rid)
    return TransferTarget.of(reservation, D.kv_layout)


def run_pd(P: EngineCore, D: EngineCore, prompts, params=GREEDY, lease=60.0, timeout=60.0, deadline_s=120.0, hook=None):
    """Reserve on D, prefill on P, decode on D; returns (tokens per request, P events, D errors)."""
    outputs, p_events, d_errors = {}, {}, {}
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        P.add_transfer_request(rid, p, params, reserve_target(D, rid, p, params, lease), timeout)
        outputs[rid] = []
    finished = set()
    end = time.monotonic() + deadline_s
    while len(finished) < len(prompts):
        assert time.monotonic() < end, f"transfer did not finish: {len(finished)}/{len(prompts)} done"
        for ev in P.step():
            p_events[ev.request_id] = ev
        if hook is not None:
            hook()
        for ev in D.step():
            if ev.finish_reason == "error":
                d_errors[ev.request_id] = ev.error
                finished.add(ev.request_id)
                continue
            outputs[ev.request_id].append(ev.token_id)
            if ev.finished:
                finished.add(ev.request_id)
    # the prefill side releases its blocks once every receiver acknowledged
    while P.has_unfinished() and time.monotonic() < end:
        for ev in P.step():
            p_events[ev.request_id] = ev
    return [outputs[f"r{i}"] for i in range(len(prompts))], p_events, d_errors


PAIRS = [
    # (model, P (tp, pcp), D (tp, dcp))
    pytest.param("kv1", (1, 2), (2, 2), id="P-pcp2-tp1_D-tp2-dcp2"),
    pytest.param("kv2", (2, 1), (1, 1), id="P-tp2_D-tp1"),
    pytest.param("kv2", (1, 2), (2, 1), id="P-pcp2_D-tp2-headsliced"),
    pytest.param("kv1", (2, 2), (2, 2), id="P-pcp2-tp2_D-tp2-dcp2"),
]
MLA_PAIRS = [
    # DeepSeek-V2 (MLA + MoE): only the latent moves, one copy per KV shard
    pytest.param("ds-moe", (1, 2), (2, 2), id="mla-P-pcp2_D-tp2-dcp2"),
    pytest.param("ds-dense", (2, 1), (2, 1), id="mla-P-tp2_D-tp2"),
]


@pytest.mark.parametrize("transport", ["tcp", "collective"])
@pytest.mark.parametrize("name,p_shape,d_shape", PAIRS + MLA_PAIRS)
def test_pd_transfer_greedy_equals_transformers(checkpoints, transport, name, p_shape, d_shape):
    prompts = [prompt_of(n, seed=500 + n) for n in (1, 3, 4, 9, 17, 33, 50, 8)]  # 8 concurrent requests
    P = engine(checkpoints, name, "prefill", transport, tp=p_shape[0], pcp=p_shape[1])
    D = engine(checkpoints, name, "decode", transport, tp=d_shape[0], dcp=d_shape[1])
    try:
        outs, p_events, d_errors = run_pd(P, D, prompts)
        assert not d_errors
        if name.startswith("ds-"):
            assert P.kv_layout.format == 2 and D.kv_layout.num_kv_heads == 1  # KV_FORMAT_MLA: one latent head
        for p, out in zip(prompts, outs):
            assert out == checkpoints.greedy(name, p, GREEDY.max_tokens), f"prompt length {len(p)}"
        assert sorted(p_events) == sorted(f"r{i}" for i in range(len(prompts)))
        for ev in p_events.values():
            assert ev.finish_reason == "transferred" and ev.stats["kv_bytes"] > 0, ev
        assert D.blocks.num_free == D.blocks.num_blocks and not D.kv.incoming
        assert P.blocks.num_free == P.blocks.num_blocks and not P.kv.outgoing
    finally:
        P.shutdown()
        D.shutdown()


def _expected_decode_cache(p_caches, p_topo, d_topo, num_tokens, p_blocks, d_blocks, d_shape, kv_heads):
    """Brute force: where D's own layout puts every (layer, token, kv head) byte P computed."""
    np_, nd = p_topo.cp_size, d_topo.cp_size
    lp, ld = ShardLayout(B, np_, B), ShardLayout(B, nd, B)

    def heads_of(topo, rank):
        tp, t = topo.tp, topo.for_rank(rank).tp_rank
        return list(range(t * kv_heads // tp, (t + 1) * kv_heads // tp)) if tp <= kv_heads else [t // (tp // kv_heads)]

    out = {}
    for d_rank in range(d_topo.world):
        d_shard = d_topo.for_rank(d_rank).cp_rank
        d_heads = heads_of(d_topo, d_rank)
        exp = torch.zeros(d_shape)  # [L, n, C, H, B, D]
        for x in range(num_tokens):
            ps, pvb, poff = lp.owner(x)
            ds, dvb, doff = ld.owner(x)
            if ds != d_shard:
                continue
            for hi, h in enumerate(d_heads):
                p_rank = next(r for r in range(p_topo.world) if p_topo.for_rank(r).cp_rank == ps and h in heads_of(p_topo, r))
                ph = heads_of(p_topo, p_rank).index(h)
                exp[:, dvb, :, hi, doff] = p_caches[p_rank][:, pvb, :, ph, poff]
        out[d_rank] = (exp, d_heads)
    return out


@pytest.mark.parametrize("name,p_shape,d_shape", PAIRS)
def test_decode_cache_holds_exactly_the_prefill_bytes(checkpoints, name, p_shape, d_shape):
    """After the transfer, D's blocks hold bit for bit the KV P computed, where D's own
    layout puts it; and (within fp32 rounding) what D computes prefilling the prompt itself."""
    prompt = prompt_of(37, seed=7)
    P = engine(checkpoints, name, "prefill", "tcp", tp=p_shape[0], pcp=p_shape[1])
    D = engine(checkpoints, name, "decode", "tcp", tp=d_shape[0], dcp=d_shape[1])
    own = engine(checkpoints, name, None, "tcp", tp=d_shape[0], dcp=d_shape[1])
    try:
        captured = {}

        def capture():
            if "d" not in captured and D.requests.get("r0") is not None and not D.kv.incoming:
                seq = D.requests["r0"]
                captured["d"] = D.executor.gather_kv(list(seq.block_table))
                captured["d_blocks"] = list(seq.block_table)

        p_seq_blocks = {}
        orig_step = P.step

        def p_step():
            evs = orig_step()
            for tr in P.kv.outgoing.values():
                p_seq_blocks.setdefault("p", list(tr.seq.block_table))
                if "p_cache" not in captured:
                    captured["p_cache"] = P.executor.gather_kv(list(tr.seq.block_table))
            return evs

        P.step = p_step
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)  # still running after its KV lands
        outs, _, errors = run_pd(P, D, [prompt], params=params, hook=capture)
        assert not errors and "d" in captured
        seq = own.add_request(prompt, params)
        own.step()
        own_cache = own.executor.gather_kv(list(seq.block_table))
        d_topo, p_topo = D.config.topology, P.config.topology
        expected = _expected_decode_cache(
            captured["p_cache"], p_topo, d_topo, len(prompt), p_seq_blocks["p"], captured["d_blocks"],
            captured["d"][0].shape, D.model_config.num_kv_heads,
        )
        ld = ShardLayout(B, d_topo.cp_size, B)
        for d_rank, (exp, _) in expected.items():
            got = captured["d"][d_rank]
            shard = d_topo.for_rank(d_rank).cp_rank
            n_local = ld.local_len(len(prompt), shard)
            for li in range(n_local):
                vb, off = divmod(li, B)
                assert torch.equal(got[:, vb, :, :, off], exp[:, vb, :, :, off]), f"rank {d_rank} local slot {li}"
                torch.testing.assert_close(got[:, vb, :, :, off], own_cache[d_rank][:, vb, :, :, off], atol=1e-5, rtol=1e-5)
                if (p_shape[0], p_shape[1]) == (d_shape[0], 1):  # same TP split and no PCP: same arithmetic
                    assert torch.equal(got[:, vb, :, :, off], own_cache[d_rank][:, vb, :, :, off])
    finally:
        P.shutdown()
        D.shutdown()
        own.shutdown()


def test_a_decode_engine_waiting_for_kv_does_not_step_its_ranks_every_poll(checkpoints):
    """While D only waits for a prefill's KV, the driver polls it every 2 ms; the ranks
    (broadcast + all-reduce each) run a watch step only when rank 0's receiver reports
    an ended transfer, at a deadline, or every WATCH_SYNC_S: a brute-force bound from
    that rule over the elapsed time. Then the KV arrives and decoding is exact."""
    from braid.engine.kv_connector.watch import WATCH_SYNC_S

    P = engine(checkpoints, "kv1", "prefill", "tcp", tp=2)
    D = engine(checkpoints, "kv1", "decode", "tcp", tp=2)
    try:
        ran = []
        execute = D.executor.execute
        D.executor.execute = lambda plan: (ran.append(time.monotonic()), execute(plan))[1]
        prompt = prompt_of(13, 3)
        target = reserve_target(D, "w", prompt, GREEDY, 60.0)
        ran.clear()
        start = time.monotonic()
        while time.monotonic() - start < 0.6:  # bounded: the driver's back-off between polls
            assert D.step() == [] and not D.ran_batch
            time.sleep(0.002)
        elapsed = time.monotonic() - start
        assert 1 <= len(ran) <= elapsed / WATCH_SYNC_S + 2, f"{len(ran)} rank steps in {elapsed:.2f} s of waiting"
        P.add_transfer_request("w", prompt, GREEDY, target, 60.0)
        tokens, done, end = [], False, time.monotonic() + 60
        while not done:
            assert time.monotonic() < end, "the KV never landed"
            P.step()
            for ev in D.step():
                assert ev.finish_reason != "error", ev.error
                tokens.append(ev.token_id)
                done = done or ev.finished
        assert tokens == checkpoints.greedy("kv1", prompt, GREEDY.max_tokens)
    finally:
        P.shutdown()
        D.shutdown()
