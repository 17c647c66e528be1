"""Key and certificate primitives for a federation (the `cryptography` package, no openssl CLI).

TLS uses ECDSA P-256 (understood by nginx, uvicorn and every TLS client); SuperNode identities
are ECDSA P-384 keys in OpenSSH format, the format `flower-supernode --auth-supernode-private-key`
and `flwr supernode register` read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey

# Names every SuperLink certificate carries so that loopback clients (the coordinator's CLI, the
# ServerApp process, the reverse proxy's upstream check) can verify it.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def new_tls_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_node_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_openssh(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def public_key_openssh(key: PrivateKey, comment: str) -> bytes:
    blob = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return blob + b" " + comment.encode() + b"\n"


def load_private_key(data: bytes) -> PrivateKey:
    """Load a PEM (PKCS#8) or OpenSSH EC private key."""
    loader = serialization.load_ssh_private_key if data.startswith(b"-----BEGIN OPENSSH") else serialization.load_pem_private_key
    key = loader(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        # A key file of another kind is a bad value, not a bad argument type; the provision CLI reports ValueError.
        raise ValueError(f"expected an EC private key, got {type(key).__name__}")  # noqa: TRY004
    return key


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    # Back-dated a little so that a slightly slow clock at a hospital still accepts a fresh certificate.
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    return start, start + dt.timedelta(days=days)


def create_ca(key: PrivateKey, federation: str, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} federation CA")])
    not_before, not_after = _validity(days)
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for `hosts` plus the loopback names, without duplicates."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, *LOOPBACK_NAMES]):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        names.append(entry)
    return names


def issue_server_certificate(
    ca_key: PrivateKey, ca_certificate: x509.Certificate, key: PrivateKey, hosts: Sequence[str], days: int
) -> x509.Certificate:
    not_before, not_after = _validity(days)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(subject_alternative_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def certificate_names(certificate: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses (as text) a certificate is valid for."""
    extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*extension.get_values_for_type(x509.DNSName), *map(str, extension.get_values_for_type(x509.IPAddress))}
