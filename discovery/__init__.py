"""Node registration and membership through etcd leases; a static discovery for tests.

In a request's life it comes before the request: each node registers its
NodeInfo (address, KV layout, capacity) under a lease it renews; the router
lists and watches the nodes of its cluster and routes only to those it sees.

    from braid.discovery import DiscoveryConfig, EtcdRegistration, EtcdMembership
    from braid.discovery import StaticMembership, StaticRegistration

The etcd classes load aetcd on first use, so importing this package stays cheap.
"""
from braid.discovery.base import (
    ROLE_NAMES,
    DiscoveryConfig,
    DiscoveryError,
    Membership,
    NodeIdInUse,
    Registration,
    parse_role,
    role_name,
    validate_node_info,
)
from braid.discovery.keys import node_key, nodes_prefix, parse_node_key
from braid.discovery.static import StaticMembership, StaticRegistration

_ETCD_NAMES = ("EtcdRegistration", "EtcdMembership")

__all__ = [
    "ROLE_NAMES", "DiscoveryConfig", "DiscoveryError", "Membership", "NodeIdInUse", "Registration", "parse_role",
    "role_name", "validate_node_info", "StaticMembership", "StaticRegistration", "node_key", "nodes_prefix",
    "parse_node_key", *_ETCD_NAMES,
]


def __getattr__(name):
    if name in _ETCD_NAMES:
        from braid.discovery import etcd

        return getattr(etcd, name)
    raise AttributeError(f"module 'braid.discovery' has no attribute {name!r}")
