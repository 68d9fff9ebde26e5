"""Log-probabilities (SamplingParams.logprobs / prompt_logprobs) against transformers'
log_softmax of the same fp32 checkpoint: offline on every parallel layout the tiny
model supports, and through a cluster (prefill PCP 2 -> decode TP 2 DCP 2) for a
remote and a local prefill; plus the validation of the settings."""
from __future__ import annotations

import grpc
import pytest
import torch

from braid.engine import LLM, SamplingParams
from braid.engine.step_plan import SeqPlan, StepPlan
from cluster_harness import Cluster, start_pair
from conftest import prompt_of

NAME = "kv1"  # one KV head: tp 2 with dcp 2 can shard it, like the cluster's decode node
TOL = 1e-4
LOCAL_MAX = 6
"""The cluster's router prefills prompts of at most this many tokens on the decode node."""


def _reference(checkpoints, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax at every position of `ids`: row i is the distribution of token i+1."""
    with torch.no_grad():
        logits = checkpoints.hf_model(NAME)(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _check_one(lp, ref_row: torch.Tensor, token: int, n: int, where: str) -> None:
    """One reported logprob (engine or client record: token_id, logprob, rank, top) against a reference row."""
    # exact where the reference has no near-tie (within TOL); a near-tie may order either way
    assert lp.token_id == token, where
    mine = float(ref_row[token])
    assert abs(lp.logprob - mine) < TOL, where
    # the upper bound counts the token itself: it is 1 + the others within TOL or above
    assert 1 + int((ref_row > mine + TOL).sum()) <= lp.rank <= int((ref_row > mine - TOL).sum()), where
    ref_lp = ref_row.topk(n).values.tolist()
    assert len(lp.top) == n, where
    for (t, v), r in zip(lp.top, ref_lp):  # the i-th alternative: the i-th largest, with its own logprob
        assert abs(v - r) < TOL and abs(v - float(ref_row[t])) < TOL, where
    assert len({t for t, _ in lp.top}) == n, where


def _check(checkpoints, prompt, output, logprobs, prompt_logprobs, n: int, n_prompt: int) -> None:
    """Sampled-token logprobs (one per output token) and prompt logprobs (tokens 1..N-1)
    against transformers run over the prompt and the output."""
    ref = _reference(checkpoints, list(prompt) + list(output))
    assert len(logprobs) == len(output)
    for j, (tok, lp) in enumerate(zip(output, logprobs)):
        _check_one(lp, ref[len(prompt) - 1 + j], tok, n, f"output token {j}")
    if n_prompt is not None:
        assert len(prompt_logprobs) == len(prompt) - 1
        for i, lp in enumerate(prompt_logprobs):
            _check_one(lp, ref[i], prompt[i + 1], n_prompt, f"prompt token {i + 1}")


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [21, -1, True, 2.0])
def test_engine_refuses_out_of_range_logprobs(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_wire_rules_take_the_optional_fields():
    from braid.client.sampling import build_sampling, check_sampling, sampling_kwargs, validate_sampling

    pb = validate_sampling(logprobs=0, prompt_logprobs=20)
    assert pb.HasField("logprobs") and pb.logprobs == 0  # 0 is asked (the token alone), not unset
    kw = sampling_kwargs(pb)
    assert (kw["logprobs"], kw["prompt_logprobs"]) == (0, 20)
    assert SamplingParams(**kw).prompt_logprobs == 20
    assert not validate_sampling().HasField("logprobs")
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=field):
            check_sampling(build_sampling(**{field: 21}))  # the wire carries it; the rules refuse it


def test_step_plan_carries_the_prompt_logprobs_flag():
    plan = StepPlan(True, (SeqPlan(0, (5, 6, 7), (1,), 3), SeqPlan(0, (8,), (2,)), SeqPlan(0, (9, 4), (3, 4), 0)))
    back = StepPlan.from_tensor(plan.to_tensor())
    assert back == plan
    assert [s.prompt_logprobs for s in back.seqs] == [3, -1, 0]


# -- offline ------------------------------------------------------------------------------

LAYOUTS = {  # (tensor_parallel_size, prefill_context_parallel_size, decode_context_parallel_size)
    "tp1": (1, 1, 1),
    "tp2": (2, 1, 1),
    "pcp2": (1, 2, 1),
    "tp2-dcp2": (2, 1, 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_offline_logprobs_equal_transformers(checkpoints, layout):
    tp, pcp, dcp = LAYOUTS[layout]
    # 300 tokens: more than one 256-row chunk of prompt logits; 1: no prompt logprobs at all
    prompts = [prompt_of(n, seed=700 + n) for n in (1, 2, 7, 33, 300)]
    asks = [
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=4, prompt_logprobs=3),
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0),
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),  # asks nothing, in the same batch
        SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True, logprobs=20),  # sampled: any rank
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=5),
    ]
    with LLM(checkpoints.get(NAME), tensor_parallel_size=tp, prefill_context_parallel_size=pcp,
             decode_context_parallel_size=dcp, block_size=4, num_kv_blocks=256) as llm:
        outs = llm.generate(prompts, asks)
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    for p, params, out in zip(prompts, asks, outs):
        where = f"{layout}, prompt length {len(p)}"
        assert out.finish_reason == "length", where
        if params.logprobs is None:
            assert out.logprobs is None and out.prompt_logprobs is None, where
            continue
        if params.temperature == 0:
            assert out.token_ids == checkpoints.greedy(NAME, p, 5), where
        _check(checkpoints, p, out.token_ids, out.logprobs, out.prompt_logprobs, params.logprobs, params.prompt_logprobs)
        if params.prompt_logprobs is None:
            assert out.prompt_logprobs is None, where


# -- through a cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(checkpoints, tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("lp-cluster")), checkpoints.get(NAME),
                {"router": {"local_prefill_max_tokens": LOCAL_MAX}})
    try:
        yield start_pair(c)
    finally:
        c.close()


@pytest.mark.parametrize("length", [LOCAL_MAX - 1, 41], ids=["local-prefill", "remote-prefill"])
def test_cluster_logprobs_equal_transformers(cluster, checkpoints, length):
    from braid.client import Client

    prompt = prompt_of(length, seed=800 + length)
    with Client(cluster.router.address, timeout=120) as c:
        chunks = list(c.generate(prompt, max_tokens=7, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2))
        whole = c.complete(prompt, max_tokens=7, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
        plain = c.complete(prompt, max_tokens=3, temperature=0, ignore_eos=True)
    assert whole.timings.local_prefill == (length <= LOCAL_MAX)
    assert list(whole.token_ids) == checkpoints.greedy(NAME, prompt, 7)
    _check(checkpoints, prompt, whole.token_ids, whole.logprobs, whole.prompt_logprobs, 3, 2)
    assert whole.prompt_token_ids == tuple(prompt)
    # the stream: every chunk one logprob per token; the prompt's on the first chunk only
    for ch in chunks:
        assert len(ch.logprobs or ()) == len(ch.token_ids)
    assert chunks[0].prompt_token_ids == tuple(prompt) and len(chunks[0].prompt_logprobs) == length - 1
    assert all(ch.prompt_logprobs is None for ch in chunks[1:])
    assert [lp for ch in chunks for lp in ch.logprobs] == list(whole.logprobs)
    # a request that asks nothing gets nothing
    assert plain.logprobs is None and plain.prompt_logprobs is None and plain.prompt_token_ids is None


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_cluster_refuses_21_alternatives(cluster, field):
    from braid.client import Client, InvalidArgument
    from braid.proto import common_pb2, router_pb2, router_pb2_grpc

    req = router_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[5, 6, 7]),
                                     sampling=common_pb2.SamplingParams(max_tokens=2, **{field: 21}))
    with grpc.insecure_channel(cluster.router.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(router_pb2_grpc.RouterStub(ch).Generate(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field} must be" in e.value.details()
    with Client(cluster.router.address, timeout=60) as c:  # the SDK's stream raises the same
        with pytest.raises(InvalidArgument, match=field):
            c.complete([5, 6, 7], max_tokens=2, **{field: 21})
