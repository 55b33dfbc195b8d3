"""What an upstream failure is (retryable or design-time) and what the pod is told.

Two pure mappings: ``nmi.tokens.upstream`` turns an MSAL error result plus the last
HTTP status (its thread-local ``LAST``) into an ``UpstreamError``; ``nmi.imds.failures``
turns that, and nmi's own refusals, into the IMDS reply, the access-log reason and the
pod's Event.  No network, no MSAL call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from nmi.config import Settings
from nmi.identity.caller import CallerProblem
from nmi.identity.decide import (
    NODE_IDENTITY,
    Deny,
    Grant,
    IdentitySelector,
    UseNodeIdentity,
    Wait,
)
from nmi.imds import failures
from nmi.imds.messages import Reply
from nmi.kube.objects import AzureIdentity
from nmi.ops import events
from nmi.ratelimit import TokenBucket
from nmi.tokens.model import UpstreamError
from nmi.tokens.upstream import LAST, _from_status, _retry_after, classify
from nmi_sandbox import manifests as m

CLIENT_ID = "8d2c1a52-3f0e-4b7a-9c61-0e5d7f4a2b19"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJvaWQiOiIxMjM0NSJ9.c2lnbmF0dXJl"
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
RESOURCE = "https://vault.azure.net"


@pytest.fixture(autouse=True)
def last_response() -> Iterator[None]:
    """Each test starts (and leaves) with no upstream answer recorded."""
    LAST.reset()
    yield
    LAST.reset()


def answered(status: int | None, retry_after: int | None = None) -> None:
    LAST.status = status
    LAST.retry_after = retry_after


def header(reply: Reply, name: str) -> str | None:
    values = [v for k, v in reply.headers if k.lower() == name.lower()]
    assert len(values) <= 1, f"{name} appears {len(values)} times"
    return values[0] if values else None


def body(reply: Reply) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(reply.body)
    return doc


def identity() -> AzureIdentity:
    raw = m.azure_identity(name="sp", namespace="team", type=1, client_id=CLIENT_ID)
    raw["metadata"]["uid"] = "uid-sp"
    return AzureIdentity.parse(raw)


def upstream_error(
    status: int | None,
    error: str,
    *,
    retryable: bool,
    retry_after: int | None = None,
    description: str = "",
    source: str = "aad",
) -> UpstreamError:
    return UpstreamError(
        error=error,
        description=description,
        status=status,
        retryable=retryable,
        retry_after=retry_after,
        source=source,
    )


# -- classify: MSAL's error result + the last HTTP status ---------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, "invalid_request"),  # the status alone makes it transient
        (500, "invalid_request"),
        (503, "unknown_error"),
        (504, "server_error"),
        (400, "temporarily_unavailable"),  # the error code alone makes it transient
        (400, "server_error"),
        (200, "service_unavailable"),
        (400, "too_many_requests"),
        (None, "invalid_request"),  # MSAL replayed a throttled answer, nothing was sent
    ],
)
def test_transient_answers_are_retryable_after_5_s_by_default(
    status: int | None, error: str
) -> None:
    answered(status)
    exc = classify({"error": error, "error_description": "try later"}, source="aad")
    assert exc.retryable is True
    assert exc.retry_after == 5
    assert (exc.status, exc.error, exc.description, exc.source) == (
        status,
        error,
        "try later",
        "aad",
    )


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, "invalid_resource"), (401, "invalid_client"), (400, "unauthorized_client")],
)
def test_design_time_answers_are_not_retryable(status: int, error: str) -> None:
    answered(status)
    exc = classify({"error": error, "error_description": "AADSTS500011: not found"}, source="aad")
    assert exc.retryable is False
    assert exc.retry_after is None
    assert (exc.status, exc.error) == (status, error)


def test_the_upstream_retry_after_is_kept() -> None:
    answered(429, retry_after=17)
    assert classify({"error": "too_many_requests"}, source="imds").retry_after == 17
    answered(503, retry_after=0)
    assert classify({"error": "server_error"}, source="imds").retry_after == 0


def test_a_result_without_error_is_an_unknown_error_and_descriptions_are_bounded() -> None:
    answered(400)
    exc = classify({"error_description": "x" * 5000}, source="imds")
    assert exc.error == "unknown_error"
    assert exc.description == "x" * 1000
    assert exc.source == "imds"


# -- _from_status: an answer MSAL raised on instead of returning --------------------------


@pytest.mark.parametrize(
    ("status", "error", "retryable", "retry_after"),
    [
        (429, "too_many_requests", True, 5),
        (500, "server_error", True, 5),
        (502, "server_error", True, 5),
        (404, "server_error", False, None),
    ],
)
def test_from_status(status: int, error: str, retryable: bool, retry_after: int | None) -> None:
    exc = _from_status(status, source="imds")
    assert (exc.error, exc.retryable, exc.retry_after, exc.status) == (
        error,
        retryable,
        retry_after,
        status,
    )
    assert exc.description == f"imds answered HTTP {status}"


def test_from_status_keeps_the_upstream_retry_after_only_when_retryable() -> None:
    answered(429, retry_after=42)
    assert _from_status(429, source="aad").retry_after == 42
    answered(404, retry_after=42)
    assert _from_status(404, source="aad").retry_after is None


# -- Retry-After parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("0", 0),
        ("7", 7),
        ("2.9", 2),  # fractions cut
        ("-5", 0),  # never negative
        ("3600", 3600),
        ("86400", 3600),  # capped at an hour
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0),  # an HTTP-date in the past: now
        ("Wed, 21 Oct 2099 07:28:00 GMT", 3600),  # far in the future: clamped
        ("soon", None),
        ("nan", None),
    ],
)
def test_retry_after_is_parsed_and_clamped(value: str | None, seconds: int | None) -> None:
    assert _retry_after(value) == seconds


@pytest.mark.parametrize("value", ["inf", "1e999"])
def test_an_infinite_retry_after_is_clamped_not_raised(value: str) -> None:
    assert _retry_after(value) in (None, 3600)


# -- failures.upstream: the IMDS reply, log reason and Event ------------------------------


def test_throttling_is_429_with_the_upstream_retry_after() -> None:
    exc = upstream_error(429, "too_many_requests", retryable=True, retry_after=17)
    failure = failures.upstream(exc, Grant(identity()), RESOURCE)
    assert failure.reply.status == 429
    assert body(failure.reply) == {
        "error": "too_many_requests",
        "error_description": "The token service is throttling requests",
    }
    assert header(failure.reply, "Retry-After") == "17"


def test_throttling_without_retry_after_still_says_when() -> None:
    exc = upstream_error(429, "too_many_requests", retryable=True, retry_after=None)
    failure = failures.upstream(exc, Grant(identity()), RESOURCE)
    assert (failure.reply.status, header(failure.reply, "Retry-After")) == (429, "1")


@pytest.mark.parametrize(
    ("status", "error", "retry_after", "header_value"),
    [
        (500, "server_error", 5, "5"),
        (503, "temporarily_unavailable", 30, "30"),
        (400, "temporarily_unavailable", None, "5"),
        (None, "imds_unreachable", 5, "5"),
        (None, "aad_unreachable", 0, "5"),  # 0 would mean "retry at once, forever"
    ],
)
def test_other_retryable_failures_are_503_with_retry_after(
    status: int | None, error: str, retry_after: int | None, header_value: str
) -> None:
    exc = upstream_error(status, error, retryable=True, retry_after=retry_after)
    failure = failures.upstream(exc, Grant(identity()), RESOURCE)
    assert failure.reply.status == 503
    assert body(failure.reply) == {
        "error": "server_error",
        "error_description": f"The token service failed temporarily ({error})",
    }
    assert header(failure.reply, "Retry-After") == header_value


@pytest.mark.parametrize(
    ("status", "error", "description"),
    [
        (400, "invalid_resource", "AADSTS500011: The resource principal was not found."),
        (401, "invalid_client", "AADSTS7000215: Invalid client secret provided."),
    ],
)
def test_design_time_failures_are_400_with_azure_ads_own_error(
    status: int, error: str, description: str
) -> None:
    # Even a Retry-After the upstream sent must not reach the pod: azure-core would retry.
    exc = upstream_error(status, error, retryable=False, retry_after=30, description=description)
    failure = failures.upstream(exc, Grant(identity()), RESOURCE)
    assert failure.reply.status == 400
    assert body(failure.reply) == {"error": error, "error_description": description}
    assert header(failure.reply, "Retry-After") is None


def test_a_design_time_failure_without_error_code_is_invalid_request() -> None:
    exc = upstream_error(400, "", retryable=False, description="bad")
    reply = failures.upstream(exc, Grant(identity()), RESOURCE).reply
    assert body(reply) == {"error": "invalid_request", "error_description": "bad"}


def test_upstream_failure_reason_event_owner_and_summary() -> None:
    exc = upstream_error(
        401, "invalid_client", retryable=False, description="AADSTS7000215: Invalid secret."
    )
    failure = failures.upstream(exc, Grant(identity()), RESOURCE)
    assert failure.reason == "aad 401 invalid_client"
    assert failure.event == (
        events.TOKEN_REQUEST_FAILED,
        f"Token request for {RESOURCE} with AzureIdentity team/sp failed upstream "
        "(aad 401 invalid_client): AADSTS7000215: Invalid secret.",
    )
    assert failure.owner == "uid-sp"
    assert failure.summary == "aad 401 invalid_client: AADSTS7000215: Invalid secret."


def test_a_node_identity_failure_without_status_is_owned_by_the_node() -> None:
    exc = upstream_error(None, "imds_unreachable", retryable=True, retry_after=5, source="imds")
    failure = failures.upstream(exc, UseNodeIdentity("kube-system/mic"), RESOURCE)
    assert failure.reason == "imds - imds_unreachable"
    assert failure.owner == NODE_IDENTITY
    assert failure.event is not None
    message = failure.event[1]
    assert "with the node's identity failed upstream (imds - imds_unreachable)" in message
    assert failure.summary == "imds - imds_unreachable"


# -- nmi's own refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "status", "retry_after"), [(False, 404, None), (True, 503, "20")])
def test_an_unknown_caller_is_404_or_503_with_set_retry_after_header(
    flag: bool, status: int, retry_after: str | None
) -> None:
    settings = Settings(node_name="n", set_retry_after_header=flag)
    problem = CallerProblem("unknown", "no pod with IP 10.0.0.9 on this node")
    failure = failures.unknown_caller(problem, settings)
    assert failure.reply.status == status
    assert body(failure.reply)["error_description"] == (
        "No pod identity could be determined for this caller (unknown)"
    )
    assert header(failure.reply, "Retry-After") == retry_after
    assert failure.reason == "no pod with IP 10.0.0.9 on this node"
    assert failure.event is None and failure.owner is None


@pytest.mark.parametrize(("flag", "status", "retry_after"), [(False, 404, None), (True, 503, "20")])
def test_an_assignment_still_pending_is_404_or_503(
    flag: bool, status: int, retry_after: str | None
) -> None:
    settings = Settings(node_name="n", set_retry_after_header=flag)
    wait = Wait("assigned", "the pod's identity is not yet Assigned")
    failure = failures.refused(
        wait, resource=RESOURCE, selector=IdentitySelector(client_id=CLIENT_ID), settings=settings
    )
    assert failure.reply.status == status
    assert body(failure.reply)["error_description"] == failures.NOT_ASSIGNED
    assert header(failure.reply, "Retry-After") == retry_after
    assert failure.reason == wait.reason
    assert failure.event is not None and failure.event[0] == events.IDENTITY_NOT_ASSIGNED
    assert "(client_id 8d2c##### REDACTED #####2b19)" in failure.event[1]


def test_no_matching_identity_is_400_identity_not_found() -> None:
    deny = Deny("not_found", "no identity is assigned to this pod")
    failure = failures.refused(
        deny, resource=RESOURCE, selector=IdentitySelector(), settings=Settings(node_name="n")
    )
    assert failure.reply.status == 400
    assert body(failure.reply) == {
        "error": "invalid_request",
        "error_description": "Identity not found",
    }
    assert header(failure.reply, "Retry-After") is None
    assert failure.event == (
        events.IDENTITY_NOT_FOUND,
        f"Token request for {RESOURCE} refused: Identity not found "
        "(no identity is assigned to this pod)",
    )
    assert failure.owner is None


def test_several_identities_without_selector_is_400_multiple_identities() -> None:
    deny = Deny("multiple", "2 identities are assigned to this pod")
    failure = failures.refused(
        deny, resource=RESOURCE, selector=IdentitySelector(), settings=Settings(node_name="n")
    )
    assert failure.reply.status == 400
    assert body(failure.reply)["error_description"].startswith(
        "Multiple user assigned identities exist"
    )
    assert failure.event is not None and failure.event[0] == events.MULTIPLE_IDENTITIES
    assert failure.reason == deny.reason


def test_a_misconfigured_identity_is_400_and_an_identity_misconfigured_event() -> None:
    failure = failures.misconfigured("Secret team/sp has no clientSecret", Grant(identity()), "r")
    assert failure.reply.status == 400
    assert body(failure.reply) == {
        "error": "invalid_request",
        "error_description": "The identity cannot be used: Secret team/sp has no clientSecret",
    }
    assert header(failure.reply, "Retry-After") is None
    assert failure.event == (
        events.IDENTITY_MISCONFIGURED,
        "Token request for r refused: AzureIdentity team/sp cannot be used: "
        "Secret team/sp has no clientSecret",
    )
    assert failure.owner == "uid-sp"
    assert failure.summary == "identity misconfigured: Secret team/sp has no clientSecret"


def test_an_unreadable_credential_is_503_with_retry_after() -> None:
    failure = failures.credential_unavailable("ApiError: 403: forbidden", Grant(identity()), "r")
    assert failure.reply.status == 503
    assert body(failure.reply) == {
        "error": "server_error",
        "error_description": "The identity's credential cannot be read now",
    }
    assert header(failure.reply, "Retry-After") == "5"
    assert failure.reason == "ApiError: 403: forbidden"
    assert failure.event is not None and failure.event[0] == events.TOKEN_REQUEST_FAILED
    assert failure.summary == "credential unavailable: ApiError: 403: forbidden"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_over_budget_is_429_saying_when_the_next_request_is_allowed() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=0.25, burst=1, clock=clock)
    assert bucket.take()
    clock.now += 1  # a quarter token back: 3 s to the next whole one
    failure = failures.over_budget(bucket)
    assert failure.reply.status == 429
    assert body(failure.reply) == {
        "error": "too_many_requests",
        "error_description": "Too many requests from this pod",
    }
    assert header(failure.reply, "Retry-After") == "3"
    assert failure.reason == "per-pod rate limit"
    assert failure.event is None


# -- across every failure -------------------------------------------------------------------


def every_failure() -> list[failures.Failure]:
    settings = [Settings(node_name="n", set_retry_after_header=f) for f in (False, True)]
    selector = IdentitySelector(client_id=CLIENT_ID)
    grant = Grant(identity())
    out = [failures.unknown_caller(CallerProblem("ambiguous", "2 pods"), s) for s in settings]
    for s in settings:
        for decision in (
            Wait("created", "no assignment yet"),
            Deny("not_found", "no binding selects this pod"),
            Deny("multiple", "2 identities are assigned to this pod"),
        ):
            out.append(failures.refused(decision, resource=RESOURCE, selector=selector, settings=s))
    for status, error, retryable in (
        (429, "too_many_requests", True),
        (503, "server_error", True),
        (None, "aad_unreachable", True),
        (400, "invalid_resource", False),
        (401, "invalid_client", False),
    ):
        exc = upstream_error(
            status,
            error,
            retryable=retryable,
            retry_after=9,
            description="AADSTS50000: There was an error issuing a token.",
        )
        out.append(failures.upstream(exc, grant, RESOURCE))
    out.append(failures.misconfigured("unknown identity type 7", grant, RESOURCE))
    out.append(failures.credential_unavailable("timeout", grant, RESOURCE))
    out.append(failures.over_budget(TokenBucket(rate=1, burst=1)))
    return out


def test_retry_after_is_present_exactly_on_429_and_503() -> None:
    seen = set()
    for failure in every_failure():
        status = failure.reply.status
        seen.add(status)
        assert (header(failure.reply, "Retry-After") is not None) == (status in (429, 503)), failure
    assert seen == {400, 404, 429, 503}


def test_no_failure_text_carries_a_client_id_or_a_token() -> None:
    for failure in every_failure():
        texts = [failure.reason, failure.summary, failure.reply.body.decode()]
        if failure.event is not None:
            texts.append(failure.event[1])
        for text in texts:
            assert not GUID.search(text), text
            assert TOKEN not in text and "eyJ" not in text, text


def test_an_azure_ad_description_echoing_the_client_id_is_redacted_in_event_and_summary() -> None:
    description = (
        f"AADSTS700016: Application with identifier '{CLIENT_ID}' was not found in the "
        "directory 'contoso.onmicrosoft.com'."
    )
    exc = upstream_error(400, "unauthorized_client", retryable=False, description=description)
    failure = failures.upstream(exc, Grant(identity()), RESOURCE)
    assert failure.event is not None
    assert CLIENT_ID not in failure.event[1]
    assert CLIENT_ID not in failure.summary
