"""``/host/token``: tokens for processes of the node itself, on behalf of a named pod.

aad-pod-identity served this for host-network drivers (Key Vault FlexVolume,
CSI drivers) that mount secrets into a pod and must act as that pod.  The
caller names the pod in the ``podns``/``podname`` headers, so only the node
itself may ask: the listener's loopback address, never a pod (pods reach nmi
through the DNAT to the node address, never from 127.0.0.1).  The pod must be
running on this node, and gets exactly what its own token request would get.
Reply: ``{"token": {<the IMDS token body>}, "clientid": "<client id>"}``.
"""

from __future__ import annotations

import json

from ..kube.index import ClusterIndex
from . import replies
from .bookkeeping import Access
from .failures import query_error
from .messages import Reply, Request
from .query import QueryError, parse_token_query
from .token_route import TokenRoute

LOOPBACK = frozenset({"127.0.0.1", "::1"})


class HostTokenRoute:
    def __init__(self, *, index: ClusterIndex, tokens: TokenRoute) -> None:
        self.index = index
        self.tokens = tokens

    async def serve(self, request: Request, raw_query: str, access: Access) -> Reply:
        if request.method != "GET":
            return replies.method_not_allowed()
        namespace = request.header("podns")
        name = request.header("podname")
        if not namespace or not name:
            return replies.bad_request("missing 'podname' and 'podns' from request header")
        if access.ip not in LOOPBACK:
            return replies.forbidden("/host/token is only served to the node itself")
        try:
            query = parse_token_query(raw_query, require_api_version=False)
        except QueryError as exc:
            return query_error(exc)
        access.resource = query.resource
        access.namespace, access.pod = namespace, name
        pod = self.index.pod(namespace, name)
        if pod is None or not pod.can_call:
            return replies.not_found(f"pod {namespace}/{name} is not running on this node")
        served = await self.tokens.obtain(pod, query, access)
        if isinstance(served, Reply):
            return served
        body = self.tokens.render(served, query.resource)
        clientid = json.dumps(served.client_id).encode()
        return replies.json_bytes(200, b'{"token":' + body + b',"clientid":' + clientid + b"}")
