"""From an AzureIdentity and its Secret to what MSAL needs.

Secrets are read as aad-pod-identity's users wrote them:

* type 1 (service principal, secret): the single key of the Secret, or the key
  named ``clientsecret`` (any case) when there are several.  aad-pod-identity
  took "the first key" of a Go map, which is random; with several keys and
  none named ``clientsecret`` nmi refuses rather than guess.
* type 3 (federated): no Secret at all; the credential is the calling pod's own
  service-account token (:class:`ClientAssertion`, see ``tokens/assertions.py``).
* type 2 (service principal, certificate): key ``certificate`` holding PKCS#12
  (with the optional key ``password``) or PEM (certificate and private key in
  one value, or the key under ``key``/``privatekey``/``tls.key``); a standard
  ``kubernetes.io/tls`` Secret (``tls.crt``/``tls.key``) works too.

The authority comes from ``spec.adEndpoint`` + ``spec.tenantID``; a login host
that is not a known Azure cloud or explicitly allowed is refused, so an
identity can never send a Secret to an arbitrary endpoint.

``cryptography`` (about 9 MB resident) is imported only when a certificate
is first read: most nodes never need it.  Reading one is CPU work; callers
run ``client_certificate_from`` in a thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..config import DEFAULT_AUTHORITY, KNOWN_AUTHORITY_HOSTS, Settings
from ..kube.objects import AzureIdentity, Secret

if TYPE_CHECKING:
    from cryptography import x509

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,252}$")


class CredentialError(Exception):
    """The identity or its Secret cannot produce a credential (a configuration error)."""


@dataclass(frozen=True, slots=True)
class Authority:
    url: str  # https://host[:port]/tenant
    host: str  # host[:port], lower case
    known_cloud: bool


@dataclass(frozen=True, slots=True)
class ClientSecret:
    secret: str = field(repr=False)

    def for_msal(self) -> str:
        return self.secret


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    private_key_pem: str = field(repr=False)
    thumbprint_sha1: str
    public_certificate: str = field(repr=False)

    def for_msal(self) -> dict[str, str]:
        return {
            "private_key": self.private_key_pem,
            "thumbprint": self.thumbprint_sha1,
            "public_certificate": self.public_certificate,
        }


@dataclass(frozen=True, slots=True)
class ClientAssertion:
    """A federated identity's credential: the caller's service-account token.

    MSAL asks its ``client_assertion`` callable for the assertion whenever it sends
    a request; the callable reads the one the upstream call presents (set on the
    calling thread by :meth:`~nmi.tokens.upstream.Upstream.from_aad`), so one MSAL
    application serves every call of one service account, each with its own token.
    """

    provide: Callable[[], str] = field(repr=False)

    def for_msal(self) -> dict[str, Callable[[], str]]:
        return {"client_assertion": self.provide}


Credential = ClientSecret | ClientCertificate | ClientAssertion


def authority_for(identity: AzureIdentity, settings: Settings, *, tenant_id: str = "") -> Authority:
    endpoint = identity.ad_endpoint.strip() or DEFAULT_AUTHORITY
    parts = urlsplit(endpoint)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise CredentialError(f"adEndpoint {endpoint!r} is not an https URL")
    host = parts.netloc.lower().rsplit("@", 1)[-1]
    if not settings.authority_host_allowed(host):
        raise CredentialError(
            f"adEndpoint host {host!r} is not a known Azure cloud login host "
            "nor listed in --allowed-authority-hosts"
        )
    tenant = (tenant_id or identity.tenant_id).strip()
    if not tenant or not _TENANT.match(tenant):
        raise CredentialError("spec.tenantID is missing or not a tenant id or domain")
    bare = parts.hostname.lower()
    return Authority(
        url=f"https://{host}/{tenant}", host=host, known_cloud=bare in KNOWN_AUTHORITY_HOSTS
    )


def client_secret_from(secret: Secret) -> ClientSecret:
    data = secret.data
    if not data:
        raise CredentialError(f"secret {secret.meta.key} is empty")
    if len(data) == 1:
        value = next(iter(data.values()))
    else:
        named = [v for k, v in data.items() if k.lower() == "clientsecret"]
        if len(named) != 1:
            raise CredentialError(
                f"secret {secret.meta.key} has several keys and none named clientsecret"
            )
        value = named[0]
    text = value.decode("utf-8", "strict").strip()
    if not text:
        raise CredentialError(f"secret {secret.meta.key} holds an empty client secret")
    return ClientSecret(text)


def _get_ci(data: dict[str, bytes], *names: str) -> bytes | None:
    lowered = {k.lower(): v for k, v in data.items()}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


def client_certificate_from(secret: Secret) -> ClientCertificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs12

    data = dict(secret.data)
    blob = _get_ci(data, "certificate", "tls.crt")
    if not blob:
        raise CredentialError(f"secret {secret.meta.key} has no 'certificate' key")
    password = _get_ci(data, "password")
    key: object
    cert: x509.Certificate | None
    try:
        if b"-----BEGIN" in blob:
            certs = x509.load_pem_x509_certificates(blob)
            cert = certs[0] if certs else None
            key_blob = (
                blob
                if b"PRIVATE KEY-----" in blob
                else _get_ci(data, "key", "privatekey", "private_key", "tls.key")
            )
            if not key_blob:
                raise CredentialError(f"secret {secret.meta.key} has a PEM certificate but no key")
            key = serialization.load_pem_private_key(key_blob, password=password or None)
        else:
            key, cert, _ = pkcs12.load_key_and_certificates(blob, password or None)
    except CredentialError:
        raise
    except (ValueError, TypeError) as exc:
        raise CredentialError(
            f"secret {secret.meta.key}: cannot read the certificate ({type(exc).__name__})"
        ) from None
    if cert is None or key is None:
        raise CredentialError(f"secret {secret.meta.key}: certificate or key missing")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialError(f"secret {secret.meta.key}: the private key must be RSA")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return ClientCertificate(
        private_key_pem=key_pem,
        thumbprint_sha1=cert.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - x5t
        public_certificate=cert.public_bytes(serialization.Encoding.PEM).decode(),
    )
