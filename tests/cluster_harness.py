"""The integration tests' cluster: braid.cluster.launcher.LocalCluster with
small, fast settings (block size 4, 256 blocks a rank, one thread a rank,
2 s leases, round-robin routing)."""
from __future__ import annotations

import copy

from braid.cluster.launcher import LocalCluster

TEST_CONFIG = {
    "cluster": "test",
    "etcd": {"lease_ttl_s": 2, "timeout_s": 2},
    "router": {"prefill_policy": "round_robin", "decode_policy": "round_robin", "load_poll_s": 0.2,
               "request_timeout_s": 120},
    "prefill": {"parallel": {"prefill_context_parallel_size": 2, "threads_per_rank": 1},
                "cache": {"block_size": 4, "num_kv_blocks": 256}},
    "decode": {"parallel": {"tensor_parallel_size": 2, "decode_context_parallel_size": 2, "threads_per_rank": 1},
               "cache": {"block_size": 4, "num_kv_blocks": 256}},
}


def Cluster(workdir: str, model: str, overrides: dict | None = None) -> LocalCluster:
    """A LocalCluster (etcd started) with TEST_CONFIG, each section of `overrides` merged in."""
    data = copy.deepcopy(TEST_CONFIG)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return LocalCluster(workdir, data=data, model=model)


def start_pair(c: LocalCluster) -> LocalCluster:
    """Spawn one prefill node, one decode node and the router (kept as c.prefill, c.decode,
    c.router) and wait until the router can route to both; returns `c`."""
    from braid.client import Client

    c.prefill = c.spawn("prefill")
    c.decode = c.spawn("decode")
    c.router = c.spawn("router")
    with Client(c.router.address) as cl:
        c.wait_nodes(cl, {"prefill": {c.prefill.node_id}, "decode": {c.decode.node_id}})
    return c
