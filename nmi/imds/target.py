"""Reading the request target: which route, which parameters. Pure functions.

Clients differ (``CONTRACT.md`` §2): msal-node appends a trailing slash and,
with a trailing slash in its env var, sends ``//metadata/...``; azure-core
sends the query unencoded, others percent-encode it.  The target is therefore
split on ``?`` by hand (generic URL parsers read ``//x`` as an authority),
the path is percent-decoded once, repeated slashes collapse, a trailing slash
goes, and the comparison ignores case.  Anything with dot segments or
backslashes is never proxied: the node IMDS might resolve it to a path nmi did
not check.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from ..identity.decide import IdentitySelector

TOKEN_PATH = "/metadata/identity/oauth2/token"
IDENTITY_PREFIX = "/metadata/identity"
HOST_TOKEN_PATH = "/host/token"
INSTANCE_PREFIX = "/metadata/instance"

_SLASHES = re.compile(r"/{2,}")
_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
MAX_RESOURCE = 2048


class Route(enum.Enum):
    TOKEN = "token"
    HOST_TOKEN = "host_token"
    IDENTITY_OTHER = "identity_other"  # any other /metadata/identity path: never proxied
    INSTANCE = "instance"
    PROXY = "proxy"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Target:
    route: Route
    path: str  # normalised, lower case
    proxy_target: str  # what to send to the node IMDS (collapsed raw path + raw query)
    query: str  # raw query string


_TOKEN_PREFIX = TOKEN_PATH + "?"


def _origin_form(raw_target: str) -> str | None:
    """The target as ``/path?query``: absolute-form (``http://host/path``, which
    servers must accept, RFC 9112 3.2.2) loses its authority — nmi *is* the
    metadata endpoint, whatever host was named; anything else not starting
    with ``/`` (``*``, authority-form) is None."""
    if raw_target.startswith("/"):
        return raw_target
    scheme, sep, rest = raw_target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    remainder = rest[cut:]
    return remainder if remainder.startswith("/") else "/" + remainder


def classify(raw_target: str) -> Target:
    if raw_target.startswith(_TOKEN_PREFIX):  # what nearly every request is
        return Target(Route.TOKEN, TOKEN_PATH, "", raw_target[len(_TOKEN_PREFIX) :])
    origin = _origin_form(raw_target)
    if origin is None:
        return Target(Route.INVALID, "", "", "")
    raw_target = origin
    raw_path, _, query = raw_target.partition("?")
    try:
        decoded = unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
    except UnicodeDecodeError:
        return Target(Route.INVALID, "", "", query)
    lowered = decoded.lower()
    if "\\" in lowered or "\x00" in lowered:
        route = Route.IDENTITY_OTHER if "identity" in lowered else Route.INVALID
        return Target(route, lowered, "", query)
    path = _SLASHES.sub("/", lowered)
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    segments = path.split("/")
    if "." in segments or ".." in segments:
        route = Route.IDENTITY_OTHER if "identity" in path else Route.INVALID
        return Target(route, path, "", query)
    if path == TOKEN_PATH:
        route = Route.TOKEN
    elif path == IDENTITY_PREFIX or path.startswith(IDENTITY_PREFIX + "/"):
        route = Route.IDENTITY_OTHER
    elif path == HOST_TOKEN_PATH:
        route = Route.HOST_TOKEN
    elif path == INSTANCE_PREFIX or path.startswith(INSTANCE_PREFIX + "/"):
        route = Route.INSTANCE
    else:
        route = Route.PROXY
    proxy_target = _SLASHES.sub("/", raw_path) + (f"?{query}" if query else "")
    return Target(route, path, proxy_target, query)


class QueryError(ValueError):
    """The query cannot be served; ``kind`` picks the reply."""

    def __init__(self, kind: str, description: str) -> None:
        super().__init__(description)
        self.kind = kind
        self.description = description


@dataclass(frozen=True, slots=True)
class TokenQuery:
    resource: str
    selector: IdentitySelector


_SELECTOR_KEYS = ("client_id", "object_id", "msi_res_id", "mi_res_id")


@functools.lru_cache(maxsize=4096)
def parse_token_query(query: str, *, require_api_version: bool = True) -> TokenQuery:
    """Parse and validate the token request's query (after the Metadata check).

    Pods repeat the same few queries: valid ones are remembered (an invalid one
    raises, and is not).  The result is immutable.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise QueryError("invalid", "The query string is not valid") from None
    values: dict[str, list[str]] = {}
    for key, value in pairs:
        values.setdefault(key, []).append(value)

    versions = values.get("api-version", [])
    if require_api_version:
        if not versions or not versions[0]:
            raise QueryError("api_version_missing", "api-version was not specified")
        if len(set(versions)) > 1 or not _API_VERSION.match(versions[0]):
            raise QueryError("api_version_invalid", "api-version is invalid")

    resources = values.get("resource", [])
    if not resources or not resources[0].strip():
        raise QueryError("invalid", "Required query variable 'resource' is missing")
    if len(set(resources)) > 1:
        raise QueryError("invalid", "Query variable 'resource' was given more than once")
    resource = resources[0]
    if len(resource) > MAX_RESOURCE or any(ord(c) < 0x20 or c == "\x7f" for c in resource):
        raise QueryError("invalid", "Query variable 'resource' is not valid")

    given: dict[str, str] = {}
    for key in _SELECTOR_KEYS:
        found = [v for v in values.get(key, []) if v]
        if len(set(found)) > 1:
            raise QueryError("invalid", f"Query variable '{key}' was given more than once")
        if found:
            canonical = "msi_res_id" if key == "mi_res_id" else key
            if canonical in given and given[canonical] != found[0]:
                raise QueryError("invalid", "msi_res_id and mi_res_id disagree")
            given[canonical] = found[0]
    if len(given) > 1:
        raise QueryError(
            "invalid",
            "Only one of client_id, object_id and msi_res_id may be specified",
        )
    for value in given.values():
        if len(value) > 1024 or any(ord(c) < 0x20 for c in value):
            raise QueryError("invalid", "An identity selector is not valid")
    selector = IdentitySelector(
        client_id=given.get("client_id", ""),
        object_id=given.get("object_id", ""),
        resource_id=given.get("msi_res_id", ""),
    )
    return TokenQuery(resource=resource, selector=selector)
