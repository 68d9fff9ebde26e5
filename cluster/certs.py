"""Throwaway certificates for a mutual-TLS cluster (`braid up --tls`, the TLS tests):
one CA and one certificate per identity, written as PEM files into a folder.

In a request's life these are the identities the TLS checks of braid.proto.tls
compare: the client presents `client` (or `admin`) to the router, the router
presents `router` to the nodes, which admit only that name; the nodes present
`prefill` / `decode`, which also carry the shared name `braid-node` the router
checks when it dials a node by IP. The serving identities' certificates are
valid for loopback (127.0.0.1, ::1, localhost); every certificate is good for
both server and client authentication and lives one day: they prove the path,
they are not a PKI.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from braid.cluster.config import ADMIN_IDENTITY, NODE_IDENTITY, ROUTER_IDENTITY

VALID_FOR = datetime.timedelta(days=1)
IDENTITIES = {
    # file stem -> certificate names (the first is the subject CN)
    "router": (ROUTER_IDENTITY,),
    "prefill": ("braid-prefill", NODE_IDENTITY),
    "decode": ("braid-decode", NODE_IDENTITY),
    "client": ("braid-client",),
    "admin": (ADMIN_IDENTITY,),
}

SERVERS = ("router", "prefill", "decode")
"""Identities that also serve, so their certificates name the loopback addresses."""


@dataclass(frozen=True)
class CertPaths:
    """The PEM files of one identity."""

    ca: str
    cert: str
    key: str


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(path: str, data: bytes) -> None:
    # private keys readable by their owner only
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject_cn: str, issuer_cn: str, public_key, now):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID_FOR))


def _ca(now):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    cert = (_builder("braid throwaway CA", "braid throwaway CA", key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(names: tuple[str, ...], ca_key, ca_cert, now, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _key()
    alt = [x509.DNSName(n) for n in names]
    if server:  # dialled on loopback by `braid up` and the tests; a client's names stay its own
        alt += [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    cert = (_builder(names[0], "braid throwaway CA", key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def make_certs(folder: str, extra: dict[str, tuple[str, ...]] | None = None) -> dict[str, CertPaths]:
    """A fresh CA and a certificate per identity (IDENTITIES plus `extra`) in `folder`;
    returns stem -> CertPaths. `extra` adds identities, e.g. a stranger for tests."""
    from cryptography.hazmat.primitives import serialization

    os.makedirs(folder, mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_cert = _ca(now)
    ca_path = os.path.join(folder, "ca.pem")
    _write(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    out = {}
    for stem, names in {**IDENTITIES, **(extra or {})}.items():
        key, cert = _leaf(names, ca_key, ca_cert, now, server=stem in SERVERS)
        cert_path, key_path = os.path.join(folder, f"{stem}.pem"), os.path.join(folder, f"{stem}-key.pem")
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        _write(key_path, _pem_key(key))
        out[stem] = CertPaths(ca=ca_path, cert=cert_path, key=key_path)
    return out


def tls_config_data(paths: dict[str, CertPaths]) -> dict:
    """The cluster config's TLS part (plain data) for certificates from make_certs:
    mutual TLS on the router and both node kinds, each with its own certificate."""
    data = {}
    for role in ("router", "prefill", "decode"):
        p = paths[role]
        data[role] = {"tls": {"ca": p.ca, "cert": p.cert, "key": p.key}}
    return data
