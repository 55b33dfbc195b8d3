"""Credentials from Secrets as aad-pod-identity's users stored them, and authority checks."""

import pytest

from nmi.config import Settings
from nmi.kube.objects import AzureIdentity, Secret
from nmi.tokens.credentials import (
    CredentialError,
    authority_for,
    client_certificate_from,
    client_secret_from,
)
from nmi_sandbox import manifests as m
from nmi_sandbox.tls import make_client_certificate


def secret(**data: bytes) -> Secret:
    return Secret.parse(m.secret(name="s", data=data))


def test_client_secret_single_key_or_named_key() -> None:
    assert client_secret_from(secret(anything=b"v1\n")).secret == "v1"
    assert client_secret_from(secret(ClientSecret=b"v2", other=b"x")).secret == "v2"
    with pytest.raises(CredentialError):
        client_secret_from(secret(a=b"1", b=b"2"))
    with pytest.raises(CredentialError):
        client_secret_from(secret())


@pytest.mark.parametrize("password", [None, "correct horse battery staple"])
def test_pkcs12(password: str | None) -> None:
    cert = make_client_certificate("sp")
    data = {"certificate": cert.pkcs12(password)}
    if password:
        data["password"] = password.encode()
    cred = client_certificate_from(secret(**data))
    assert cred.thumbprint_sha1 == cert.thumbprint_sha1.hex().upper()
    assert "PRIVATE KEY" in cred.private_key_pem
    assert "horse" not in repr(cred) and "PRIVATE" not in repr(cred)


def test_pem_forms_and_tls_secret() -> None:
    cert = make_client_certificate("sp")
    combined = client_certificate_from(secret(certificate=cert.cert_pem + cert.key_pem))
    split = client_certificate_from(secret(certificate=cert.cert_pem, key=cert.key_pem))
    tls = client_certificate_from(secret(**{"tls.crt": cert.cert_pem, "tls.key": cert.key_pem}))
    assert combined.thumbprint_sha1 == split.thumbprint_sha1 == tls.thumbprint_sha1


def test_bad_certificates() -> None:
    cert = make_client_certificate("sp")
    with pytest.raises(CredentialError):
        client_certificate_from(secret(certificate=b"garbage"))
    with pytest.raises(CredentialError):
        client_certificate_from(secret(certificate=cert.cert_pem))  # no key anywhere
    with pytest.raises(CredentialError):
        client_certificate_from(secret(certificate=cert.pkcs12("right"), password=b"wrong"))


def identity(endpoint: str = "", tenant: str = "contoso.onmicrosoft.com") -> AzureIdentity:
    return AzureIdentity.parse(
        m.azure_identity(name="i", type=1, client_id="c", tenant_id=tenant, ad_endpoint=endpoint)
    )


def test_authority() -> None:
    s = Settings(node_name="n", allowed_authority_hosts=frozenset({"127.0.0.1:8443"}))
    a = authority_for(identity(), s)
    assert a.url == "https://login.microsoftonline.com/contoso.onmicrosoft.com" and a.known_cloud
    a = authority_for(identity("https://login.chinacloudapi.cn/"), s)
    assert a.known_cloud
    a = authority_for(identity("https://127.0.0.1:8443/"), s)
    assert a.url.startswith("https://127.0.0.1:8443/") and not a.known_cloud
    for bad in (
        "https://evil.example.com/",
        "http://login.microsoftonline.com/",
        "https://login.microsoftonline.com:8443/",
    ):
        with pytest.raises(CredentialError):
            authority_for(identity(bad), s)
    for tenant in ("", "../common", "a/b"):
        with pytest.raises(CredentialError):
            authority_for(identity(tenant=tenant), s)
