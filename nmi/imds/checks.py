"""The checks every token request passes before anyone looks at who is calling.

Why its own module: the synchronous cache-hit path and the full path must
refuse exactly the same requests with exactly the same replies; with one
definition they cannot disagree.  The order is the IMDS contract's
(docs/imds-contract.md): method, then the ``Metadata: true`` header — before
any lookup, so an SDK's availability probe is answered at once — then the
query (api-version, resource, at most one identity selector).
"""

from __future__ import annotations

from ..config import Settings
from . import replies
from .failures import query_error
from .messages import Reply, Request
from .query import QueryError, TokenQuery, parse_token_query


def token_request(request: Request, raw_query: str, settings: Settings) -> TokenQuery | Reply:
    """The request's query when it may be served, else the reply that refuses it."""
    if request.method != "GET":
        return replies.method_not_allowed()
    if settings.metadata_header_required and request.header("metadata").strip().lower() != "true":
        return replies.metadata_required()
    try:
        return parse_token_query(raw_query)
    except QueryError as exc:
        return query_error(exc)
