"""Speculative decoding's building blocks against independent references: n-gram
prompt lookup against a brute-force scan, greedy acceptance against a plain loop,
and rejection sampling against the target distribution by a chi-square test that
also shows deliberately biased samplers are caught."""
from __future__ import annotations

import random

import pytest
import torch

from braid.engine.spec_decode.acceptance import (
    Accepted, greedy_accept, greedy_accept_batch, rejection_sample, rejection_sample_batch, seeded_generators,
)
from braid.engine.spec_decode.ngram import NgramIndex, propose_ngram, propose_ngram_batch

# ---------------------------------------------------------------- n-gram lookup


def brute_ngram(tokens, k, min_n, max_n, window=None):
    """Try n = max_n..min_n; the latest start s (s + n <= L - 1, and among the last
    `window` candidate starts when given) whose n tokens equal the last n."""
    length = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        last = length - n - 1
        first = 0 if window is None else max(0, last - window + 1)
        for s in range(last, first - 1, -1):
            if tokens[s:s + n] == tokens[length - n:]:
                return tokens[s + n:s + n + k]
    return []


def _sequences():
    rng = random.Random(7)
    seqs = [[rng.randrange(3) for _ in range(rng.randrange(0, 22))] for _ in range(10)]
    seqs += [[1, 2, 3] * 6, [5] * 9, [1, 2, 1, 2, 3, 1, 2, 1, 2], [4, 1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3]]
    return seqs


def test_ngram_matches_brute_force_every_n_and_k():
    for seq in _sequences():
        for min_n in range(1, 4):
            for max_n in range(min_n, 4):
                for k in (0, 1, 2, 5):
                    for end in range(len(seq) + 1):
                        want = brute_ngram(seq[:end], k, min_n, max_n)
                        assert propose_ngram(seq[:end], k, min_n=min_n, max_n=max_n, window=None) == want, \
                            (seq[:end], k, min_n, max_n)


def test_ngram_index_matches_brute_force_as_the_sequence_grows():
    for seq in _sequences():
        for min_n in range(1, 4):
            for max_n in range(min_n, 5):
                index = NgramIndex(min_n, max_n)
                for end in range(len(seq) + 1):
                    k = end % 4  # varies per step, 0 included
                    assert index.propose(seq[:end], k) == brute_ngram(seq[:end], k, min_n, max_n), (seq[:end], k)


def test_ngram_window_limits_the_scan():
    rng = random.Random(3)
    for _ in range(30):
        seq = [rng.randrange(4) for _ in range(rng.randrange(5, 40))]
        for window in (1, 2, 5, 17):
            assert propose_ngram(seq, 3, min_n=1, max_n=3, window=window) == brute_ngram(seq, 3, 1, 3, window)


def test_ngram_long_sequence_window_and_index():
    # 100k tokens of distinct ids with a planted repeat: [7,8,9] recurs near the end
    # (found by the window) and [11,12,13] only near the start (the index finds it)
    g = torch.Generator().manual_seed(0)
    seq = (torch.randperm(100_000, generator=g) + 100).tolist()
    seq[99_000:99_004] = [7, 8, 9, 42]
    seq[50:54] = [11, 12, 13, 43]
    near, far = seq + [7, 8, 9], seq + [11, 12, 13]
    assert propose_ngram(near, 4, min_n=2, max_n=3) == [42] + seq[99_004:99_007]
    assert propose_ngram(far, 4, min_n=2, max_n=3) == []  # outside the default window
    assert propose_ngram(far, 4, min_n=2, max_n=3, window=None) == [43] + seq[54:57]
    index = NgramIndex(2, 3)
    assert index.propose(near, 2) == [42, seq[99_004]]
    index = NgramIndex(2, 3)
    assert index.propose(far, 2) == [43, seq[54]]


def test_ngram_batch_and_errors():
    seqs = [[1, 2, 3, 1, 2], [4, 4, 4], [5, 6]]
    assert propose_ngram_batch(seqs, [3, 1, 2]) == [brute_ngram(seqs[0], 3, 1, 3), [4], []]
    assert propose_ngram_batch([torch.tensor(seqs[0])], [0]) == [[]]
    with pytest.raises(ValueError):
        propose_ngram([1, 2], 2, min_n=3, max_n=2)
    with pytest.raises(ValueError):
        propose_ngram_batch(seqs, [1])
    with pytest.raises(ValueError):
        propose_ngram([1, 2], 2, window=0)
    index = NgramIndex()
    index.propose([1, 2, 3], 1)
    with pytest.raises(ValueError):
        index.propose([1], 1)


# ------------------------------------------------------------ greedy acceptance


def brute_greedy(target, drafts):
    out = []
    for i, d in enumerate(drafts):
        out.append(target[i])
        if target[i] != d:
            return out
    return out + [target[len(drafts)]]


@pytest.mark.parametrize("target,drafts,want", [
    ([3, 4, 5, 6], [3, 4, 5], [3, 4, 5, 6]),  # all accepted + bonus
    ([3, 4, 5, 6], [9, 4, 5], [3]),  # first rejected
    ([3, 4, 5, 6], [3, 9, 5], [3, 4]),  # middle rejected
    ([3, 4, 5, 6], [3, 4, 9], [3, 4, 5]),  # last rejected
    ([8], [], [8]),  # k = 0
])
def test_greedy_accept_cases(target, drafts, want):
    got = greedy_accept(torch.tensor(target), drafts)
    assert got.tokens == want == brute_greedy(target, drafts)
    assert got.num_accepted == len(want) - 1


def test_greedy_accept_batch_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    for _ in range(50):
        ks = [rng.randrange(0, 5) for _ in range(rng.randrange(1, 5))]
        logits = torch.randn(sum(k + 1 for k in ks), 3, generator=g)  # vocab 3: matches are common
        argmax = logits.argmax(-1).tolist()
        drafts, row = [], 0
        for k in ks:
            drafts.append([argmax[row + i] if rng.random() < 0.7 else rng.randrange(3) for i in range(k)])
            row += k + 1
        got, row = greedy_accept_batch(logits, drafts), 0
        for k, d, acc in zip(ks, drafts, got):
            assert acc.tokens == brute_greedy(argmax[row:row + k + 1], d)
            row += k + 1
    with pytest.raises(ValueError):
        greedy_accept_batch(torch.zeros(2, 3), [[1, 2]])


# ------------------------------------------------------------ rejection sampling

CHI2_CRIT_DF5 = 20.515
"""The chi-square critical value for 5 degrees of freedom at significance 1e-3
(6 tokens), from the standard table (scipy is not installed here; the test
checks it against torch's regularised incomplete gamma function)."""
ALPHA = 1e-3
VOCAB = 6
SAMPLES = 12_000


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def chi2_pvalue(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def assert_matches(counts, probs, what):
    stat = chi2_stat(counts, probs)
    assert stat < CHI2_CRIT_DF5, f"{what}: chi2 {stat:.1f} >= {CHI2_CRIT_DF5} (p={chi2_pvalue(stat, 5):.2e})"
    return stat


def assert_rejected(counts, probs, what):
    stat = chi2_stat(counts, probs)
    assert stat > CHI2_CRIT_DF5, f"{what}: a biased sampler passed, chi2 {stat:.1f}"
    return stat


def _dist(g, rows, sharp=1.5):
    return torch.softmax(torch.randn(rows, VOCAB, generator=g, dtype=torch.float64) * sharp, -1)


P = _dist(torch.Generator().manual_seed(11), 3)  # target rows [k+1=3, V], every entry well above 0
Q = _dist(torch.Generator().manual_seed(12), 2)  # draft rows [k=2, V]
FIXED_DRAFTS = [int(P[0].argmax()), int(P[1].argsort()[3])]  # a draft-free guess; the first is often right
FIXED_ONE_HOT = torch.nn.functional.one_hot(torch.tensor(FIXED_DRAFTS), VOCAB).double()  # its q


def run_sampler(sample, draft_probs, n=SAMPLES, fixed_drafts=None):
    """Counts of the first emitted token, and of the second where the first draft was kept.
    Drafts are drawn from q (or fixed: a draft-free proposer's deterministic guess)."""
    gen, draft_gen = torch.Generator().manual_seed(100), torch.Generator().manual_seed(200)
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(n):
        if fixed_drafts is not None:
            drafts = fixed_drafts
        else:
            drafts = [int(torch.multinomial(draft_probs[i], 1, generator=draft_gen)) for i in range(2)]
        toks = sample(P, drafts, draft_probs, gen).tokens
        first[toks[0]] += 1
        if len(toks) > 1:
            second[toks[1]] += 1
    return first, second


def biased_resample_from_p(p, drafts, q, gen):
    """Wrong: after a rejection, resamples from p instead of norm(max(0, p - q))."""
    for i, x in enumerate(drafts):
        if float(torch.rand((), dtype=torch.float64, generator=gen)) * float(q[i, x]) >= float(p[i, x]):
            return Accepted([drafts[j] for j in range(i)] + [int(torch.multinomial(p[i], 1, generator=gen))])
    return Accepted(list(drafts) + [int(torch.multinomial(p[-1], 1, generator=gen))])


def biased_always_accept(p, drafts, q, gen):
    """Wrong: keeps every draft."""
    return Accepted(list(drafts) + [int(torch.multinomial(p[-1], 1, generator=gen))])


def test_chi2_table_value():
    assert chi2_pvalue(CHI2_CRIT_DF5, 5) == pytest.approx(ALPHA, rel=1e-3)


def test_enough_samples_to_catch_the_biased_resampler():
    # the biased first-token law is min(p,q) + (1 - sum min(p,q)) p; its expected
    # chi2 (non-centrality) must dwarf the critical value, else the test has no power
    p, q = P[0], Q[0]
    biased = torch.minimum(p, q) + (1 - torch.minimum(p, q).sum()) * p
    noncentrality = SAMPLES * float(((biased - p) ** 2 / p).sum())
    assert noncentrality > 4 * CHI2_CRIT_DF5, noncentrality


def test_rejection_sampling_keeps_the_target_distribution_with_draft_probs():
    first, second = run_sampler(rejection_sample, Q)
    assert_matches(first, P[0], "first token")
    assert second.sum() > 2000  # enough first-draft acceptances to test the second token
    assert_matches(second, P[1], "second token given the first draft kept")


def test_rejection_sampling_keeps_the_target_distribution_one_hot():
    # draft-free (q=None) and an explicit one-hot q take different code paths: both must give p
    fixed, one_hot = FIXED_DRAFTS, FIXED_ONE_HOT
    first, second = run_sampler(rejection_sample, None, fixed_drafts=fixed)
    assert_matches(first, P[0], "first token, draft-free")
    assert second.sum() > 4000
    assert_matches(second, P[1], "second token, draft-free")
    first, _ = run_sampler(rejection_sample, one_hot, n=SAMPLES // 2, fixed_drafts=fixed)
    assert_matches(first, P[0], "first token, explicit one-hot q")


def test_the_chi2_test_rejects_biased_samplers():
    first, _ = run_sampler(biased_resample_from_p, Q)
    assert_rejected(first, P[0], "resample from p after a rejection")
    fixed, one_hot = FIXED_DRAFTS, FIXED_ONE_HOT
    first, _ = run_sampler(biased_resample_from_p, one_hot, n=SAMPLES // 2, fixed_drafts=fixed)
    assert_rejected(first, P[0], "one-hot q, resample from p keeping the draft")
    first, _ = run_sampler(biased_always_accept, Q, n=SAMPLES // 4)
    assert_rejected(first, P[0], "always accept")


def test_seeded_reproducibility():
    g = torch.Generator().manual_seed(5)
    p, q = _dist(g, 5), _dist(g, 4)
    drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(4)]
    for draft_probs in (q, None):
        runs = [rejection_sample(p, drafts, draft_probs, seeded_generators([10, 11, 12, 13, 14])).tokens
                for _ in range(3)]
        assert runs[0] == runs[1] == runs[2]
        one = [rejection_sample(p, drafts, draft_probs, torch.Generator().manual_seed(9)).tokens for _ in range(2)]
        assert one[0] == one[1]


def test_draft_free_emits_what_a_plain_seeded_sampler_draws():
    # per-position seeds: each emitted token is the plain multinomial draw of its row
    # with its own seed, so a seeded request is the same with or without speculation
    g = torch.Generator().manual_seed(6)
    for trial in range(40):
        k = trial % 5
        p = torch.softmax(torch.randn(k + 1, VOCAB, generator=g) * 2, -1)  # fp32, as the sampler's rows
        seeds = [1000 * trial + i for i in range(k + 1)]
        plain = [int(torch.multinomial(p[i], 1, generator=torch.Generator().manual_seed(s)))
                 for i, s in enumerate(seeds)]
        drafts = [plain[i] if (trial >> i) & 1 else (plain[i] + 1) % VOCAB for i in range(k)]
        got = rejection_sample(p, drafts, None, seeded_generators(seeds)).tokens
        assert got == brute_greedy(plain, drafts)  # the drafts' prefix equal to the plain draws, then one more


def test_rejection_sample_batch_mixed_k():
    g = torch.Generator().manual_seed(8)
    ks = [0, 1, 3]
    ps = [_dist(g, k + 1) for k in ks]
    qs = [None, _dist(g, 1), _dist(g, 3)]
    drafts = [[], [2], [0, 1, 2]]
    gens = [seeded_generators([7]), torch.Generator().manual_seed(3), seeded_generators([1, 2, 3, 4])]
    got = rejection_sample_batch(ps, drafts, qs, gens)
    assert got[0].tokens == [int(torch.multinomial(ps[0][0], 1, generator=torch.Generator().manual_seed(7)))]
    for acc, d in zip(got, drafts):
        assert 1 <= len(acc.tokens) <= len(d) + 1 and acc.tokens[:acc.num_accepted] == d[:acc.num_accepted]
    with pytest.raises(ValueError):
        rejection_sample(ps[2], [0, 1], qs[2], None)  # 2 drafts against 4 target rows
    with pytest.raises(ValueError):
        rejection_sample(ps[1], [VOCAB], None, None)  # draft outside the vocabulary
    with pytest.raises(ValueError):
        rejection_sample(ps[2], drafts[2], qs[2], seeded_generators([1]))  # too few generators
