"""A throw-away certificate authority and a loopback server certificate for the test world.

`make_ca(directory)` writes PEM files that the identity provider, Dovecot, Postfix, the proxy under test and
the direct clients in the tests all use:

- `ca.pem`: the CA certificate (trust anchor for clients),
- `server.pem`: the server certificate for `IP:127.0.0.1, IP:127.0.0.2, DNS:localhost` (serverAuth),
- `server.key`: its private key (unencrypted PKCS#8),
- `server-combined.pem`: certificate then key, for programs that want both in one file.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertificateFiles:
    """Paths of the PEM files written by `make_ca`."""

    directory: Path
    ca_path: Path
    cert_path: Path
    key_path: Path
    combined_path: Path

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context presenting the loopback certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts only the test CA (hostname checking on)."""
        return ssl.create_default_context(cafile=str(self.ca_path))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "emailproxy test world"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_authority(
    common_name: str, not_before: datetime.datetime, not_after: datetime.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (P-256) that may sign server certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A serverAuth certificate for `hosts` (IPs or DNS names; the first is also the common name)."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_pem(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path
) -> None:
    """The certificate and its private key (unencrypted PKCS#8, mode 0600) as PEM files."""
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    key_path.chmod(0o600)


def make_ca(
    directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2", "localhost")
) -> CertificateFiles:
    """Create a CA and a server certificate for `hosts` (IPs or DNS names) and write them to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=30)
    ca_key, ca_cert = new_authority("emailproxy test CA", not_before, not_after)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, hosts, not_before, not_after)

    files = CertificateFiles(
        directory=directory,
        ca_path=directory / "ca.pem",
        cert_path=directory / "server.pem",
        key_path=directory / "server.key",
        combined_path=directory / "server-combined.pem",
    )
    files.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    write_pem(server_cert, server_key, files.cert_path, files.key_path)
    files.combined_path.write_bytes(files.cert_path.read_bytes() + files.key_path.read_bytes())
    files.combined_path.chmod(0o600)
    return files
