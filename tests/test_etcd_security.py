"""The etcd client's security settings and failover, against a real etcd started
per test on loopback: every configured endpoint is used (a dead first one costs
nothing), username/password reach etcd's authentication (a wrong password fails,
the right one works), and TLS to etcd verifies the member and presents braid's
client certificate."""
from __future__ import annotations

import asyncio
import subprocess

import pytest

from braid.cluster.certs import make_certs
from braid.cluster.config import load_config
from braid.discovery import DiscoveryConfig
from braid.discovery.etcd import EtcdMembership, EtcdRegistration
from braid.discovery.etcd_server import EtcdServer, _free_ports, find_etcd_binary
from braid.proto import common_pb2 as pb
from test_discovery import needs_etcd, node, run

pytestmark = needs_etcd
TIMEOUTS = dict(lease_ttl_s=2, call_timeout_s=2.0, backoff_initial_s=0.05, backoff_max_s=0.5, start_timeout_s=10.0)


def _dead_endpoint() -> str:
    """A loopback port nobody listens on (bound once, then released)."""
    (port,) = _free_ports(1)
    return f"127.0.0.1:{port}"


async def _register_and_see(cfg: DiscoveryConfig, node_id: str, timeout: float = 10.0) -> set[str]:
    """Register a node and return the ids a membership of the same config lists."""
    reg = EtcdRegistration(cfg, node(node_id))
    members = EtcdMembership(cfg)
    try:
        await reg.start(timeout=timeout)
        await members.start(timeout=timeout)
        await members.wait_for(lambda m: node_id in m.nodes(pb.ROLE_PREFILL), 2.0)
        return set(members.nodes(pb.ROLE_PREFILL))
    finally:
        await members.close()
        await reg.close()


def test_cluster_config_passes_every_endpoint_and_the_credentials():
    cfg = load_config(data={"etcd": {"endpoints": ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379"],
                                     "username": "braid", "password": "s3cret",
                                     "tls": {"ca": "/ca.pem", "cert": "/c.pem", "key": "/k.pem"}}})
    d = cfg.discovery()
    assert d.all_endpoints == (("10.0.0.1", 2379), ("10.0.0.2", 2379), ("10.0.0.3", 2379))
    assert (d.username, d.password) == ("braid", "s3cret")
    assert (d.ca_file, d.cert_file, d.key_file) == ("/ca.pem", "/c.pem", "/k.pem")
    assert "s3cret" not in repr(d) and "s3cret" not in repr(cfg.etcd)  # never in a log line


def test_a_dead_first_endpoint_fails_over_to_the_next(etcd):
    data = {"cluster": "failover", "etcd": {"endpoints": [_dead_endpoint(), etcd.endpoint], "lease_ttl_s": 2,
                                            "timeout_s": 2}}
    cfg = load_config(data=data).discovery()
    assert run(_register_and_see(cfg, "p-failover"), 30) == {"p-failover"}


def _etcdctl(srv: EtcdServer, *args: str) -> str:
    cmd = [find_etcd_binary().rsplit("/", 1)[0] + "/etcdctl", "--endpoints", srv.client_url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout


def test_etcd_auth_wrong_password_fails_right_one_works(etcd):
    _etcdctl(etcd, "user", "add", "root:right-pw")
    _etcdctl(etcd, "auth", "enable")
    base = dict(endpoint=etcd.endpoint, cluster="auth", **TIMEOUTS)

    async def refused(cfg: DiscoveryConfig) -> bool:
        reg = EtcdRegistration(cfg, node("p-auth"))
        try:
            await reg.start(timeout=3.0)
        except Exception:  # noqa: BLE001 - DiscoveryError naming the failure
            return True
        finally:
            await reg.close()
        return False

    assert run(refused(DiscoveryConfig(**base)), 20), "no credentials must be refused once auth is on"
    assert run(refused(DiscoveryConfig(username="root", password="wrong", **base)), 20)
    assert run(_register_and_see(DiscoveryConfig(username="root", password="right-pw", **base), "p-auth"), 30) \
        == {"p-auth"}


def test_etcd_auth_survives_an_etcd_restart(etcd):
    # etcd's simple tokens live in its memory: after a restart the old token is refused,
    # and a client that keeps it (a node's registration keeps its client) is locked out
    _etcdctl(etcd, "user", "add", "root:pw")
    _etcdctl(etcd, "auth", "enable")
    from braid.discovery.etcd import _new_client

    async def body():
        client = _new_client(DiscoveryConfig(endpoint=etcd.endpoint, cluster="auth", username="root", password="pw",
                                             **{k: v for k, v in TIMEOUTS.items() if k != "lease_ttl_s"}))
        try:
            await client.put(b"/braid-auth-test", b"1")
            await asyncio.to_thread(etcd.restart)
            errors = []
            for _ in range(50):  # bounded: about 10 s
                try:
                    got = await client.get(b"/braid-auth-test")
                    return got.value, errors
                except Exception as e:  # noqa: BLE001 - refused token, or etcd still starting
                    errors.append(type(e).__name__)
                    await asyncio.sleep(0.2)
            return None, errors
        finally:
            await client.close()

    value, errors = run(body(), 60)
    assert value == b"1", errors


@pytest.fixture
def tls_etcd(tmp_path):
    """etcd serving plain HTTP (for its health check) and HTTPS with client-certificate auth."""
    certs = make_certs(str(tmp_path / "certs"))
    (https_port,) = _free_ports(1)
    srv = EtcdServer(start_timeout=30.0, stop_timeout=10.0)
    srv.extra_args = (
        "--listen-client-urls", f"{srv.client_url},https://127.0.0.1:{https_port}",
        "--cert-file", certs["router"].cert, "--key-file", certs["router"].key,
        "--trusted-ca-file", certs["router"].ca, "--client-cert-auth",
    )
    srv.start()
    try:
        yield srv, f"127.0.0.1:{https_port}", certs
    finally:
        srv.close()


def test_tls_to_etcd_with_a_client_certificate(tls_etcd):
    srv, https, certs = tls_etcd
    c = certs["decode"]
    good = DiscoveryConfig(endpoint=https, cluster="tls", ca_file=c.ca, cert_file=c.cert, key_file=c.key, **TIMEOUTS)
    assert run(_register_and_see(good, "p-tls"), 30) == {"p-tls"}

    async def refused(cfg: DiscoveryConfig) -> bool:
        members = EtcdMembership(cfg)
        try:
            await members.start(timeout=3.0)
        except Exception:  # noqa: BLE001
            return True
        finally:
            await members.close()
        return False

    # plaintext to the TLS port, and TLS without a client certificate, are both refused
    assert run(refused(DiscoveryConfig(endpoint=https, cluster="tls", **TIMEOUTS)), 20)
    assert run(refused(DiscoveryConfig(endpoint=https, cluster="tls", ca_file=c.ca, **TIMEOUTS)), 20)
