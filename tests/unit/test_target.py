"""Request-target classification and token-query validation."""

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nmi.imds.query import QueryError, parse_token_query
from nmi.imds.target import Route, classify


@pytest.mark.parametrize(
    "raw",
    [
        "/metadata/identity/oauth2/token",
        "/metadata/identity/oauth2/token/",
        "//metadata/identity/oauth2/token/",
        "/Metadata/Identity/OAuth2/Token",
        "/metadata//identity/oauth2//token?x=1",
        "/metadata/%69dentity/oauth2/token",
    ],
)
def test_token_path_variants(raw: str) -> None:
    assert classify(raw).route is Route.TOKEN


@pytest.mark.parametrize(
    "raw",
    [
        "/metadata/identity/getplatformmetadata",
        "/metadata/identity/issuecredential",
        "/metadata/identity",
        "/metadata/identity\\oauth2\\token",
        "/metadata/instance/../identity/oauth2/token",
        "/metadata/identity/oauth2/token/../../identity/x",
    ],
)
def test_identity_paths_are_never_proxied(raw: str) -> None:
    assert classify(raw).route is Route.IDENTITY_OTHER


def test_other_routes() -> None:
    assert classify("/host/token/?resource=x").route is Route.HOST_TOKEN
    assert classify("/metadata/instance?api-version=2021-02-01").route is Route.INSTANCE
    t = classify("//metadata/scheduledevents?api-version=2020-07-01")
    assert t.route is Route.PROXY
    assert t.proxy_target == "/metadata/scheduledevents?api-version=2020-07-01"
    assert classify("/a/../b").route is Route.INVALID
    assert classify("/%ff%fe").route is Route.INVALID


def test_absolute_form_loses_its_authority_and_other_forms_are_invalid() -> None:
    t = classify("http://169.254.169.254/metadata/identity/oauth2/token?resource=x")
    assert t.route is Route.TOKEN and t.query == "resource=x"
    assert classify("HTTP://evil.example/metadata/identity/issuecredential").route is (
        Route.IDENTITY_OTHER
    )
    t = classify("http://169.254.169.254/metadata/versions?api-version=1")
    assert t.route is Route.PROXY and t.proxy_target == "/metadata/versions?api-version=1"
    for raw in ("*", "169.254.169.254:80", "ftp://x/metadata/instance", "metadata/instance"):
        assert classify(raw).route is Route.INVALID, raw


def test_proxy_targets_are_always_origin_form() -> None:
    for raw in (
        "/metadata/versions",
        "//metadata//attested//document",
        "http://h//metadata/loadbalancer",
        "https://h/metadata/scheduledevents?q",
    ):
        target = classify(raw)
        assert target.route is Route.PROXY and target.proxy_target.startswith("/"), raw


@pytest.mark.parametrize(
    "raw",
    [
        # Each was forwarded to the node IMDS with the pod's Metadata header (issue 10).
        "/metadata/identity%20/oauth2/token?resource=x",
        "/metadata/identity;x/oauth2/token?resource=x",
        "/metadata%252fidentity/oauth2/token?resource=x",
        "/metadata/instance/%252e%252e/identity/oauth2/token?resource=x",
        "/metadata/instance/%2e%2e/identity/oauth2/token",
        "/metadata/instance%00/compute",
        "/metadata/instance/compute;v=1",
        "/metadata/something-new",
        "/metadata",
        "/",
        "/x",
        "/metadata/instancex",
    ],
)
def test_only_plain_allow_listed_metadata_paths_are_proxied(raw: str) -> None:
    target = classify(raw)
    assert target.route in (Route.INVALID, Route.IDENTITY_OTHER), raw
    assert target.proxy_target == ""


def test_the_proxied_path_is_the_checked_one_and_keeps_its_case() -> None:
    t = classify("/metadata/instance/compute/%61zEnvironment?api-version=2021-02-01&format=text")
    assert t.route is Route.INSTANCE
    assert t.proxy_target == (
        "/metadata/instance/compute/azEnvironment?api-version=2021-02-01&format=text"
    )


def test_query_ok_unencoded_and_encoded() -> None:
    q = parse_token_query("api-version=2018-02-01&resource=https://management.azure.com")
    assert q.resource == "https://management.azure.com"
    assert q.selector.empty
    q = parse_token_query(
        "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&msi_res_id=%2Fsubscriptions%2Fs"
    )
    assert q.resource == "https://vault.azure.net"
    assert q.selector.resource_id == "/subscriptions/s"


def test_trailing_slash_resource_is_echoed_as_given() -> None:
    q = parse_token_query("api-version=2018-02-01&resource=https://management.azure.com/")
    assert q.resource == "https://management.azure.com/"


def test_mi_res_id_is_an_alias() -> None:
    q = parse_token_query("api-version=2018-02-01&resource=r&mi_res_id=/s/x")
    assert q.selector.resource_id == "/s/x"


@pytest.mark.parametrize(
    ("query", "kind"),
    [
        ("resource=r", "api_version_missing"),
        ("api-version=&resource=r", "api_version_missing"),
        ("api-version=yesterday&resource=r", "api_version_invalid"),
        ("api-version=2018-02-01", "invalid"),
        ("api-version=2018-02-01&resource=", "invalid"),
        ("api-version=2018-02-01&resource=a&resource=b", "invalid"),
        ("api-version=2018-02-01&resource=r&client_id=a&msi_res_id=b", "invalid"),
        ("api-version=2018-02-01&resource=r&client_id=a&object_id=b", "invalid"),
        ("api-version=2018-02-01&resource=r&client_id=a&client_id=b", "invalid"),
        ("api-version=2018-02-01&resource=r%0a", "invalid"),
    ],
)
def test_query_errors(query: str, kind: str) -> None:
    with pytest.raises(QueryError) as info:
        parse_token_query(query)
    assert info.value.kind == kind


@given(st.text(max_size=200))
def test_classify_never_raises(raw: str) -> None:
    classify("/" + raw)


@given(st.text(max_size=300))
def test_parse_query_raises_only_query_error(query: str) -> None:
    with contextlib.suppress(QueryError):
        parse_token_query(query)


def test_the_parse_cache_is_bounded_in_bytes() -> None:
    """Queries a pod chooses cannot grow the parse cache: long ones are never kept, and
    the number kept is capped (issue 10: 30 KiB queries grew nmi by 118 MB)."""
    from nmi.imds import query as q

    q._cache.clear()
    padded = "api-version=2018-02-01&resource=r&x=" + "a" * 30_000
    for i in range(50):
        parse_token_query(padded + str(i))
    assert not q._cache
    for i in range(q.MAX_CACHED + 100):
        parse_token_query(f"api-version=2018-02-01&resource=r{i}")
    assert len(q._cache) <= q.MAX_CACHED
    assert sum(len(k[0]) for k in q._cache) <= q.MAX_CACHED * q.MAX_CACHED_QUERY
