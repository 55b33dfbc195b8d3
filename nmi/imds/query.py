"""The token request's query: parsed and validated once, remembered within a byte bound.

Why its own module: the query decides the reply of nearly every request (the
resource, at most one identity selector, the api-version), both the
synchronous cache-hit path and the full path read it, and its parse cache is
keyed on bytes a pod chooses.  Pods repeat the same few queries, so valid ones
are remembered — but only queries of at most :data:`MAX_CACHED_QUERY` bytes,
and at most :data:`MAX_CACHED` of them, so that the cache can never hold more
than about 2 MiB whatever pods send (a longer query is parsed every time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from ..identity.decide import IdentitySelector

_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
MAX_RESOURCE = 2048
MAX_CACHED_QUERY = 512  # bytes: real SDK queries are 100-300
MAX_CACHED = 4096


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


_cache: dict[tuple[str, bool], TokenQuery] = {}


def parse_token_query(query: str, *, require_api_version: bool = True) -> TokenQuery:
    """Parse and validate the token request's query (after the Metadata check).

    Valid short queries are remembered (an invalid one raises, and is not); the
    result is immutable.
    """
    key = (query, require_api_version)
    found = _cache.get(key)
    if found is not None:
        return found
    parsed = _parse(query, require_api_version=require_api_version)
    if len(query) <= MAX_CACHED_QUERY:
        if len(_cache) >= MAX_CACHED:
            _cache.clear()  # a pod cycling through variants costs re-parsing, not memory
        _cache[key] = parsed
    return parsed


def _parse(query: str, *, require_api_version: bool) -> TokenQuery:
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
