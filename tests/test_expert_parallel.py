"""Expert parallelism (EP): routed experts whole on the ranks of an EP group,
tokens dispatched to them and combined back with all-to-all. Against
transformers: greedy tokens of Qwen3-MoE, DeepSeek-V2 and V3 with EP inside a TP
group (ep = tp, ep < tp) and across PCP ranks (ep = tp * pcp); on every rank
only its own experts' weights (bytes measured); every token of every step
reaches exactly its top-k experts (rows counted on the ranks, against
transformers' router choices over the same tokens). Refused settings."""

import pytest
import torch

from braid.engine import LLM, SamplingParams
from braid.engine.config import EngineConfig, ParallelConfig, resolve
from braid.engine.model_config import load_model_config
from braid.engine.topology import Topology, validate_for_model
from conftest import prompt_of
from moe_fixtures import moe_checkpoint

LENGTHS = [1, 3, 8, 9, 37, 100]
NEW = 48
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_ckpt(checkpoints, ds):
    def get(name: str) -> str:
        if name.startswith("ds-"):
            return ds(name)
        return moe_checkpoint(checkpoints.root, name)

    return get


def reference_rows(checkpoints, name: str, sequences: list[list[int]], num_experts: int) -> torch.Tensor:
    """[MoE layers, experts]: how many of the tokens fed to the model (each
    sequence without its last token) transformers' routers send to each expert."""
    model = checkpoints.hf_model(name)
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    seen: list[list[torch.Tensor]] = [[] for _ in gates]
    hooks = [g.register_forward_hook(lambda _m, _i, out, i=i: seen[i].append(out[2].flatten()))
             for i, g in enumerate(gates)]
    try:
        with torch.no_grad():
            for seq in sequences:
                model(torch.tensor([seq[:-1]]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([torch.bincount(torch.cat(ids), minlength=num_experts) for ids in seen])


def expert_bytes(path: str) -> int:
    """Bytes of one routed expert's weights (gate, up, down) in fp32."""
    m = load_model_config(path)
    return 3 * m.hidden_size * m.moe.moe_intermediate_size * 4


CASES = [
    # (checkpoint, tp, dcp, pcp, ep)
    ("q3m-norm", 2, 2, 1, 2),   # EP = TP (the default size when enabled), DCP on
    ("q3m-step", 4, 1, 1, 4),   # one expert per rank
    ("q3m-norm", 4, 1, 1, 2),   # two EP groups inside one TP group
    ("q3m-norm", 2, 1, 2, 4),   # EP across the PCP ranks
    ("ds-group", 2, 2, 1, 2),   # DeepSeek-V2: group-limited routing, shared experts, MLA
    ("v3-lora", 2, 2, 1, 2),    # DeepSeek-V3: sigmoid + bias-corrected group routing, an MTP layer
    ("v3-plain", 2, 1, 2, 4),   # DeepSeek-V3 with EP across the PCP ranks
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,tp,dcp,pcp,ep", CASES, ids=[f"{c[0]}-tp{c[1]}-dcp{c[2]}-pcp{c[3]}-ep{c[4]}" for c in CASES])
def test_greedy_placement_and_dispatch(moe_ckpt, checkpoints, name, tp, dcp, pcp, ep):
    path = moe_ckpt(name)
    prompts = [prompt_of(n, seed=900 + n) for n in LENGTHS]
    ep_args = dict(enable_expert_parallel=True) if ep == tp else dict(expert_parallel_size=ep)
    with LLM(path, tensor_parallel_size=tp, decode_context_parallel_size=dcp, prefill_context_parallel_size=pcp,
             block_size=4, num_kv_blocks=160, enable_prefix_caching=False, **ep_args) as llm:
        outs = llm.generate(prompts, GREEDY)
        stats = llm.engine.executor.rank_stats()
    for p, out in zip(prompts, outs):
        assert out.token_ids == checkpoints.greedy(name, p, NEW), f"prompt length {len(p)}"

    model_cfg = load_model_config(path)
    moe = model_cfg.moe
    per_rank = moe.num_experts // ep
    layers = len(moe.sparse_layers)
    mtp = model_cfg.mtp.num_layers if model_cfg.mtp else 0  # sparse too; it computes nothing outside speculation
    topo = Topology(tp=tp, pcp=pcp, dcp=dcp, ep=ep)
    for rank, st in enumerate(stats):
        first = topo.for_rank(rank).ep_rank * per_rank
        mine = torch.zeros(moe.num_experts, dtype=torch.bool)
        mine[first : first + per_rank] = True
        # whole experts, only its own: bytes held = its share of the routed experts
        assert st.expert_weight_bytes == (layers + mtp) * per_rank * expert_bytes(path), f"rank {rank}"
        assert not st.expert_rows[:, ~mine].any(), f"rank {rank} computed rows for experts it does not hold"
        assert st.expert_rows.shape[0] == layers + mtp and not st.expert_rows[layers:].any()
    # every EP group together computed each token's top-k experts exactly once:
    # the ranks' counts, summed within each EP group, equal transformers' choices
    ref = reference_rows(checkpoints, name, [p + o.token_ids for p, o in zip(prompts, outs)], moe.num_experts)
    assert ref.sum() == layers * moe.num_experts_per_tok * sum(len(p) + NEW - 1 for p in prompts)
    for group in topo.all_ep_groups():
        got = sum(stats[r].expert_rows[:layers] for r in group)
        assert torch.equal(got, ref), f"EP group {group}: rows per expert {got.tolist()} != {ref.tolist()}"


def test_ep_off_slices_every_expert(moe_ckpt):
    """Without EP, TP 2 slices each expert: every rank holds half of every expert."""
    path = moe_ckpt("q3m-norm")
    moe = load_model_config(path).moe
    with LLM(path, tensor_parallel_size=2, block_size=4, num_kv_blocks=32) as llm:
        stats = llm.engine.executor.rank_stats()
    for st in stats:
        assert st.expert_weight_bytes == len(moe.sparse_layers) * moe.num_experts * expert_bytes(path) // 2


def test_ep_settings():
    assert ParallelConfig(tensor_parallel_size=4, enable_expert_parallel=True).topology.ep == 4
    assert ParallelConfig(tensor_parallel_size=4).topology.ep == 1
    assert ParallelConfig(tensor_parallel_size=2, prefill_context_parallel_size=2,
                          expert_parallel_size=4).topology.ep == 4
    bad = [
        (dict(tensor_parallel_size=4, expert_parallel_size=3), "must divide tensor_parallel_size 4"),
        (dict(tensor_parallel_size=2, expert_parallel_size=4), "dividing the instance's 2 ranks"),
        (dict(tensor_parallel_size=4, prefill_context_parallel_size=2, expert_parallel_size=6), "expert_parallel_size 6"),
        (dict(enable_expert_parallel="yes"), "enable_expert_parallel"),
        (dict(expert_parallel_size=0), "expert_parallel_size"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            ParallelConfig(**kwargs)


def test_ep_refused_for_the_model(moe_ckpt, checkpoints):
    q3m = load_model_config(moe_ckpt("q3m-step"))  # 4 experts
    with pytest.raises(ValueError, match="expert_parallel_size 6 must divide the model's 4 routed experts"):
        validate_for_model(Topology(tp=2, pcp=3, ep=6), q3m)
    dense = checkpoints.get("llama-mqa")
    with pytest.raises(ValueError, match="has no routed experts"):
        validate_for_model(Topology(tp=2, ep=2), load_model_config(dense))
    with pytest.raises(ValueError, match="no routed experts"):
        resolve(EngineConfig.build(dense, tensor_parallel_size=2, enable_expert_parallel=True))
