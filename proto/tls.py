"""Transport security of every gRPC hop, in one place every layer may import
(torch-free, plain grpc): the `TlsConfig` a component's config section holds,
server and channel credentials built from its PEM paths, the check that refuses
plaintext on a non-loopback address, and the peer-name checks that run before a
request reaches a servicer.

In a request's life: the client SDK opens its channel to the router with
`channel_credentials` (its own certificate when mutual TLS is on); the router
serves with `server_credentials` (client certificates required when `ca` is
set) and dials every node with its own certificate; a node's `PeerAllowList`
interceptor refuses, before the servicer runs, any caller whose certificate
names none of `allowed_peers` (the router); the router answers ListNodes only
to a certificate named in `admin_peers`.

Identities are the names a certificate carries: its subject common name and its
DNS subject alternative names. Without TLS (loopback development) every check
here lets every caller through: there is no identity to check.
"""
from __future__ import annotations

import inspect
import ipaddress
from dataclasses import dataclass

import grpc

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


class TlsError(ValueError):
    """A TLS setting is missing, inconsistent or unreadable."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings of one component (router, a node kind, a client). All paths are PEM files."""

    ca: str = ""
    """CA bundle that signed the peers' certificates. Set, a server requires and verifies
    client certificates (mutual TLS) and a channel verifies the server against it."""
    cert: str = ""
    """This component's certificate chain: served to callers and presented when it dials
    (so it needs both serverAuth and clientAuth key usage)."""
    key: str = ""
    """The private key of `cert`."""
    server_name: str = ""
    """Name the dialled server's certificate must carry; empty = the host of the address.
    Nodes register pod IPs, so the router dials them checking a shared name (braid-node)."""
    allowed_peers: tuple[str, ...] = ()
    """Certificate names (CN or DNS SAN) allowed to call this server's braid services;
    empty = any certificate the CA signed. Nodes: the router's name."""
    admin_peers: tuple[str, ...] = ()
    """Router only: certificate names allowed to call ListNodes under mutual TLS
    (it reveals internal addresses and KV endpoints); empty = nobody."""
    insecure: bool = False
    """Allow a plaintext server on a non-loopback address (trusted network only)."""

    def __post_init__(self):
        for name in ("ca", "cert", "key", "server_name"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string, got {getattr(self, name)!r}")
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert: set cert and key together (or neither)")

    @property
    def enabled(self) -> bool:
        """Whether this component speaks TLS (it has its own certificate)."""
        return bool(self.cert)

    @property
    def mutual(self) -> bool:
        """Whether peers must present a certificate signed by `ca`."""
        return bool(self.ca and self.cert)


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address) is reachable from this machine only."""
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard: reachable from elsewhere


def check_bind(component: str, host: str, tls: TlsConfig) -> None:
    """Refuse (TlsError) a plaintext server bound to a non-loopback host unless `insecure` says so."""
    if tls.ca and not tls.enabled:
        raise TlsError(f"tls.ca: set, but tls.cert/key are not: the {component}'s server needs its own certificate")
    if tls.enabled or tls.insecure or is_loopback(host):
        return
    raise TlsError(
        f"host: {host!r} is not loopback and tls has no certificate: the {component}'s gRPC server would take "
        f"plaintext calls from anyone on the network. Set tls.cert/key/ca (or the cluster's shared tls section), "
        f"or tls.insecure: true on a trusted network"
    )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsError(f"tls.{what}: cannot read {path!r}: {e.strerror}") from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """Credentials of a server (None = plaintext); with `ca` it requires client certificates."""
    if not tls.enabled:
        return None
    pair = (_read(tls.key, "key"), _read(tls.cert, "cert"))
    ca = _read(tls.ca, "ca") if tls.ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials | None:
    """Credentials of a channel (None = plaintext): verify the server against `ca`,
    present our own certificate when we have one."""
    if not (tls.ca or tls.cert):
        return None
    ca = _read(tls.ca, "ca") if tls.ca else None
    key = _read(tls.key, "key") if tls.key else None
    cert = _read(tls.cert, "cert") if tls.cert else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel_options(tls: TlsConfig) -> list[tuple[str, object]]:
    """Channel options TLS needs: the name to check in the server's certificate."""
    return [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name and (tls.ca or tls.cert) else []


def add_port(server, address: str, tls: TlsConfig) -> int:
    """Bind `address` with TLS when configured, in plaintext otherwise; the bound port (0 = failed)."""
    creds = server_credentials(tls)
    if creds is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, creds)


def open_channel(address: str, tls: TlsConfig, *, options=(), aio: bool = True, interceptors=None):
    """A channel to `address`: TLS (and our certificate) when configured, plaintext otherwise.
    `interceptors` (grpc.aio client interceptors) only with `aio`."""
    module = grpc.aio if aio else grpc
    creds = channel_credentials(tls)
    opts = [*options, *channel_options(tls)]
    extra = {"interceptors": interceptors} if interceptors else {}
    if creds is None:
        return module.insecure_channel(address, options=opts, **extra)
    return module.secure_channel(address, creds, options=opts, **extra)


# -- peer identity ------------------------------------------------------------------


def peer_names(context) -> set[str]:
    """The names (CN, DNS SANs) of the caller's verified certificate; empty without TLS."""
    auth = context.auth_context() or {}
    names = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            names.add(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
    return names


def peer_allowed(context, tls: TlsConfig, allowed: tuple[str, ...]) -> bool:
    """Whether the caller may proceed: always without mutual TLS (nothing to check);
    under it, when `allowed` is empty (any certificate the CA signed) or names one of its names."""
    if not tls.mutual:
        return True
    if not allowed:
        return True
    return bool(peer_names(context) & set(allowed))


def _guarded(behavior, check):
    """`behavior` (an aio handler function) that first runs `check(context)`, which aborts."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            await check(context)
            async for item in behavior(request, context):
                yield item
        return stream

    async def unary(request, context):
        await check(context)
        return await behavior(request, context)
    return unary


class PeerAllowList(grpc.aio.ServerInterceptor):
    """Refuses (PERMISSION_DENIED) calls to `services` from a certificate not in the
    allow-list, before the servicer sees the request. Health and reflection stay open to
    any caller the TLS handshake admitted (probes and operators)."""

    def __init__(self, tls: TlsConfig, services: tuple[str, ...]):
        self._tls = tls
        self._prefixes = tuple(f"/{s}/" for s in services)

    async def _check(self, context) -> None:
        if not peer_allowed(context, self._tls, self._tls.allowed_peers):
            names = ", ".join(sorted(peer_names(context))) or "no certificate name"
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"caller ({names}) is not allowed here (tls.allowed_peers)")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self._tls.mutual or not handler_call_details.method.startswith(self._prefixes):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guarded(handler.unary_unary, self._check))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_guarded(handler.unary_stream, self._check))
        return handler  # braid's node services have no client-streaming methods
