"""IMDS-shaped replies: every answer is JSON, with the status real clients expect.

The table these builders implement (docs/imds-contract.md §1):

======  ==========================  =====================================================
status  error                       when
======  ==========================  =====================================================
400     invalid_request             no ``Metadata: true`` header (answered before any lookup)
400     (api-version shape)         ``api-version`` missing or malformed
400     invalid_request             ``resource`` missing, malformed or repeated;
                                    several identity selectors; bad ``/host/token`` headers
400     invalid_request             "Identity not found": nothing this pod may use matches
400     invalid_request             "Multiple user assigned identities exist ...": no selector
400     <AAD's error>               Azure AD / IMDS rejected the request (design-time error)
403     forbidden                   ``/metadata/instance`` with --block-instance-metadata;
                                    ``/host/token`` from a non-loopback address
404     not_found                   not an IMDS path nmi serves (also ``/metadata/identity/*``
                                    other than the token path); caller or assignment not
                                    (yet) known, without --set-retry-after-header
405     method_not_allowed          not GET on the token paths
429     too_many_requests           upstream throttled (always with Retry-After)
500     server_error                unexpected failure inside nmi
502     bad_gateway                 proxied metadata path: node IMDS unreachable
503     server_error                transient upstream failure, or (with
                                    --set-retry-after-header) assignment not yet ready;
                                    always with Retry-After
504     gateway_timeout             proxied metadata path: node IMDS timed out
======  ==========================  =====================================================

``Retry-After`` appears only on 429 and 503: azure-core retries *any* status
that carries it.  Bodies never contain the word "unreachable" (clients treat a
403 containing it as "no IMDS here").
"""

from __future__ import annotations

import json
from typing import Any

from .messages import Reply, encode

IDENTITY_NOT_FOUND = "Identity not found"
MULTIPLE_IDENTITIES = (
    "Multiple user assigned identities exist, please specify the clientId / resourceId "
    "of the identity in the token request"
)
METADATA_REQUIRED = "Required metadata header not specified"
API_VERSION_MISSING = (
    "Bad request. api-version was not specified in the request. "
    "For more information refer to aka.ms/azureimds"
)
API_VERSION_INVALID = (
    "Bad request. api-version is invalid or was not specified in the request. "
    "For more information refer to aka.ms/azureimds"
)
NEWEST_VERSIONS = ["2018-02-01"]


def json_reply(status: int, body: Any, *, retry_after: int | None = None) -> Reply:
    headers = []
    if retry_after is not None and status in (429, 503):
        headers.append(("Retry-After", str(max(1, int(retry_after)))))
    return Reply(status, json.dumps(body, separators=(",", ":")).encode(), headers=headers)


def error(status: int, code: str, description: str, *, retry_after: int | None = None) -> Reply:
    if status in (429, 503) and retry_after is None:
        retry_after = 5 if status == 503 else 1
    return json_reply(
        status, {"error": code, "error_description": description}, retry_after=retry_after
    )


def bad_request(description: str) -> Reply:
    return error(400, "invalid_request", description)


def metadata_required() -> Reply:
    return bad_request(METADATA_REQUIRED)


def api_version_missing(*, invalid: bool = False) -> Reply:
    return json_reply(
        400,
        {
            "error": API_VERSION_INVALID if invalid else API_VERSION_MISSING,
            "newest-versions": NEWEST_VERSIONS,
        },
    )


def identity_not_found() -> Reply:
    return bad_request(IDENTITY_NOT_FOUND)


def multiple_identities() -> Reply:
    return bad_request(MULTIPLE_IDENTITIES)


def not_found(
    description: str = "The requested path is not served by this endpoint",
) -> Reply:
    return error(404, "not_found", description)


def not_ready(description: str, *, retry_after_header: bool) -> Reply:
    """A transient state on nmi's side (assignment or pod not yet visible)."""
    if retry_after_header:
        return error(503, "server_error", description, retry_after=20)
    return error(404, "not_found", description)


def method_not_allowed() -> Reply:
    response = error(405, "method_not_allowed", "Only GET is allowed on this path")
    response.headers.append(("Allow", "GET"))
    return response


def forbidden(description: str) -> Reply:
    return error(403, "forbidden", description)


def internal_error() -> Reply:
    return error(500, "server_error", "Internal error in the node managed identity service")


class TokenBodies:
    """Renders success bodies fast: the JSON around the token is encoded once.

    Only ``expires_in``/``expires_on``/``ext_expires_in`` change between two
    answers with the same token, so each (token, client id, resource) keeps
    its pre-encoded pieces; rendering is then a few concatenations.  Bounded in
    entries and bytes (both maps are dropped together when either is reached:
    they only hold what the token cache can render again).
    """

    def __init__(self, max_entries: int = 4096, max_bytes: int = 16 << 20) -> None:
        self._parts: dict[tuple[str, str, str], tuple[bytes, bytes, bytes, bytes]] = {}
        self._whole: dict[tuple[str, str, str], tuple[int, bytes]] = {}
        self._max = max_entries
        self._max_bytes = max_bytes
        self.bytes = 0

    def _room(self, size: int) -> None:
        if (
            len(self._parts) >= self._max
            or len(self._whole) >= self._max
            or self.bytes + size > self._max_bytes
        ):
            self._parts.clear()
            self._whole.clear()
            self.bytes = 0
        self.bytes += size

    def response(
        self,
        *,
        access_token: str,
        client_id: str,
        expires_on: int,
        not_before: int,
        now: int,
        resource: str,
        token_type: str,
    ) -> bytes:
        """The whole 200 reply (head and body) on a kept-alive connection.

        Rendered at most once a second per (token, client id, resource): within
        the same second it is byte for byte the same reply (``Date`` and
        ``expires_in`` have a resolution of one second).
        """
        key = (access_token, client_id, resource)
        whole = self._whole.get(key)
        if whole is not None and whole[0] == now:
            return whole[1]
        body = self.render(
            access_token=access_token,
            client_id=client_id,
            expires_on=expires_on,
            not_before=not_before,
            now=now,
            resource=resource,
            token_type=token_type,
        )
        data = encode(Reply(200, body), close=False)
        if key not in self._whole:
            self._room(len(data) + 200)
        self._whole[key] = (now, data)
        return data

    def render(
        self,
        *,
        access_token: str,
        client_id: str,
        expires_on: int,
        not_before: int,
        now: int,
        resource: str,
        token_type: str,
    ) -> bytes:
        key = (access_token, client_id, resource)
        parts = self._parts.get(key)
        if parts is None:
            self._room(len(access_token) + len(resource) + 400)
            parts = (
                b'{"access_token":'
                + _j(access_token)
                + b',"client_id":'
                + _j(client_id)
                + b',"expires_in":"',
                b'","expires_on":"' + str(expires_on).encode() + b'","ext_expires_in":"',
                b'","not_before":"' + str(not_before).encode() + b'","resource":' + _j(resource),
                b',"token_type":' + _j(token_type) + b"}",
            )
            self._parts[key] = parts
        remaining = str(max(expires_on - now, 0)).encode()
        return parts[0] + remaining + parts[1] + remaining + parts[2] + parts[3]


def _j(value: str) -> bytes:
    return json.dumps(value).encode()


def json_bytes(status: int, body: bytes) -> Reply:
    return Reply(status, body)
