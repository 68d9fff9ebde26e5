"""bench/peers.py's measuring loop (bench/peer_steps.py), the part that runs the same
in braid's process and in vLLM's environment: on braid's tiny engine, a batch's
tokens equal plain generation's, and the summary's TTFT, decode tok/s and
inter-token latencies follow from the step stamps as written out here; the token
agreement check names the first difference. (vLLM itself is not installed in CI:
bench/peers.py installs it into its own environment when run by hand.)"""
import os
import sys

from braid.engine import LLM, SamplingParams
from conftest import VOCAB

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from peer_steps import percentile, summarize  # noqa: E402
from peers import agreement, prompts, run_braid  # noqa: E402


def test_braid_side_of_the_loop_matches_plain_generation(checkpoints):
    path = checkpoints.get("kv2")
    batch = prompts(3, 12, VOCAB, seed=1)
    case = dict(prompts=batch, max_tokens=6, warmup=1, repeat=2)
    got = run_braid(path, [case], 64, threads_per_rank=1, block_size=4)[0]
    with LLM(path, block_size=4, threads_per_rank=1) as llm:
        plain = [o.token_ids for o in llm.generate(batch, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
    assert got["tokens"] == plain
    assert len(got["runs"]) == 2
    for r in got["runs"]:
        assert 0 < r["ttft_s"] <= r["e2e_s"] and r["decode_tok_s"] > 0
        assert len(r["itl_s"]) == 5  # one decode step per token after the first, all three in step


def test_summary_follows_the_stamps():
    run = {"batch": 2, "tokens": [[1, 2, 3], [4, 5, 6]], "stamps": [(0.5, 1), (0.7, 1), (1.0, 2), (1.5, 2)],
           "first": [0.5, 0.7]}
    s = summarize(run)
    assert s["ttft_s"] == 0.7  # the second request's first token
    assert abs(s["decode_tok_s"] - 4 / 0.8) < 1e-9  # 6 tokens - 2 first ones, over 1.5 - 0.7 s
    assert [round(x, 9) for x in s["itl_s"]] == [0.3, 0.5]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_summary_waits_for_every_first_token_not_a_count():
    """A's prefill ends a step before B's: at 0.7 s two tokens are out (A's first and
    second) but B has none. The TTFT is B's first token; A's tokens before it are
    not decode tokens of the timed window (counting them put the rest of B's
    prefill inside the decode time)."""
    run = {"batch": 2, "tokens": [[1, 2, 3, 4], [5, 6]], "stamps": [(0.5, 1), (0.7, 1), (1.0, 2), (1.5, 2)],
           "first": [0.5, 1.0]}
    s = summarize(run)
    assert s["ttft_s"] == 1.0
    assert abs(s["decode_tok_s"] - 2 / 0.5) < 1e-9
    assert [round(x, 9) for x in s["itl_s"]] == [0.5]


def test_agreement_names_the_first_difference():
    assert agreement([[1, 2], [3]], [[1, 2], [3]]) == "all 2"
    assert agreement([[1, 2], [3, 4, 5]], [[1, 2], [3, 9, 5]]) == "prompt 1 differs at token 1"
    assert agreement([[1, 2]], [[1]]) == "prompt 0 differs at token 1"


def test_long_positions_raises_only_the_position_limit(tmp_path):
    """bench/peers.py's 16k TTFT: a folder beside the checkpoint whose config allows the
    longer prompts (vLLM sizes its rotary table by it), the same weights linked."""
    import json

    from peers import long_positions

    src = tmp_path / "m"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "config.json").write_text(json.dumps({"max_position_embeddings": 8192, "vocab_size": 7}))
    assert long_positions(str(src), 8192) == str(src)
    out = long_positions(str(src), 32768)
    assert json.loads(open(f"{out}/config.json").read()) == {"max_position_embeddings": 32768, "vocab_size": 7}
    assert open(f"{out}/model.safetensors", "rb").read() == b"weights"
    assert long_positions(str(src), 32768) == out  # again: the same folder, no error
