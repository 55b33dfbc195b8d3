"""Throw-away X.509 material for the local world.

The emulated API server and Azure AD speak HTTPS like the real ones, so the
daemon's TLS code path (kubeconfig ``certificate-authority-data``,
``REQUESTS_CA_BUNDLE`` for MSAL, ``SSL_CERT_FILE`` for aiohttp) is the
production one.  This module makes a private CA, server certificates signed by
it, and client certificates for service principals of type 2 (PKCS#12 and PEM,
as aad-pod-identity stored them in Secrets).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateAuthority",
    "ClientCertificate",
    "ServerCertificate",
    "make_client_certificate",
]


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class ServerCertificate:
    """A server certificate and key in PEM, plus the CA that signed it."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context presenting this certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory() as d:
            cert = Path(d, "tls.crt")
            key = Path(d, "tls.key")
            cert.write_bytes(self.cert_pem + self.ca_pem)
            key.write_bytes(self.key_pem)
            ctx.load_cert_chain(cert, key)
        return ctx


@dataclass(frozen=True)
class ClientCertificate:
    """A self-signed certificate for a service principal (identity type 2)."""

    cert_pem: bytes
    key_pem: bytes
    thumbprint_sha1: bytes
    thumbprint_sha256: bytes

    def pkcs12(self, password: str | None = None) -> bytes:
        """The certificate and key as a PKCS#12 bundle (what aad-pod-identity read)."""
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        encryption: serialization.KeySerializationEncryption
        if password:
            encryption = serialization.BestAvailableEncryption(password.encode())
        else:
            encryption = serialization.NoEncryption()
        return pkcs12.serialize_key_and_certificates(b"sp", key, cert, None, encryption)


class CertificateAuthority:
    """A private CA that signs server certificates for the emulators."""

    def __init__(self, common_name: str = "nmi local world CA") -> None:
        self._key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self._name = name
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=30))
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
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)

    def write_bundle(self, path: Path | str) -> Path:
        """Write the CA certificate to ``path`` (for REQUESTS_CA_BUNDLE / SSL_CERT_FILE)."""
        p = Path(path)
        p.write_bytes(self.cert_pem)
        return p

    def issue_server(self, hostnames: list[str], ips: list[str] | None = None) -> ServerCertificate:
        """A server certificate valid for the given DNS names and IP addresses."""
        key = _new_key()
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in (ips or [])]
        cn = hostnames[0] if hostnames else (ips or ["localhost"])[0]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return ServerCertificate(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key),
            ca_pem=self.cert_pem,
        )


def make_client_certificate(common_name: str = "nmi-sp") -> ClientCertificate:
    """A self-signed RSA certificate usable as a service principal credential."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return ClientCertificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_key_pem(key),
        thumbprint_sha1=cert.fingerprint(hashes.SHA1()),  # noqa: S303 - x5t is SHA-1 by spec
        thumbprint_sha256=cert.fingerprint(hashes.SHA256()),
    )
