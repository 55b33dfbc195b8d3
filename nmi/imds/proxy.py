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
from collections.abc import Iterable

import aiohttp

from . import replies
from .messages import Reply, Request

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
# The listener writes its own; the node IMDS's would be duplicates.
OWN_HEADERS = frozenset({"date", "server"})
MAX_BODY = 1 << 20


def _strip(
    headers: Iterable[tuple[str, str]], also: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    pairs = list(headers)
    listed = {
        token.strip().lower()
        for key, value in pairs
        if key.lower() == "connection"
        for token in value.split(",")
    }
    return [
        (k, v)
        for k, v in pairs
        if k.lower() not in HOP_BY_HOP and k.lower() not in listed and k.lower() not in also
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

    async def forward(self, request: Request, target: str) -> Reply:
        assert self._session is not None, "proxy not started"
        if not target.startswith("/"):  # the URL below must keep the node IMDS as its host
            return replies.bad_request("The request target is not a path")
        body = request.body  # bounded by the connection (413 above its limit)
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
                payload = await _read_bounded(upstream.content, MAX_BODY)
                if payload is None:
                    return replies.error(502, "bad_gateway", "Upstream response too large")
                return Reply(
                    upstream.status,
                    payload,
                    content_type=None,
                    headers=_strip(upstream.headers.items(), OWN_HEADERS),
                )
        except TimeoutError:
            return replies.error(504, "gateway_timeout", "The node metadata service timed out")
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("metadata proxy: %s", type(exc).__name__)
            return replies.error(502, "bad_gateway", "The node metadata service did not answer")
        except asyncio.CancelledError:
            raise


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit`` (never more is held)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
