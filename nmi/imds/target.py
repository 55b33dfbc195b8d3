"""Reading the request target: which route. Pure functions.

Clients differ (docs/imds-contract.md, "Request target"): msal-node appends a trailing slash and,
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
import re
from dataclasses import dataclass
from urllib.parse import unquote

TOKEN_PATH = "/metadata/identity/oauth2/token"
IDENTITY_PREFIX = "/metadata/identity"
HOST_TOKEN_PATH = "/host/token"
INSTANCE_PREFIX = "/metadata/instance"

_SLASHES = re.compile(r"/{2,}")


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
