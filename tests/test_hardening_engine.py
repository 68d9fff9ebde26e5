"""Issue 14, finding 1: no request can take an engine down.

A real AsyncEngine (tiny checkpoint, one rank) is sent numerically poisonous
requests (a temperature of 1e-40, a tiny top_p, logits that are NaN, infinite or
huge, a sampler that raises) and must end each of them alone, with a token or an
error event, and then serve a normal greedy request exactly as transformers does.
"""
from __future__ import annotations

import asyncio
import math

import pytest
import torch

from braid.engine.async_engine import AsyncEngine
from braid.engine.config import EngineConfig
from braid.engine.sampling import Sampler, SamplingParams
from conftest import VOCAB, prompt_of

MODEL = "llama-gqa1"
PROMPT = prompt_of(9, seed=14)
EVENT_TIMEOUT_S = 30.0


async def generate(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams):
    """(tokens, finish_reason, error) of one request, every event within a bound."""
    q = engine.subscribe(rid)
    try:
        await engine.call(lambda c: c.add_request(prompt, params, rid))
        tokens = []
        while True:
            ev = await asyncio.wait_for(q.get(), EVENT_TIMEOUT_S)
            if ev.token_id is not None:
                tokens.append(ev.token_id)
            if ev.finished:
                return tokens, ev.finish_reason, ev.error
    finally:
        engine.unsubscribe(rid)


def with_engine(path: str, body, **settings):
    async def main():
        cfg = EngineConfig.build(path, block_size=4, num_kv_blocks=128, **settings)
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(None, lambda: AsyncEngine(cfg, loop))
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(asyncio.wait_for(main(), 180))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.timeout(240)
def test_tiny_temperature_does_not_kill_the_engine(checkpoints):
    """The reproduced attack: temperature=1e-40 passes the checks; the engine must
    answer it (as greedy: a distribution that sharp is the argmax) and keep serving."""
    path = checkpoints.get(MODEL)
    ref = checkpoints.greedy(MODEL, PROMPT, 6)

    async def body(engine):
        for i, t in enumerate((1e-40, 1e-30, 5e-324, 1e-6)):
            params = SamplingParams(max_tokens=6, temperature=t, ignore_eos=True, seed=i)
            tokens, reason, error = await generate(engine, f"tiny-{i}", PROMPT, params)
            assert (reason, error) == ("length", None), (t, reason, error)
            assert tokens == ref, f"temperature {t} should sample the argmax"
        assert engine.dead is None
        tokens, reason, _ = await generate(engine, "after", PROMPT, greedy(6))
        assert tokens == ref and reason == "length"

    with_engine(path, body)


@pytest.mark.timeout(240)
def test_tiny_top_p_keeps_the_most_likely_token(checkpoints):
    path = checkpoints.get(MODEL)
    ref = checkpoints.greedy(MODEL, PROMPT, 5)

    async def body(engine):
        for i, (t, p) in enumerate(((1e-4, 1e-30), (1.0, 1e-300), (50.0, 5e-324))):
            params = SamplingParams(max_tokens=5, temperature=t, top_p=p, ignore_eos=True, seed=i)
            tokens, reason, error = await generate(engine, f"top-p-{i}", PROMPT, params)
            assert (tokens, reason, error) == (ref, "length", None), (t, p)
        assert engine.dead is None

    with_engine(path, body)


class PoisonSampler(Sampler):
    """The engine's own sampler, but the logits of marked requests (by seed) are
    replaced first, or the whole call raises: what a broken model or a sampler bug
    would do to one request."""

    NAN, HUGE, RAISE = 7001, 7002, 7003
    HUGE_TOKEN = 5

    def sample(self, logits, params, generators):
        logits = logits.clone()
        for i, p in enumerate(params):
            if p.seed == self.NAN:
                logits[i] = float("nan")
            elif p.seed == self.HUGE:
                logits[i, self.HUGE_TOKEN] = float("inf")
                logits[i, self.HUGE_TOKEN + 1] = 1e38
                logits[i, self.HUGE_TOKEN + 2] = -float("inf")
            elif p.seed == self.RAISE:
                raise RuntimeError("sampler bug")
        return super().sample(logits, params, generators)


@pytest.mark.timeout(240)
def test_poisoned_rows_fail_alone_and_the_engine_keeps_serving(checkpoints):
    path = checkpoints.get(MODEL)
    ref = checkpoints.greedy(MODEL, PROMPT, 4)
    other = prompt_of(13, seed=15)
    other_ref = checkpoints.greedy(MODEL, other, 4)

    async def body(engine):
        engine.core.sampler = PoisonSampler(0)

        def marked(seed, **kw):
            return SamplingParams(max_tokens=4, temperature=kw.pop("temperature", 0.7), seed=seed,
                                  ignore_eos=True, **kw)

        # a NaN row and a clean row in the same batch: only the NaN one fails
        (nan_toks, nan_reason, nan_err), (ok_toks, ok_reason, _) = await asyncio.gather(
            generate(engine, "nan", PROMPT, marked(PoisonSampler.NAN)),
            generate(engine, "neighbour", other, greedy(4)),
        )
        assert nan_reason == "error" and nan_err and nan_toks == []
        assert (ok_toks, ok_reason) == (other_ref, "length")
        # +inf and 1e38 logits: the infinite one wins, every step, at any temperature
        for t in (0.0, 1e-40, 1.0, 1e30):
            toks, reason, err = await generate(engine, f"huge-{t}", PROMPT, marked(PoisonSampler.HUGE, temperature=t))
            assert (toks, reason, err) == ([PoisonSampler.HUGE_TOKEN] * 4, "length", None), t
        # the sampler itself raising: that request ends with an error event
        toks, reason, err = await generate(engine, "raise", PROMPT, marked(PoisonSampler.RAISE))
        assert reason == "error" and "sampler bug" in err
        assert engine.dead is None
        assert engine.core.blocks.num_free == engine.core.blocks.num_blocks
        assert engine.core.requests == {}
        tokens, reason, _ = await generate(engine, "after", PROMPT, greedy(4))
        assert (tokens, reason) == (ref, "length")

    with_engine(path, body)


def test_sampler_on_extreme_logits_against_a_brute_force_statement():
    """Sampler.sample row by row: NaN never wins, +inf always wins, an all-NaN row
    fails alone, and every token lies in the allowed set (computed here in float64)."""
    g = torch.Generator().manual_seed(3)
    sampler = Sampler(seed=1)
    for trial in range(60):
        row = torch.randn(VOCAB, generator=g, dtype=torch.float64) * [1.0, 1e3, 1e30][trial % 3]
        if trial % 5 == 1:
            row[torch.randint(0, VOCAB, (7,), generator=g)] = float("nan")
        temp = [1e-40, 1e-3, 0.7, 1e30][trial % 4]
        top_p = [1.0, 1e-30, 0.5][trial % 3]
        params = SamplingParams(temperature=temp, top_p=top_p)
        clean = torch.where(torch.isnan(row), torch.full_like(row, -math.inf), row)
        best = int(clean.argmax())
        tokens, failed = sampler.sample(row.float().unsqueeze(0), [params], [None])
        assert failed == {}
        tok = tokens[0]
        assert not math.isnan(float(row[tok]))
        if temp < 1e-5 or top_p < 1e-20:
            assert tok == best
    bad = torch.full((3, VOCAB), float("nan"))
    bad[1] = torch.arange(VOCAB, dtype=torch.float32) * 100
    bad[2, 11] = float("inf")
    tokens, failed = sampler.sample(bad, [SamplingParams(temperature=0.9)] * 3, [None] * 3)
    assert set(failed) == {0} and tokens[1:] == [VOCAB - 1, 11]


@pytest.mark.timeout(240)
def test_a_failed_step_fails_its_batch_only(checkpoints):
    """Any other error raised while a step serves a batch (here the model step of a
    one-rank engine raising once) ends that batch's requests with an error event and
    frees their blocks; the engine serves the next request exactly."""
    path = checkpoints.get(MODEL)
    ref = checkpoints.greedy(MODEL, PROMPT, 4)

    async def body(engine):
        execute = engine.core.executor.execute
        armed = []

        def flaky(plan):
            if armed:
                armed.pop()
                raise IndexError("index out of range in self")
            return execute(plan)

        engine.core.executor.execute = flaky
        armed.append(True)
        toks, reason, err = await generate(engine, "victim", PROMPT, greedy(4))
        assert (toks, reason) == ([], "error") and "IndexError" in err
        assert engine.dead is None and engine.core.requests == {}
        assert engine.core.blocks.num_free == engine.core.blocks.num_blocks
        tokens, reason, _ = await generate(engine, "after", PROMPT, greedy(4))
        assert (tokens, reason) == (ref, "length")

    with_engine(path, body)


@pytest.mark.timeout(300)
def test_a_prefill_whose_row_fails_ends_alone_and_frees_both_sides(checkpoints):
    """Prefill side of a transfer: the row of one of two prefills cannot be sampled (NaN
    logits). That request ends with an error on both sides, every block comes back on
    both engines, and the other request, and a later one, decode exactly."""
    import time

    from test_kv_transfer import engine, reserve_target

    name = "kv1"
    P = engine(checkpoints, name, "prefill", "tcp", blocks=64)
    D = engine(checkpoints, name, "decode", "tcp", blocks=64)
    try:
        P.sampler = PoisonSampler(0)
        prompts = {"bad": prompt_of(17, seed=5), "good": prompt_of(19, seed=6), "later": prompt_of(15, seed=7)}
        params = {"bad": SamplingParams(max_tokens=5, temperature=0.5, seed=PoisonSampler.NAN, ignore_eos=True),
                  "good": greedy(5), "later": greedy(5)}

        def transfer(rids):
            for rid in rids:
                target = reserve_target(D, rid, prompts[rid], params[rid], 3.0)
                P.add_transfer_request(rid, prompts[rid], params[rid], target, 10.0)
            p_end, d_out, d_end = {}, {rid: [] for rid in rids}, {}
            deadline = time.monotonic() + 60
            while len(d_end) < len(rids) or P.has_unfinished() or D.has_unfinished():
                assert time.monotonic() < deadline, (p_end, d_end)
                for ev in P.step():
                    p_end[ev.request_id] = (ev.finish_reason, ev.error)
                for ev in D.step():
                    if ev.token_id is not None:
                        d_out[ev.request_id].append(ev.token_id)
                    if ev.finished:
                        d_end[ev.request_id] = ev.finish_reason
                time.sleep(0.001)
            return p_end, d_out, d_end

        p_end, d_out, d_end = transfer(["bad", "good"])
        assert p_end["bad"][0] == "error" and "no finite value" in p_end["bad"][1]
        assert d_end["bad"] == "error"
        assert p_end["good"][0] == "transferred" and d_end["good"] == "length"
        assert d_out["good"] == checkpoints.greedy(name, prompts["good"], 5)
        for core in (P, D):
            assert core.blocks.num_free == core.blocks.num_blocks and not core.kv.incoming and not core.kv.outgoing
        _, d_out, d_end = transfer(["later"])
        assert d_end["later"] == "length" and d_out["later"] == checkpoints.greedy(name, prompts["later"], 5)
    finally:
        P.shutdown()
        D.shutdown()
