"""Starts and stops the router's HTTP API (braid.router.http_api) in the router's
event loop, on `RouterConfig.host` and `http_port` (0 = a free port).

With the router's TLS certificate (`router.tls.cert/key`) it serves HTTPS with
it; with `tls.ca` it requires a client certificate signed by that CA and, when
`tls.allowed_peers` is set, one naming an allowed peer (the same rule as the
gRPC service's Generate). aiohttp's runner is built with handler_cancellation:
a client that disconnects cancels its handler, and so its orchestrator calls.
"""
from __future__ import annotations

import logging
import ssl

from aiohttp import web

from braid.proto.tls import TlsConfig
from braid.router.config import RouterConfig
from braid.router.http_api import build_app
from braid.router.openai_protocol import ApiError

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
"""How long close() lets running HTTP requests end before cancelling them."""


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.mutual:
        ctx.load_verify_locations(tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _peer_names(request: web.Request) -> set[str]:
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    names = set()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "DNS":
            names.add(value)
    return names


def _allow_list(tls: TlsConfig):
    @web.middleware
    async def allow(request: web.Request, handler):
        if tls.mutual and tls.allowed_peers and not (_peer_names(request) & set(tls.allowed_peers)):
            raise ApiError(403, "this client certificate may not use the router (router.tls.allowed_peers)",
                           type_="permission_error", code="permission_denied")
        return await handler(request)

    return allow


class HttpServer:
    def __init__(self, runner: web.AppRunner, address: str):
        self.runner = runner
        self.address = address

    async def close(self) -> None:
        """Stop listening, let running requests end (bounded), then cancel the rest (idempotent)."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


async def start_http(rc: RouterConfig, orchestrator, view, metrics) -> HttpServer:
    """Serve the API on rc.host:rc.http_port; the caller skips this when http_port is -1."""
    app = build_app(orchestrator, view, metrics, middlewares=(_allow_list(rc.tls),))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, rc.host, rc.http_port, ssl_context=_ssl_context(rc.tls), reuse_port=False)
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"router: cannot bind HTTP {rc.host}:{rc.http_port}: {e}") from None
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    host = f"[{rc.host}]" if ":" in rc.host else rc.host
    return HttpServer(runner, f"{host}:{port}")
