"""The hash chain that names a prompt's KV blocks, shared by the engines (their
prefix caches) and the router (matching a prompt against what each node holds).

Block i of a token sequence is tokens [i*B, (i+1)*B); its hash covers blocks
0..i: h_i = blake2b(h_{i-1} || tokens of block i), with h_{-1} = the seed. The
seed folds in everything else that changes a block's KV (the model, the cache
dtype, the block size), so equal hashes mean equal KV on any node that
publishes the same seed. Only full blocks are hashed: a partial block can
still grow and cannot be shared. Torch-free (the router imports it).
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

DIGEST_BYTES = 8
"""64-bit hashes: a collision needs ~2^32 distinct blocks in one index."""


def cache_seed(*parts: object) -> bytes:
    """The chain's seed for a cache whose KV depends on `parts` (model, dtype, block size...)."""
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=DIGEST_BYTES).digest()


def extend_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int, seed: bytes) -> list[int]:
    """Append to `hashes` (the chain of the first len(hashes) blocks of `token_ids`)
    the hashes of the further full blocks; returns `hashes`."""
    prev = hashes[-1].to_bytes(DIGEST_BYTES, "little") if hashes else seed
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        block = array("q", token_ids[start : start + block_size]).tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=DIGEST_BYTES).digest()
        hashes.append(int.from_bytes(prev, "little"))
    return hashes


def block_hashes(token_ids: Sequence[int], block_size: int, seed: bytes = b"") -> list[int]:
    """Chained hashes of the full `block_size`-token blocks of `token_ids`."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return extend_hashes([], token_ids, block_size, seed)
