"""Reading the request target: which route. Pure functions.

Clients differ (docs/imds-contract.md §2): msal-node appends a trailing slash
and, with a trailing slash in its env var, sends ``//metadata/...``; azure-core
sends the query unencoded, others percent-encode it.  The target is therefore
split on ``?`` by hand (generic URL parsers read ``//x`` as an authority), the
path is percent-decoded once, repeated slashes collapse, a trailing slash goes,
and the comparison ignores case.

Only an allow-list of the node IMDS's metadata APIs is proxied
(:data:`PROXIED_PREFIXES`), and only paths made of plain characters: after the
one decoding nmi does, a path that still holds ``%``, ``;``, spaces, dot
segments, backslashes or control characters could mean something else to the
node IMDS than to nmi (``/metadata/instance/%252e%252e/identity/...``), so it
is refused (404), never forwarded.  What is forwarded is exactly the path nmi
checked.
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
# The node IMDS APIs pods may reach through nmi (lower case, compared after normalising).
PROXIED_PREFIXES = (
    INSTANCE_PREFIX,
    "/metadata/scheduledevents",
    "/metadata/versions",
    "/metadata/attested",
    "/metadata/loadbalancer",
)
_PLAIN_PATH = re.compile(r"^[A-Za-z0-9/_.\-]*$")

_SLASHES = re.compile(r"/{2,}")


class Route(enum.Enum):
    TOKEN = "token"
    HOST_TOKEN = "host_token"
    IDENTITY_OTHER = "identity_other"  # any other /metadata/identity path: never proxied
    INSTANCE = "instance"
    PROXY = "proxy"  # an allow-listed metadata API of the node IMDS
    INVALID = "invalid"  # anything else: 404, never proxied


@dataclass(frozen=True, slots=True)
class Target:
    route: Route
    path: str  # normalised, lower case
    proxy_target: str  # what to send to the node IMDS (the checked path + raw query)
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
        return Target(Route.TOKEN, path, "", query)
    if path == IDENTITY_PREFIX or path.startswith(IDENTITY_PREFIX + "/"):
        return Target(Route.IDENTITY_OTHER, path, "", query)
    if path == HOST_TOKEN_PATH:
        return Target(Route.HOST_TOKEN, path, "", query)
    allowed = next((p for p in PROXIED_PREFIXES if path == p or path.startswith(p + "/")), None)
    if allowed is None or not _PLAIN_PATH.match(decoded):
        route = Route.IDENTITY_OTHER if "identity" in path else Route.INVALID
        return Target(route, path, "", query)
    route = Route.INSTANCE if allowed == INSTANCE_PREFIX else Route.PROXY
    checked = _SLASHES.sub("/", decoded)  # the node IMDS's names are case-sensitive
    return Target(route, path, checked + (f"?{query}" if query else ""), query)
