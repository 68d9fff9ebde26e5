"""TCPStores that listen only where they are asked to.

torch's TCPStore server binds every interface whatever host it is given (seen with
torch 2.x: [::]:port), so a store meant for loopback (an instance's ranks rendezvous
on rank 0's) or for one interface (the collective transport's receiver) would let
anyone on the network read and write its keys. `serve_store` binds the listening
socket itself and hands it to the store (master_listen_fd). In a request's life: the
engine's ranks meet on one at start-up, and a collective KV connection is set up
through the decode rank's.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist


def serve_store(host: str, port: int, world_size: int | None, timeout: timedelta) -> dist.TCPStore:
    """A TCPStore server on `host:port` (0: a free port, read `.port`) and nowhere else."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, backlog=512)
    bound = sock.getsockname()[1]
    fd = sock.detach()  # the store's server owns the listening socket from here on
    try:
        return dist.TCPStore(host, bound, world_size, True, timeout, wait_for_workers=False,
                             master_listen_fd=fd, use_libuv=True)
    except BaseException:
        os.close(fd)
        raise
