"""Discovery without etcd: a fixed, test-mutable membership and a registration that
publishes into it (or nowhere). Same interfaces and notifications as the etcd
adapter, so router and node code under unit test cannot tell the difference."""
from __future__ import annotations

from typing import Iterable

from braid.discovery.base import (
    LOST_CLOSED,
    LOST_LEASE_GONE,
    Membership,
    NodeIdInUse,
    Registration,
    validate_node_info,
)
from braid.proto import common_pb2


class StaticMembership(Membership):
    """A view holding exactly the nodes given (and whatever tests add or remove)."""

    def __init__(self, nodes: Iterable[common_pb2.NodeInfo] = (), *, healthy: bool = True):
        super().__init__()
        for info in nodes:
            validate_node_info(info)
            self._put(info)
        self._healthy = healthy

    async def start(self, timeout: float | None = None) -> None:
        pass

    async def close(self) -> None:
        self._set_healthy(False)

    def add(self, info: common_pb2.NodeInfo) -> None:
        """Add or replace a node (by role and node_id)."""
        validate_node_info(info)
        self._put(info)

    def remove(self, node_id: str) -> bool:
        """Drop a node from every role; False if it was not there."""
        return self._remove(node_id)

    def replace(self, nodes: Iterable[common_pb2.NodeInfo]) -> None:
        nodes = list(nodes)
        for info in nodes:
            validate_node_info(info)
        self._replace_all(nodes)

    def set_healthy(self, healthy: bool) -> None:
        self._set_healthy(healthy)


class StaticRegistration(Registration):
    """Registers into a StaticMembership when given one, else does nothing.
    `lose()` simulates a lost lease; `start()` again re-registers."""

    def __init__(self, info: common_pb2.NodeInfo, membership: StaticMembership | None = None):
        super().__init__(info)
        self._membership = membership

    async def start(self, timeout: float | None = None) -> None:
        if self._closed:
            raise RuntimeError("registration is closed")
        if self._membership is not None:
            holder = self._membership.get(self._info.node_id, self._info.role)
            if holder is not None and holder.address != self._info.address:
                raise NodeIdInUse(
                    f"node_id {self._info.node_id!r} is already registered by a node at {holder.address}; "
                    f"this node is at {self._info.address}: give every node its own node_id")
            self._membership.add(self._info)
        self._set_registered(True)

    async def update(self, info: common_pb2.NodeInfo) -> None:
        self._check_update(info)
        self._info = info
        if self._registered and self._membership is not None:
            self._membership.add(info)

    def lose(self) -> None:
        """As if the lease had expired: the node vanishes and listeners hear False."""
        if self._membership is not None:
            self._membership.remove(self._info.node_id)
        self._set_registered(False, LOST_LEASE_GONE)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._registered and self._membership is not None:
            self._membership.remove(self._info.node_id)
        self._set_registered(False, LOST_CLOSED)
