"""TLS certificates for the coordinator and authentication keys for the nodes (the ``cryptography`` package).

``fedmdh deploy certs`` writes, into one folder:

- ``ca.crt`` / ``ca.key``: a certificate authority for this consortium (EC P-256, 10 years);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, whose
  subject alternative names are the hosts and IP addresses the nodes will connect to;
- ``nodes/<name>.key`` / ``nodes/<name>.pub``: one key pair per institution for SuperNode
  authentication (EC P-384, OpenSSH format, as Flower expects); the coordinator registers the
  public keys, each institution keeps its private key.

Private keys are written with mode 0600 from the start.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmdh.errors import InputError


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    folder: Path

    def node_key(self, name: str) -> Path:
        return self.folder / "nodes" / f"{name}.key"

    def node_pub(self, name: str) -> Path:
        return self.folder / "nodes" / f"{name}.pub"


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _san(hosts: Sequence[str]):
    from cryptography import x509

    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_certs(folder: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
               nodes: Sequence[str] = (), days: int = 3650, overwrite: bool = False) -> CertFiles:
    """Create the CA, the server certificate for ``hosts`` and one key pair per node name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from fedmdh.runtime.node import check_name

    folder = Path(folder)
    files = CertFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key", folder)
    if not hosts:
        raise InputError("give at least one --host the nodes will use to reach the coordinator.")
    for n in nodes:
        check_name(n)
    if files.ca.exists() and not overwrite:
        raise InputError(f"{files.ca} exists; use another folder (or --overwrite to replace the consortium's CA).")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmdh consortium CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
           .public_key(srv_key.public_key()).serial_number(x509.random_serial_number()).not_valid_before(now)
           .not_valid_after(now + datetime.timedelta(days=days))
           .add_extension(_san(hosts), critical=False)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write(files.ca, ca.public_bytes(pem), private=False)
    _write(folder / "ca.key", ca_key.private_bytes(pem, pkcs8, none), private=True)
    _write(files.server_cert, srv.public_bytes(pem), private=False)
    _write(files.server_key, srv_key.private_bytes(pem, pkcs8, none), private=True)
    for n in nodes:
        make_node_key(files.node_key(n), files.node_pub(n))
    return files


def make_node_key(private: str | Path, public: str | Path) -> None:
    """One SuperNode authentication key pair (EC P-384, OpenSSH format)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    _write(Path(private), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()), private=True)
    _write(Path(public), key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH) + b"\n", private=False)
