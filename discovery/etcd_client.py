"""The etcd client braid's discovery talks through: aetcd's API over a channel we
open ourselves, so that it can use TLS (server verification and a client
certificate), etcd's username/password authentication, and every configured
member rather than only the first.

In a request's life this is the connection under discovery: a node registers its
lease through it, the router watches membership through it. aetcd 1.0 always
opens a plaintext channel to one host:port and keeps one authentication token
forever; `BraidEtcdClient.connect` replaces only that step (channel, stubs) and
puts the token on every call through interceptors, authenticating again after
etcd forgot it (an etcd restart), and leaves every call of aetcd as it is.

Failover: with several members the channel target lists all their addresses
(`ipv4:a:p,b:p`), resolved when the client connects; gRPC's pick_first policy
connects to the first that answers and moves to the next when its connection
breaks, so a dead first member costs one connection attempt, not an outage.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import aetcd
import grpc
from aetcd import rpc, watcher

from braid.discovery.base import DiscoveryConfig
from braid.proto.tls import TlsConfig, open_channel

log = logging.getLogger(__name__)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def _resolve(host: str, port: int) -> list[str]:
    """IP addresses of `host` (itself when it is one); none when it does not resolve."""
    if _is_ip(host):
        return [host]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        log.warning("etcd endpoint %s:%s does not resolve (%s); skipping it", host, port, e)
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


async def channel_target(config: DiscoveryConfig) -> str:
    """The gRPC target naming every configured member, in order."""
    members = config.all_endpoints
    if len(members) == 1:
        host, port = members[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    v4, v6 = [], []
    for host, port in members:
        for ip in await _resolve(host, port):
            (v6 if ":" in ip else v4).append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    # one target URI holds one address family; IPv4 first, as most etcd clusters use it
    if v4:
        return "ipv4:" + ",".join(v4)
    if v6:
        return "ipv6:" + ",".join(v6)
    raise ConnectionError(f"no etcd endpoint of {config.endpoint}, {', '.join(config.failover_endpoints)} resolves")


def tls_of(config: DiscoveryConfig) -> TlsConfig:
    """The discovery settings' TLS part, with the name to check in members' certificates."""
    if not config.ca_file and not config.cert_file:
        return TlsConfig()
    name = config.server_name or config.all_endpoints[0][0]
    return TlsConfig(ca=config.ca_file, cert=config.cert_file, key=config.key_file, server_name=name)


AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"


class _Token:
    """etcd's authentication token, put on every call by the interceptors below.

    etcd's default (simple) tokens live in the member's memory: after an etcd restart,
    or after the token's TTL without use, every call fails UNAUTHENTICATED. aetcd
    would send the dead token forever (a registration keeps its client), so a call
    that fails so marks the token stale and the next call authenticates again first.
    """

    def __init__(self, username: str, password: str, timeout: float | None):
        self._username, self._password, self._timeout = username, password, timeout
        self._token: str | None = None
        self._lock = asyncio.Lock()
        self.channel = None  # set once the channel exists (the interceptors need it)

    async def metadata(self, details) -> list:
        if self._token is None:
            async with self._lock:
                if self._token is None:
                    reply = await rpc.AuthStub(self.channel).Authenticate(
                        rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                    self._token = reply.token
        return [*(details.metadata or ()), ("token", self._token)]

    def watch(self, call) -> None:
        """Forget the token when `call` ends UNAUTHENTICATED (aio's code() is awaitable,
        so the check runs as a task once the call is done)."""
        async def check(c) -> None:
            if await c.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._token = None

        call.add_done_callback(lambda c: None if c.cancelled() else asyncio.ensure_future(check(c)))

    async def _call(self, continuation, details, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method == AUTHENTICATE:  # (grpc.aio hands the method name over as bytes)
            return await continuation(details, request)
        details = grpc.aio.ClientCallDetails(details.method, details.timeout, await self.metadata(details),
                                             details.credentials, details.wait_for_ready)
        call = await continuation(details, request)
        self.watch(call)
        return call


class _Injector:
    def __init__(self, token: _Token):
        self._token = token


# one class per call kind: grpc.aio files an interceptor under the first kind it is an instance of
class _UnaryUnary(_Injector, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._token._call(continuation, client_call_details, request)


class _UnaryStream(_Injector, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._token._call(continuation, client_call_details, request)


class _StreamStream(_Injector, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self._token._call(continuation, client_call_details, request_iterator)


class BraidEtcdClient(aetcd.Client):
    """aetcd.Client whose connection honours TLS, authentication and all endpoints."""

    def __init__(self, config: DiscoveryConfig, options: dict):
        host, port = config.all_endpoints[0]
        super().__init__(host=host, port=port, timeout=config.call_timeout_s, options=options)
        self._braid_config = config

    async def connect(self) -> None:
        """Open the channel (once; concurrent callers wait for the first), authenticate, make the stubs."""
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            cfg = self._braid_config
            token = _Token(cfg.username, cfg.password, self._timeout) if cfg.username else None
            interceptors = [_UnaryUnary(token), _UnaryStream(token), _StreamStream(token)] if token else None
            channel = open_channel(await channel_target(cfg), tls_of(cfg), options=list(self._options.items()),
                                   interceptors=interceptors)
            if token is not None:
                token.channel = channel
                try:  # fail here, at connect, on a wrong password
                    await token.metadata(grpc.aio.ClientCallDetails("", None, None, None, None))
                except BaseException:
                    await channel.close()
                    raise
            self._use_channel(channel)
            self._connected.set()
        finally:
            self._is_connecting = False

    def _use_channel(self, channel) -> None:
        self.channel, self.metadata = channel, None  # the token travels by interceptor
        self.auth_stub = rpc.AuthStub(channel)
        self.kvstub = rpc.KVStub(channel)
        self.clusterstub = rpc.ClusterStub(channel)
        self.leasestub = rpc.LeaseStub(channel)
        self.maintenancestub = rpc.MaintenanceStub(channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(channel), timeout=self._timeout, metadata=None)
