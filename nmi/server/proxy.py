"""Pass-through of the metadata paths nmi does not answer itself.

Pods keep working instance metadata, scheduled events and the like: the
request goes to the node IMDS as sent, with hop-by-hop headers removed, no
``X-Forwarded-For`` added (the real IMDS rejects requests carrying it), a
bounded body both ways and timeouts.  ``/metadata/identity/*`` is never
proxied: only the token path is served there, by nmi.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from . import replies

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
MAX_BODY = 1 << 20


def _strip(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    listed = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    return [
        (k, v)
        for k, v in headers.items()
        if k.lower() not in HOP_BY_HOP and k.lower() not in listed
    ]


class MetadataProxy:
    def __init__(self, *, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 5.0))
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=self.timeout,
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(self, request: web.BaseRequest, target: str) -> web.StreamResponse:
        assert self._session is not None, "proxy not started"
        body = await request.content.read(MAX_BODY + 1) if request.can_read_body else b""
        if len(body) > MAX_BODY:
            return replies.error(413, "invalid_request", "Request body too large")
        try:
            async with self._session.request(
                request.method,
                self.endpoint + target,
                headers=_strip(request.headers),
                data=body or None,
                allow_redirects=False,
            ) as upstream:
                payload = await upstream.content.read(MAX_BODY + 1)
                if len(payload) > MAX_BODY:
                    return replies.error(502, "bad_gateway", "Upstream response too large")
                response = web.Response(status=upstream.status, body=payload)
                for key, value in _strip(upstream.headers):
                    response.headers.add(key, value)
                return response
        except TimeoutError:
            return replies.error(504, "gateway_timeout", "The node metadata service timed out")
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("metadata proxy: %s", type(exc).__name__)
            return replies.error(502, "bad_gateway", "The node metadata service did not answer")
        except asyncio.CancelledError:
            raise
