"""Attention ops against an independent dense softmax, and the fast ops against the reference."""
import math
import random

import pytest
import torch

from braid.kernels import batched, flash_cpu, reference
from braid.kernels.reference import VarlenRows


def naive_attention(q, k, v, scale, visible):
    """float64 softmax, one query at a time. q [Lq,Hq,D], k/v [Lk,Hkv,D];
    visible(i, j) -> bool. Returns out [Lq,Hq,Dv], lse [Lq,Hq]."""
    lq, hq, _ = q.shape
    hkv = k.shape[1]
    out = torch.zeros(lq, hq, v.shape[2], dtype=torch.float64)
    lse = torch.full((lq, hq), -math.inf, dtype=torch.float64)
    for i in range(lq):
        keys = [j for j in range(k.shape[0]) if visible(i, j)]
        if not keys:
            continue
        for h in range(hq):
            kh = h // (hq // hkv)
            scores = torch.stack([(q[i, h].double() * k[j, kh].double()).sum() * scale for j in keys])
            m = scores.max()
            w = torch.exp(scores - m)
            lse[i, h] = m + torch.log(w.sum())
            p = w / w.sum()
            out[i, h] = sum(p[n] * v[keys[n], kh].double() for n in range(len(keys)))
    return out, lse


SHAPES = [
    # (hq, hkv, dk, dv)
    (4, 4, 8, 8),
    (4, 2, 16, 16),
    (8, 2, 8, 8),
    (4, 1, 12, 12),
    (2, 1, 24, 16),  # MLA-style prefill: V narrower than Q/K
]


@pytest.mark.parametrize("hq,hkv,dk,dv", SHAPES)
@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 5), (3, 9), (17, 17), (1, 7)])
def test_reference_prefill_matches_naive(hq, hkv, dk, dv, lq, lk):
    g = torch.Generator().manual_seed(hq * 100 + lq * 10 + lk)
    q = torch.randn(lq, hq, dk, generator=g)
    k = torch.randn(lk, hkv, dk, generator=g)
    v = torch.randn(lk, hkv, dv, generator=g)
    scale = dk**-0.5
    out, lse = reference.prefill_attention(q, k, v, VarlenRows.packed([lq], [lk]), scale)
    exp_out, exp_lse = naive_attention(q, k, v, scale, lambda i, j: j <= lk - lq + i)
    torch.testing.assert_close(out.double(), exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), exp_lse, atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32


def test_reference_prefill_varlen_batch_and_empty_rows():
    g = torch.Generator().manual_seed(7)
    q_lens, k_lens = [3, 0, 6, 1], [5, 2, 6, 1]
    q = torch.randn(sum(q_lens), 4, 8, generator=g)
    k = torch.randn(sum(k_lens), 2, 8, generator=g)
    v = torch.randn(sum(k_lens), 2, 8, generator=g)
    rows = VarlenRows.packed(q_lens, k_lens)
    out, lse = reference.prefill_attention(q, k, v, rows, 0.3)
    for qs, lq, ks, lk in zip(rows.q_start, rows.q_len, rows.k_start, rows.k_len):
        if lq == 0:
            continue
        eo, el = naive_attention(q[qs:qs + lq], k[ks:ks + lk], v[ks:ks + lk], 0.3, lambda i, j: j <= lk - lq + i)
        torch.testing.assert_close(out[qs:qs + lq].double(), eo, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[qs:qs + lq].double(), el, atol=1e-5, rtol=1e-5)


def test_noncausal_and_no_visible_keys():
    q = torch.randn(2, 2, 4)
    k = torch.randn(0, 1, 4)
    v = torch.randn(0, 1, 4)
    out, lse = reference.prefill_attention(q, k, v, VarlenRows((0,), (2,), (0,), (0,)), 1.0, causal=False)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("hq,hkv,dk,dv", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_flash_cpu_matches_reference(hq, hkv, dk, dv, dtype, tol):
    g = torch.Generator().manual_seed(hq + dk)
    # rows: plain prefill, query chunks after context (PCP), rows sharing keys, an empty row
    q_len = [7, 4, 4, 0, 33]
    k_start = [0, 7, 7, 0, 20]
    k_len = [7, 10, 16, 3, 40]
    q_start = [0, 7, 11, 15, 15]
    q = torch.randn(sum(q_len), hq, dk, generator=g).to(dtype)
    k = torch.randn(60, hkv, dk, generator=g).to(dtype)
    v = torch.randn(60, hkv, dv, generator=g).to(dtype)
    rows = VarlenRows(q_start, q_len, k_start, k_len)
    for causal in (True, False):
        ro, rl = reference.prefill_attention(q, k, v, rows, dk**-0.5, causal)
        fo, fl = flash_cpu.prefill_attention(q, k, v, rows, dk**-0.5, causal)
        torch.testing.assert_close(fo.float(), ro.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(fl, rl, atol=tol, rtol=tol)


def _paged_setup(g, block_size, seq_lens, hkv, dk, dv, num_blocks=64):
    """Random cache, random disjoint block tables; returns (kc, vc, tables, dense k/v per seq)."""
    kc = torch.randn(num_blocks, hkv, block_size, dk, generator=g)
    vc = torch.randn(num_blocks, hkv, block_size, dv, generator=g)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max((l + block_size - 1) // block_size for l in seq_lens) + 1
    tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    dense = []
    for s, length in enumerate(seq_lens):
        nb = (length + block_size - 1) // block_size
        blocks = [ids.pop() for _ in range(nb)]
        tables[s, :nb] = torch.tensor(blocks, dtype=torch.int32)
        ks = torch.cat([kc[b].transpose(0, 1) for b in blocks])[:length] if nb else kc.new_zeros(0, hkv, dk)
        vs = torch.cat([vc[b].transpose(0, 1) for b in blocks])[:length] if nb else vc.new_zeros(0, hkv, dv)
        dense.append((ks, vs))
    return kc, vc, tables, dense


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("hq,hkv,dk,dv", SHAPES)
# several short sequences (contracted in the blocked layout), long ones and one alone (copied first)
@pytest.mark.parametrize("seq_lens", [[1, 17, 40, 0, 33], [600, 3, 530], [700]], ids=["short", "long", "one"])
def test_paged_decode_matches_naive(block_size, hq, hkv, dk, dv, seq_lens):
    g = torch.Generator().manual_seed(block_size + hq)
    blocks = sum(-(-n // block_size) for n in seq_lens)
    kc, vc, tables, dense = _paged_setup(g, block_size, seq_lens, hkv, dk, dv, num_blocks=blocks + 64)
    q = torch.randn(len(seq_lens), hq, dk, generator=g)
    out, lse = reference.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.5)
    bout, blse = batched.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.5)
    for s, (ks, vs) in enumerate(dense):
        eo, el = naive_attention(q[s:s + 1], ks, vs, 0.5, lambda i, j: True)
        torch.testing.assert_close(out[s:s + 1].double(), eo, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[s:s + 1].double(), el, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bout, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blse, lse, atol=1e-5, rtol=1e-5)


def _cpu_ext():
    from braid.kernels import cpu_ext

    ext = cpu_ext.load()
    if ext is None:
        pytest.skip("braid's C++ CPU kernels are not built here (python -m braid.kernels.cpu_ext)")
    return ext


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("hq,hkv,dk,dv", SHAPES)
@pytest.mark.parametrize("seq_lens", [[1, 17, 40, 0, 33], [600, 3, 530], [700]], ids=["short", "long", "one"])
def test_cpu_ext_paged_decode_matches_reference(block_size, hq, hkv, dk, dv, seq_lens):
    """The C++ kernel (what ops dispatches to for fp32 on CPU) against the reference
    kernel: GQA shapes, empty rows (out 0, lse -inf), K/V as strided views of one cache
    layer (as the engine and MLA pass them)."""
    ext = _cpu_ext()
    g = torch.Generator().manual_seed(block_size * 7 + hq)
    blocks = sum(-(-n // block_size) for n in seq_lens)
    kc, vc, tables, _ = _paged_setup(g, block_size, seq_lens, hkv, dk, dv, num_blocks=blocks + 64)
    layer = torch.zeros(kc.shape[0], 2, hkv, block_size, max(dk, dv))  # one layer [blocks, C, H, B, D]
    layer[:, 0, ..., :dk], layer[:, 1, ..., :dv] = kc, vc
    k_view, v_view = layer[:, 0, ..., :dk], layer[:, 1, ..., :dv]
    q = torch.randn(len(seq_lens), hq, dk, generator=g)
    out, lse = reference.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.5)
    eout, elo = ext.paged_decode(q, k_view, v_view, tables, torch.tensor(seq_lens), 0.5)
    torch.testing.assert_close(eout, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(elo, lse, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(elo[torch.tensor(seq_lens) == 0]).all()


def _ext_against_reference(ext, q, k, v, tables, seq_lens, scale):
    out, lse = reference.paged_decode_attention(q, k, v, tables, seq_lens, scale)
    eout, elo = ext.paged_decode(q, k, v, tables, torch.tensor(seq_lens), scale)
    torch.testing.assert_close(eout, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(elo, lse, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(elo[torch.tensor(seq_lens) == 0]).all() and (eout[torch.tensor(seq_lens) == 0] == 0).all()


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (16, 2, 64), (8, 8, 32), (32, 4, 128)], ids=["g3", "g8", "g1", "d128"])
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_cpu_ext_paged_decode_block_edges_and_long_rows(block_size, hq, hkv, d, table_dtype):
    """The C++ kernel's tiles of keys (16 at a time, across block boundaries) against the
    reference: lengths 0, 1, B - 1, B, B + 1, 2B + 1 and a long row over many blocks,
    GQA groups of 3 and 8, no GQA, D 128; K/V as views of one [blocks, 2, H, B, D] layer."""
    ext = _cpu_ext()
    g = torch.Generator().manual_seed(block_size + hq + d)
    seq_lens = [0, 1, block_size - 1, block_size, block_size + 1, 2 * block_size + 1, 3000]
    blocks = sum(-(-n // block_size) for n in seq_lens)
    kc, vc, tables, _ = _paged_setup(g, block_size, seq_lens, hkv, d, d, num_blocks=blocks + 8)
    layer = torch.stack([kc, vc], dim=1)
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    _ext_against_reference(ext, q, layer[:, 0], layer[:, 1], tables.to(table_dtype), seq_lens, d**-0.5)


def test_cpu_ext_paged_decode_mla_views_of_one_latent_cache():
    """MLA: one KV head, K the whole 576-wide latent row and V its first 512 columns
    (two views of one [blocks, 1, 64, 576] tensor), 16 query heads."""
    ext = _cpu_ext()
    g = torch.Generator().manual_seed(5)
    seq_lens = [0, 1, 64, 65, 700]
    blocks = sum(-(-n // 64) for n in seq_lens)
    latent, _, tables, _ = _paged_setup(g, 64, seq_lens, 1, 576, 1, num_blocks=blocks + 4)
    q = torch.randn(len(seq_lens), 16, 576, generator=g)
    _ext_against_reference(ext, q, latent, latent[..., :512], tables, seq_lens, 576**-0.5)


@pytest.mark.parametrize("seq_lens", [[3000], [0, 2000, 5]], ids=["one", "mixed"])
def test_cpu_ext_paged_decode_split_context(seq_lens):
    """With fewer (row, KV head) items than threads the C++ kernel cuts each row's keys
    into parts on several threads and merges them by LSE (parts with no keys included)."""
    ext = _cpu_ext()
    g = torch.Generator().manual_seed(len(seq_lens))
    blocks = sum(-(-n // 16) for n in seq_lens)
    kc, vc, tables, _ = _paged_setup(g, 16, seq_lens, 1, 64, 64, num_blocks=blocks + 4)
    q = torch.randn(len(seq_lens), 4, 64, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        _ext_against_reference(ext, q, kc, vc, tables, seq_lens, 0.125)
    finally:
        torch.set_num_threads(threads)


def test_cpu_ext_refuses_a_block_outside_the_cache():
    ext = _cpu_ext()
    kc, vc = torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 2, 8)
    q = torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="block id outside the cache"):
        ext.paged_decode(q, kc, vc, torch.tensor([[3, 9]]), torch.tensor([4]), 1.0)
    with pytest.raises(RuntimeError, match="longer than its block table"):
        ext.paged_decode(q, kc, vc, torch.tensor([[3, 1]]), torch.tensor([5]), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_cpu_ext_write_kv_matches_reference(dtype, block_size):
    """The C++ KV write (what ops dispatches to on CPU) against the reference: a layer
    cache [blocks, 2, H, B, D], tokens in any order, -1 slots (another shard's) skipped,
    the cast to the cache's dtype first (as ops does); an MLA-like latent layer (C 1)."""
    ext = _cpu_ext()
    g = torch.Generator().manual_seed(block_size)
    for c, h, d in ((2, 3, 8), (1, 1, 24)):
        ref = torch.randn(12, c, h, block_size, d, generator=g).to(dtype)
        got = ref.clone()
        kv = torch.randn(9, c, h, d, generator=g)
        slots = torch.randperm(12 * block_size, generator=g)[:9]
        slots[torch.tensor([1, 4, 7])] = -1
        reference.write_kv_cache(ref, kv, slots)
        ext.write_kv(got, kv.to(dtype), slots)
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    with pytest.raises(RuntimeError, match="slot outside the cache"):
        ext.write_kv(got, kv.to(dtype), torch.full((9,), 12 * block_size))
    with pytest.raises(RuntimeError, match="in the cache's dtype"):
        ext.write_kv(torch.zeros(2, 1, 1, 4, 24, dtype=torch.float64), kv[:, :1, :1], slots)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("hq,hkv,dk,dv", SHAPES)
def test_paged_decode_rows_sharing_a_table_match_naive(block_size, hq, hkv, dk, dv):
    """Speculative verification: several query rows per sequence (same block-table row,
    lengths growing by one, some 0 as on a DCP shard that holds none yet) read the cache
    once per sequence and still equal the reference row by row."""
    g = torch.Generator().manual_seed(7 * block_size + hq)
    seq_lens = [5, 40, 0, 23]
    kc, vc, tables, _ = _paged_setup(g, block_size, seq_lens, hkv, dk, dv, num_blocks=200)
    rows = [(0, 3), (1, 38), (1, 39), (1, 40), (2, 0), (3, 21), (0, 4), (0, 5), (3, 22), (2, 0)]
    tab = tables[[s for s, _ in rows]]
    lens = [n for _, n in rows]
    q = torch.randn(len(rows), hq, dk, generator=g)
    out, lse = reference.paged_decode_attention(q, kc, vc, tab, lens, 0.5)
    bout, blse = batched.paged_decode_attention(q, kc, vc, tab, lens, 0.5)
    torch.testing.assert_close(bout, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blse, lse, atol=1e-5, rtol=1e-5)


def _merge_impl(name):
    """The reference merge, or the C++ one (cpu_ext.merge_states), same contract."""
    if name == "reference":
        return reference.merge_attn_states
    ext = _cpu_ext()
    return lambda outs, lses: tuple(ext.merge_states(outs, lses))


@pytest.mark.parametrize("impl", ["reference", "cpu_ext"])
@pytest.mark.parametrize("seed", range(6))
def test_merge_of_random_disjoint_shards_equals_full_attention(seed, impl):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    t, hq, hkv, d = 3, 4, 2, 8
    lk = rnd.randint(1, 50)
    n = rnd.randint(1, 5)
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(lk, hkv, d, generator=g)
    v = torch.randn(lk, hkv, d, generator=g)
    owner = [rnd.randrange(n) for _ in range(lk)]  # random disjoint key sets, some may be empty
    outs, lses = [], []
    for shard in range(n):
        idx = torch.tensor([j for j in range(lk) if owner[j] == shard], dtype=torch.long)
        o, l = reference.prefill_attention(q, k[idx], v[idx], VarlenRows((0,), (t,), (0,), (len(idx),)), 0.4, causal=False)
        outs.append(o)
        lses.append(l)
    out, lse = _merge_impl(impl)(torch.stack(outs), torch.stack(lses))
    full_o, full_l = naive_attention(q, k, v, 0.4, lambda i, j: True)
    torch.testing.assert_close(out.double(), full_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), full_l, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "cpu_ext"])
def test_merge_all_empty_and_nan_inputs(impl):
    merge = _merge_impl(impl)
    outs = torch.zeros(3, 2, 2, 4)
    lses = torch.full((3, 2, 2), float("-inf"))
    lses[1, 0, 0] = float("nan")
    lses[0, 1, 0] = float("inf")
    out, lse = merge(outs, lses)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    lses[2, 1, 1] = 0.5
    outs[2, 1, 1] = 3.0
    out, lse = merge(outs, lses)
    assert lse[1, 1] == 0.5 and torch.all(out[1, 1] == 3.0)


@pytest.mark.parametrize("n,t,h,d", [(2, 4, 4, 64), (3, 17, 5, 9), (4, 1, 1, 1)])
def test_cpu_ext_merge_of_strided_views_matches_reference(n, t, h, d):
    """The DCP and PCP merges pass out and LSE as views of one packed [N, T, H, D+1] tensor."""
    merge = _merge_impl("cpu_ext")
    g = torch.Generator().manual_seed(n * 100 + t)
    packed = torch.randn(n, t, h, d + 1, generator=g)
    packed[..., -1] *= 4
    packed[0, 0, 0, -1] = float("-inf")  # an empty shard, a row nobody saw, a NaN
    packed[:, -1, -1, -1] = float("-inf")
    packed[-1, 0, -1, -1] = float("nan")
    out, lse = merge(packed[..., :-1], packed[..., -1])
    ref_o, ref_l = reference.merge_attn_states(packed[..., :-1].clone(), packed[..., -1].clone())
    torch.testing.assert_close(out, ref_o, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse, ref_l, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("block_size,components,heads", [(1, 2, 2), (16, 2, 1), (8, 1, 1)])
def test_write_kv_cache_skips_minus_one(block_size, components, heads):
    cache = torch.zeros(10, components, heads, block_size, 4)
    kv = torch.randn(6, components, heads, 4)
    slots = torch.tensor([0, -1, block_size * 3 + block_size - 1, -1, block_size * 9, 1 if block_size > 1 else block_size])
    reference.write_kv_cache(cache, kv, slots)
    expected = torch.zeros_like(cache)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[s // block_size, :, :, s % block_size] = kv[t]
    assert torch.equal(cache, expected)
