"""Where a node's registration lives in etcd: /braid/<cluster>/nodes/<role>/<node_id>.

A node's registration (EtcdRegistration) writes its NodeInfo under `node_key`;
the router's membership view (EtcdMembership) lists and watches `nodes_prefix`
and maps each key it sees back to (role, node_id) with `parse_node_key`, so that
a value whose NodeInfo disagrees with its own key can be refused. Plain string
work, no etcd client.
"""
from __future__ import annotations

from braid.discovery.base import check_name, role_name
from braid.proto.names import ROLES_BY_NAME


def nodes_prefix(cluster: str) -> str:
    check_name("cluster", cluster)
    return f"/braid/{cluster}/nodes/"


def node_key(cluster: str, role: int | str, node_id: str) -> str:
    check_name("node_id", node_id)
    return f"{nodes_prefix(cluster)}{role_name(role)}/{node_id}"


def parse_node_key(prefix: str, key: str) -> tuple[int, str] | None:
    """(role, node_id) of a key under `prefix`, or None if it is not a node key."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix):].split("/")
    if len(parts) != 2 or parts[0] not in ROLES_BY_NAME or not parts[1]:
        return None
    return ROLES_BY_NAME[parts[0]], parts[1]


__all__ = ["node_key", "nodes_prefix", "parse_node_key"]
