"""braid.planner against independent references.

  * operator counts: the constants of ../shared/reference/simulator.md and the
    parameters of transformers' own models;
  * the seed table (vllm-ascend CP guide, 910C): fitted on a model's baseline
    row only, the PCP 2 row is predicted by the cost model's transforms;
  * the discrete-event simulation: a brute-force FCFS schedule and a naive
    step-by-step decode loop, KV capacity and conservation;
  * the search: exhaustive enumeration and evaluation of a small space;
  * the CLI: runs, prints seconds, writes an overlay that tests/test_manifests.py's
    own checks accept.
"""
from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest

from braid.planner.cost import CostModel, Instance
from braid.planner.fit import Point, fit_prefill, predict
from braid.planner.hardware import BUILTIN, hardware_from_dict, load_hardware
from braid.planner.model import load_model
from braid.planner.search import Deployment, deployments, evaluate, search
from braid.planner.sim import percentile, simulate
from braid.planner.workload import Workload, workload_from_dict

ROOT = Path(__file__).resolve().parents[1]

# -- operator counts -------------------------------------------------------------------------


def test_linear_flops_attention_and_kv_match_the_reference_constants():
    ds, qw = load_model("deepseek-r1"), load_model("qwen3-235b-a22b")
    # simulator.md section 3: 71.2 / 41.8 GFLOP per token; 2.50e6 / 1.54e6 L^2; 70.3 / 192.5 KB per token
    assert ds.linear_flops_per_token() / 1e9 == pytest.approx(71.2, abs=0.05)
    assert qw.linear_flops_per_token() / 1e9 == pytest.approx(41.8, abs=0.05)
    assert 2 * ds.layers * ds.attn_proj_params() / 1e9 == pytest.approx(22.8, abs=0.05)
    assert ds.causal_prefill_attn_flops(131072) / 131072**2 == pytest.approx(2.50e6, rel=0.005)
    assert qw.causal_prefill_attn_flops(131072) / 131072**2 == pytest.approx(1.54e6, rel=0.005)
    assert ds.kv_bytes_per_token() / 1000 == pytest.approx(70.3, abs=0.05)
    assert qw.kv_bytes_per_token() / 1000 == pytest.approx(192.5, abs=0.05)
    assert ds.weight_bytes == 1 and qw.weight_bytes == 2


def _matrix_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.dim() >= 2)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v3"])
def test_parameter_count_matches_transformers(arch):
    """Every matrix of transformers' model (routers excepted: the planner leaves them
    out of the per-token count) equals the planner's total."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
    extra = {
        "llama": dict(intermediate_size=96, num_key_value_heads=2),
        "qwen3_moe": dict(intermediate_size=96, num_key_value_heads=2, head_dim=16, num_experts=8,
                          num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
        "deepseek_v3": dict(intermediate_size=96, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                            first_k_dense_replace=1, n_group=2, topk_group=1),
    }[arch]
    cfg = AutoConfig.for_model(arch, **common, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    spec = load_model(cfg.to_dict())
    routers = spec.moe_layers * spec.routed_experts * spec.hidden
    assert _matrix_params(model) == spec.total_params() + routers


def test_gguf_metadata_reads_into_the_same_counts(tmp_path):
    from gguf_fixtures import build_tiny_gguf

    path, reference = build_tiny_gguf(str(tmp_path), "llama", "F32")
    spec = load_model(path)
    assert (spec.layers, spec.kv_heads, spec.head_dim) == (2, 2, 64)
    assert _matrix_params(reference) == spec.total_params()


# -- the seed table --------------------------------------------------------------------------------

BASELINE = Instance(dp=2, tp=8, ep=16)  # "DP2 TP8 EP16" on 16 dies, one request in flight
SEED = {  # model: (lengths, baseline TTFT, PCP 2 TTFT, PCP 2 layout)
    "deepseek-r1": ((32768, 65536, 131072), (9.3, 22.8, 73.2), (7.9, 15.9, 46.0), Instance(tp=8, pcp=2, dcp=8, ep=16)),
    "qwen3-235b-a22b": ((32768, 65536, 122880), (5.1, 13.1, 33.9), (3.0, 8.9, 22.7),
                        Instance(tp=8, pcp=2, dcp=2, ep=16)),
}


def _seed_predictions(name):
    lengths, base, pcp, layout = SEED[name]
    model = load_model(name)
    hw = fit_prefill(model, BUILTIN["910c"], [Point(BASELINE, n, t) for n, t in zip(lengths, base)])
    return hw, predict(model, hw, BASELINE, lengths), predict(model, hw, layout, lengths)


def _check_seed(name):
    _, base, pcp, _ = SEED[name]
    _, pred_base, pred_pcp = _seed_predictions(name)
    for i in range(3):
        assert pred_base[i] == pytest.approx(base[i], rel=0.10), f"baseline fit, point {i}"
        assert pred_pcp[i] == pytest.approx(pcp[i], rel=0.15), f"PCP 2 prediction, point {i}"
        assert pred_base[i] / pred_pcp[i] == pytest.approx(base[i] / pcp[i], abs=0.15), f"PCP speedup, point {i}"


def test_seed_deepseek_r1_pcp2_row_predicted_from_the_baseline_row():
    _check_seed("deepseek-r1")


@pytest.mark.xfail(strict=True, reason=(
    "the published Qwen3 32k PCP point (5.1 -> 3.0 s, speedup 1.70, larger than at 64k and 120k) is beyond a "
    "model whose PCP gain comes from attention: predicted 4.08 s (+36%), speedup 1.25; 64k and 120k are "
    "within 8% and 0.11"))
def test_seed_qwen3_pcp2_row_predicted_from_the_baseline_row():
    _check_seed("qwen3-235b-a22b")


def test_builtin_910c_factors_are_the_deepseek_baseline_fit():
    hw, _, _ = _seed_predictions("deepseek-r1")
    assert hw.factors.token_s == pytest.approx(BUILTIN["910c"].factors.token_s, rel=0.01)
    assert hw.factors.attn_util == pytest.approx(BUILTIN["910c"].factors.attn_util, rel=0.01)


def test_single_prefill_is_quadratic_and_pcp_halves_the_quadratic_term():
    """T(L) = a + b L + c L^2 for one prompt (third differences vanish); PCP 2 halves c."""
    import numpy as np

    cm = CostModel(load_model("deepseek-r1"), BUILTIN["910c"])
    xs = np.array([8192, 16384, 24576, 32768, 40960])
    coef = {}
    for key, inst in (("tp8", BASELINE), ("pcp2", SEED["deepseek-r1"][3])):
        ys = np.array([cm.prefill_time(inst, [int(x)]) for x in xs])
        c2, c1, c0 = np.polyfit(xs, ys, 2)
        assert np.abs(np.polyval([c2, c1, c0], xs) / ys - 1).max() < 1e-3
        coef[key] = c2
    assert coef["tp8"] / coef["pcp2"] == pytest.approx(2.0, rel=0.02)


# -- the simulation --------------------------------------------------------------------------------


class FixedCost:
    """Service times given as plain functions, so that a schedule can be worked out by hand."""

    def __init__(self, capacity=10**9, transfer=0.0, hops=0.0):
        self.capacity, self.transfer, self.request_overhead_s = capacity, transfer, hops

    def prefill_time(self, inst, reqs):
        return 0.5 + 1e-4 * sum(new for new, _ in reqs)

    def decode_step_time(self, inst, batch, ctx_sum):
        return 0.01 + 0.002 * batch + 1e-6 * ctx_sum

    def transfer_time(self, p, d, tokens, prefill_s):
        return self.transfer

    def kv_capacity_tokens(self, inst):
        return self.capacity


def _requests(n, seed, rate=2.0, prompt=(100, 3000), output=(2, 40)):
    return Workload(requests=n, seed=seed, rate=rate, prompt=prompt, output=output).draw()


def test_prefill_queue_is_the_fcfs_schedule():
    reqs = _requests(40, seed=1)
    cost = FixedCost(transfer=0.05, hops=0.02)
    res = simulate(cost, Instance(max_num_seqs=1), 1, Instance(max_num_seqs=1000), 1, reqs)
    done = 0.0
    for r in sorted(reqs, key=lambda r: (r.arrival, r.rid)):  # by hand: start = max(arrival, previous end)
        done = max(r.arrival, done) + 0.5 + 1e-4 * r.prompt
        assert res.ttft[r.rid] == pytest.approx(done + 0.05 + 0.02 - r.arrival, abs=1e-9)


def _naive_decode(cost, lands, max_seqs):
    """Step by step: idle -> jump to the next landing; landings join at step ends."""
    lands = sorted(lands, key=lambda x: (x[0], x[1].rid))
    t, i, running, finish = 0.0, 0, [], {}
    while i < len(lands) or running:
        if not running:
            t = max(t, lands[i][0])
        while i < len(lands) and lands[i][0] <= t and len(running) < max_seqs:
            r = lands[i][1]
            running.append([r, r.output - 1, r.prompt])
            i += 1
        t += cost.decode_step_time(None, len(running), sum(e[2] for e in running))
        for e in running:
            e[1] -= 1
            e[2] += 1
        for e in [e for e in running if e[1] == 0]:
            finish[e[0].rid] = t
            running.remove(e)
    return finish


@pytest.mark.parametrize("max_seqs", [1, 3, 64])
def test_decode_continuous_batching_matches_a_naive_step_loop(max_seqs):
    reqs = _requests(30, seed=2, rate=20.0)
    cost = FixedCost()
    res = simulate(cost, Instance(max_num_seqs=1), 1, Instance(max_num_seqs=max_seqs), 1, reqs)
    lands = [(r.arrival + res.ttft[r.rid], r) for r in reqs]
    ref = _naive_decode(cost, lands, max_seqs)
    for r in reqs:
        assert res.finish[r.rid] == pytest.approx(ref[r.rid], abs=1e-9)
        first = r.arrival + res.ttft[r.rid]
        assert res.tpot[r.rid] == pytest.approx((ref[r.rid] - first) / (r.output - 1), abs=1e-9)


def test_kv_capacity_is_never_exceeded_and_every_request_completes():
    reqs = _requests(60, seed=3, rate=50.0, prompt=(500, 2500), output=(5, 60))
    cost = FixedCost(capacity=6000)
    res = simulate(cost, Instance(max_num_seqs=8), 2, Instance(max_num_seqs=100), 2, reqs)
    assert sorted(res.finish) == [r.rid for r in reqs]
    assert all(used <= cap for used, cap in zip(res.peak_kv_used, res.kv_capacity))
    assert max(res.peak_kv_used) > 6000 - 2560, "the limit should bind in this test"
    assert res.output_tokens == sum(r.output for r in reqs)
    with pytest.raises(ValueError, match="KV capacity"):
        simulate(FixedCost(capacity=1000), Instance(), 1, Instance(), 1, reqs)


def test_closed_loop_keeps_concurrency_and_runs_are_deterministic():
    wl = Workload(requests=12, seed=4, concurrency=1, prompt=(100, 200), output=(3, 5))
    cost = FixedCost()
    res = simulate(cost, Instance(), 1, Instance(), 1, wl.draw(), wl.concurrency)
    order = sorted(res.finish.items(), key=lambda kv: kv[1])
    for (prev, end), (rid, _) in zip(order, order[1:]):  # one in flight: each starts when the last ends
        assert rid == prev + 1
    again = simulate(cost, Instance(), 1, Instance(), 1, wl.draw(), wl.concurrency)
    assert again.finish == res.finish and again.ttft == res.ttft
    assert percentile([3, 1, 2, 4], 50) == 2 and percentile([3, 1, 2, 4], 99) == 4


# -- the search ------------------------------------------------------------------------------------

SMALL = {"architectures": ["LlamaForCausalLM"], "vocab_size": 384, "hidden_size": 512, "intermediate_size": 1024,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 64,
         "torch_dtype": "float32"}


def test_recommendation_is_the_best_feasible_deployment_by_exhaustive_check():
    cost = CostModel(load_model(SMALL), BUILTIN["h100"])
    wl = Workload(requests=10, seed=5, rate=4.0, prompt=(1000, 4000), output=(20, 50))
    cards = 6
    brute = []
    for tp, pcp, dtp, n_p, n_d in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 4, 8), range(1, 7), range(1, 7)):
        for dcp in (x for x in (1, 2, 4, 8) if dtp % x == 0):
            dep = Deployment(Instance(tp=tp, pcp=pcp, max_num_seqs=4, max_num_batched_tokens=65536), n_p,
                             Instance(tp=dtp, dcp=dcp, max_num_seqs=64), n_d)
            if dep.cards <= cards:
                brute.append(evaluate(cost, dep, wl))
    ttft_slo = sorted(o.ttft_p90 for o in brute)[len(brute) // 2]
    tpot_slo = sorted(o.tpot_p90 for o in brute)[len(brute) // 2]
    ok = [o for o in brute if o.ttft_p90 <= ttft_slo and o.tpot_p90 <= tpot_slo]
    assert 0 < len(ok) < len(brute)
    best = max(o.per_card for o in ok)
    outcomes, frontier, rec = search(cost, cards, wl, ttft_slo, tpot_slo)
    assert len(outcomes) == len(brute)
    assert rec.per_card == pytest.approx(best) and rec.meets(ttft_slo, tpot_slo)
    for o in brute:  # nothing outside the frontier beats a frontier point everywhere
        assert any(f.per_card >= o.per_card and f.ttft_p90 <= o.ttft_p90 and f.tpot_p90 <= o.tpot_p90
                   for f in frontier)
    assert search(cost, cards, wl, 1e-9, 1e-9)[2] is None


def test_bad_inputs_fail_with_the_field_named():
    with pytest.raises(ValueError, match="--hardware 'b200'"):
        load_hardware("b200")
    cost = CostModel(load_model("deepseek-r1"), BUILTIN["910c"])
    with pytest.raises(ValueError, match="--cards 8"):
        deployments(cost, 8, Workload(rate=1.0))
    with pytest.raises(ValueError, match="--model"):
        load_model("/nonexistent/config.json")
    with pytest.raises(ValueError, match="prefix_hit"):
        workload_from_dict({"arrival": {"rate": 1}, "prefix_hit": 2})
    with pytest.raises(ValueError, match="unknown field"):
        hardware_from_dict({"base": "910c", "tflops": 1})
    hw = hardware_from_dict({"base": "910c", "mem_bw": 1.8e12, "factors": {"attn_util": 0.5}})
    assert hw.mem_bw == 1.8e12 and hw.factors.attn_util == 0.5 and hw.peak_flops == BUILTIN["910c"].peak_flops


# -- the command line and the overlay --------------------------------------------------------------


def _manifest_checks():
    """tests/test_manifests.py as a module: its checks take an overlay directory."""
    spec = importlib.util.spec_from_file_location("braid_test_manifests", ROOT / "tests" / "test_manifests.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cli_prints_seconds_and_writes_an_overlay_the_manifest_checks_accept(tmp_path, tmp_path_factory, capsys):
    from braid.cluster.cli import main

    rc = main(["plan", "--model", "deepseek-r1", "--hardware", "910c", "--cards", "64", "--ttft-slo", "10s",
               "--tpot-slo", "50ms", "--workload", "long-context", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "recommended:" in out and " s, p90 " in out and "TPOT p50 " in out
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    overlay = str(tmp_path / "manifests" / "overlays" / "plan")
    mf = _manifest_checks()
    cfg, model = mf.load_overlay_config(overlay)
    sizes = {role: (p.tensor_parallel_size, p.prefill_context_parallel_size, p.decode_context_parallel_size,
                    p.expert_parallel) for role, p in ((r, cfg.node(r).parallel) for r in ("prefill", "decode"))}
    mf.EXPECTED[overlay] = dict(device="npu", resource="huawei.com/Ascend910", model="DeepSeek-R1", **sizes)
    for version in mf.K8S_VERSIONS:
        mf.test_resources_validate_against_kubernetes_schema(overlay, version)
    mf.test_parallel_sizes_fit_the_model(overlay, tmp_path_factory)
    for check in ("test_cluster_config_loads_and_binds_all_interfaces",
                  "test_etcd_endpoints_are_the_etcd_client_service",
                  "test_ports_and_probes_match_the_config", "test_services_expose_the_container_ports",
                  "test_env_and_writable_directories",
                  "test_model_directory_is_mounted_read_only_everywhere",
                  "test_every_pod_is_hardened_probed_and_sized", "test_termination_grace_outlasts_the_drain",
                  "test_selectors_match_pods", "test_etcd_cluster",
                  "test_a_network_policy_per_component_restricts_who_reaches_each_port",
                  "test_plaintext_grpc_is_declared_not_defaulted"):
        getattr(mf, check)(overlay)
    docs = mf.rendered(overlay)
    total = 0
    for role in mf.ROLES:  # test_containers_run_the_braid_cli_with_the_configmap, but for this overlay's name
        c = mf.container(docs, role)
        assert c["command"] == ["braid"] and c["args"] == [role, "serve", "--config", mf.CONFIG_PATH]
        assert c["image"] == "braid:0.1.0-npu"
    for role in ("prefill", "decode"):  # test_accelerators_match_the_world_size's checks (it keys on the name)
        res, n = mf.container(docs, role)["resources"], mf.world(cfg, role)
        assert res["limits"]["huawei.com/Ascend910"] == n == res["requests"]["huawei.com/Ascend910"]
        assert cfg.node(role).parallel.threads_per_rank * n <= mf.cpu_cores(res["requests"]["cpu"])
        assert "HCCL_IF_IP" in mf.env_of(mf.container(docs, role))
        w = mf.workload(docs, role)
        total += w["spec"]["replicas"] * mf.world(cfg, role)
        if role == "decode":  # a KV data port for every rank
            ports = {p["containerPort"] for p in mf.container(docs, role)["ports"]}
            assert {50100 + r for r in range(mf.world(cfg, role))} <= ports
    assert total <= 64


def test_cli_refuses_an_unparsable_slo(capsys):
    from braid.cluster.cli import main

    with pytest.raises(SystemExit):
        main(["plan", "--ttft-slo", "ten seconds"])
    assert "--ttft-slo" in capsys.readouterr().err
    assert main(["plan", "--hardware", "nope", "--out", "/tmp/unused-plan"]) == 2


# -- this machine's benches as README.md records them ----------------------------------------------

# A 2-core CPU as a spec: peaks are priors (what `braid plan calibrate` measures here
# when the machine is quiet: the paged decode kernel at ~20 GFLOP/s, the engine's
# shared-memory all-reduce ~15 us a message); the fits set the rest.
CPU_2CORE = dict(name="cpu-2core", peak_flops={"fp32": 60e9}, mem_bytes=6 * 2**30, mem_bw=18e9, scaleup_bw=1.7e9,
                 scaleout_bw=1.7e9, devices_per_node=2, link_latency_s=15e-6, reserve_bytes=2**30,
                 factors=dict(gemm_util=1.0, mem_util=1.0, comm_util=1.0, layer_overhead_s=2e-5,
                              step_overhead_s=1e-3, decode_attn_util=0.33))


def test_readme_pcp_bench_pcp2_row_predicted_from_the_pcp1_row():
    """README.md's bench/pcp.py table (tp 1, one thread a rank): fitted on pcp 1, the
    pcp 2 TTFTs are predicted within 25%."""
    lengths, pcp1, pcp2 = (2048, 4096, 8192, 16384), (1.065, 2.640, 7.650, 27.115), (0.570, 1.386, 4.373, 13.952)
    model = load_model(SMALL)
    hw = fit_prefill(model, hardware_from_dict(CPU_2CORE), [Point(Instance(), n, t) for n, t in zip(lengths, pcp1)])
    for n, measured, pred in zip(lengths, pcp2, predict(model, hw, Instance(pcp=2), lengths)):
        assert pred == pytest.approx(measured, rel=0.25), f"pcp 2, {n} tokens"


def test_readme_dcp_bench_dcp2_row_predicted_from_the_dcp1_row():
    """README.md's bench/dcp.py table (tp 2, batch 8): fitted on dcp 1, the dcp 2 TPOTs
    are predicted within 25% (the KV read halves, the arithmetic does not; the DCP
    all-gathers are added)."""
    from braid.planner.fit import DecodePoint, fit_decode

    model, dcp1, dcp2 = load_model(SMALL), Instance(tp=2), Instance(tp=2, dcp=2)
    hw = fit_decode(model, hardware_from_dict(CPU_2CORE),
                    [DecodePoint(dcp1, 8, 2048, 0.01578), DecodePoint(dcp1, 8, 8192, 0.03707)])
    cost = CostModel(model, hw)
    for context, measured in ((2048, 0.01406), (8192, 0.02705)):
        assert cost.decode_step_time(dcp2, 8, 8 * context) == pytest.approx(measured, rel=0.25), f"dcp 2, {context}"
