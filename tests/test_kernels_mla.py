"""Latent (MLA) decode attention against a dense float64 softmax written here,
and absorbed against un-absorbed attention on random weights."""
import math

import pytest
import torch

from braid.kernels import mla, ops, reference


def dense_latent_attention(q, latents, kv_lora_rank, scale):
    """float64 MQA of one query token: q [H, L+R], latents [N, L+R] (the keys),
    values latents[:, :L]. Returns out [H, L], lse [H]; N == 0 gives 0 and -inf."""
    h = q.shape[0]
    if latents.shape[0] == 0:
        return torch.zeros(h, kv_lora_rank, dtype=torch.float64), torch.full((h,), -math.inf, dtype=torch.float64)
    scores = q.double() @ latents.double().t() * scale  # [H, N]
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[:, None])
    return p @ latents[:, :kv_lora_rank].double(), lse


def paged_cache(seq_lens, block_size, dim, g):
    """A latent cache [num_blocks, 1, 1, B, dim] holding each sequence's tokens in
    shuffled blocks; returns (cache, block_tables, per-sequence latents [len, dim])."""
    per_seq = [-(-n // block_size) for n in seq_lens]
    total = sum(per_seq) + 2  # spare blocks stay random: they must never be read
    cache = torch.randn(total, 1, 1, block_size, dim, generator=g)
    order = torch.randperm(total, generator=g).tolist()
    width = max(1, max(per_seq))
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int64)
    latents = []
    for s, n in enumerate(seq_lens):
        blocks = [order.pop() for _ in range(per_seq[s])]
        tables[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        rows = [cache[blocks[j // block_size], 0, 0, j % block_size] for j in range(n)]
        latents.append(torch.stack(rows) if rows else torch.zeros(0, dim))
    return cache, tables, latents


SHAPES = [
    # (heads, kv_lora_rank, rope)
    (4, 32, 8),
    (1, 16, 4),
    (8, 64, 16),
    (2, 512, 64),  # DeepSeek-V2's latent size
]


@pytest.mark.parametrize("heads,lora,rope", SHAPES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_latent_decode_matches_dense_softmax(heads, lora, rope, block_size):
    g = torch.Generator().manual_seed(heads * 1000 + lora + block_size)
    seq_lens = [1, 0, 5, block_size, 2 * block_size + 1, 37]
    cache, tables, latents = paged_cache(seq_lens, block_size, lora + rope, g)
    q = torch.randn(len(seq_lens), heads, lora + rope, generator=g)
    scale = (lora + rope) ** -0.5
    k_view, v_view = mla.latent_views(cache, lora)
    assert k_view.shape == (cache.shape[0], 1, block_size, lora + rope) and v_view.shape[-1] == lora
    assert k_view.data_ptr() == cache.data_ptr() == v_view.data_ptr()  # views, no copy
    results = {
        "reference": mla.mla_decode_attention(q, k_view, lora, tables, seq_lens, scale),
        "ops": ops.paged_decode_attention(q, k_view, v_view, tables, torch.tensor(seq_lens), scale),
    }
    for name, (out, lse) in results.items():
        assert out.shape == (len(seq_lens), heads, lora) and lse.dtype == torch.float32
        for s, n in enumerate(seq_lens):
            exp_out, exp_lse = dense_latent_attention(q[s], latents[s], lora, scale)
            torch.testing.assert_close(out[s].double(), exp_out, atol=1e-5, rtol=1e-5, msg=f"{name} seq {s}")
            torch.testing.assert_close(lse[s].double(), exp_lse, atol=1e-5, rtol=1e-5, msg=f"{name} seq {s}")


def test_latent_shards_merge_to_the_whole():
    """Tokens split over 3 shards (as DCP stores them), attended per shard and merged by LSE."""
    g = torch.Generator().manual_seed(3)
    heads, lora, rope, n = 4, 32, 8, 23
    latents = torch.randn(n, lora + rope, generator=g)
    q = torch.randn(heads, lora + rope, generator=g)
    scale = 0.2
    outs, lses = [], []
    for shard in range(3):
        part = latents[shard::3]
        cache = part.view(-1, 1, 1, 1, lora + rope)  # block size 1
        table = torch.arange(part.shape[0])[None, :]
        o, l = mla.mla_decode_attention(q[None], mla.latent_views(cache, lora)[0], lora, table, [part.shape[0]], scale)
        outs.append(o)
        lses.append(l)
    merged, lse = reference.merge_attn_states(torch.stack(outs), torch.stack(lses))
    exp_out, exp_lse = dense_latent_attention(q, latents, lora, scale)
    torch.testing.assert_close(merged[0].double(), exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0].double(), exp_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,lora,rope,nope,v_dim", [(4, 32, 8, 16, 16), (2, 64, 16, 24, 8), (8, 16, 4, 8, 32)])
@pytest.mark.parametrize("n", [1, 9, 40])
def test_absorbed_equals_unabsorbed(heads, lora, rope, nope, v_dim, n):
    """Decode with W_UK folded into q and W_UV applied after attention equals
    attention over the decompressed per-head K and V."""
    g = torch.Generator().manual_seed(heads + lora + n)
    w_uk = torch.randn(heads, nope, lora, generator=g) * 0.3
    w_uv = torch.randn(heads, v_dim, lora, generator=g) * 0.3
    kv_c = torch.randn(n, lora, generator=g)
    k_pe = torch.randn(n, rope, generator=g)
    q_nope = torch.randn(heads, nope, generator=g)
    q_pe = torch.randn(heads, rope, generator=g)
    scale = (nope + rope) ** -0.5

    # un-absorbed: per-head keys [n, H, nope + rope] and values [n, H, v]
    k = torch.cat([torch.einsum("hnl,tl->thn", w_uk, kv_c), k_pe[:, None, :].expand(n, heads, rope)], dim=-1)
    v = torch.einsum("hvl,tl->thv", w_uv, kv_c)
    q = torch.cat([q_nope, q_pe], dim=-1)[None]  # [1, H, nope + rope]
    exp_out, exp_lse = reference.dense_attention(q, k, v, scale, causal=False)

    # absorbed: MQA over the latent cache, block size 4
    latents = torch.cat([kv_c, k_pe], dim=-1)
    nb = -(-n // 4)
    cache = torch.zeros(nb * 4, lora + rope)
    cache[:n] = latents
    cache = cache.view(nb, 1, 1, 4, lora + rope)
    q_lat = torch.cat([torch.einsum("hn,hnl->hl", q_nope, w_uk), q_pe], dim=-1)[None]  # [1, H, L + R]
    k_view, v_view = mla.latent_views(cache, lora)
    out_lat, lse = ops.paged_decode_attention(q_lat, k_view, v_view, torch.arange(nb)[None], torch.tensor([n]), scale)
    out = torch.einsum("shl,hvl->shv", out_lat, w_uv)
    torch.testing.assert_close(out, exp_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, exp_lse, atol=1e-4, rtol=1e-4)
