"""The connection to the API server, built the way kubectl would build it.

``--kubeconfig``, else ``$KUBECONFIG``, else the in-cluster service account
(whose projected token kubernetes-asyncio re-reads as it rotates).  The
informers and the Secret reader use it for raw GETs so that one code path
serves every resource; Events, the node's start-up taint and the controller's
writes use the raw POST, PUT, PATCH and DELETE beside it.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

from .lean_import import load

k8s_client, k8s_config = load()


class KubeApi:
    """A thin raw-HTTP face over kubernetes-asyncio's ApiClient."""

    def __init__(self, api_client: Any) -> None:
        self._api = api_client

    @classmethod
    async def connect(cls, kubeconfig: str | None) -> KubeApi:
        configuration = k8s_client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG")
        if path:
            await k8s_config.load_kube_config(
                config_file=path, client_configuration=configuration, persist_config=False
            )
        else:
            k8s_config.load_incluster_config(client_configuration=configuration)
        return cls(k8s_client.ApiClient(configuration=configuration))

    @property
    def host(self) -> str:
        return str(self._api.configuration.host)

    async def _call(
        self,
        method: str,
        path: str,
        timeout: aiohttp.ClientTimeout,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: list[tuple[str, str]] | None = None,
    ) -> aiohttp.ClientResponse:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        response: aiohttp.ClientResponse = await self._api.call_api(
            path,
            method,
            query_params=params or [],
            body=body,
            header_params=headers,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        return response

    async def get(
        self, path: str, params: list[tuple[str, str]], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        return await self._call("GET", path, timeout, params=params)

    async def post(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        return await self._call("POST", path, timeout, body=body)

    async def patch(
        self,
        path: str,
        body: Any,
        *,
        content_type: str = "application/json-patch+json",
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        return await self._call("PATCH", path, timeout, body=body, content_type=content_type)

    async def put(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        return await self._call("PUT", path, timeout, body=body)

    async def delete(self, path: str, *, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        return await self._call("DELETE", path, timeout)

    async def close(self) -> None:
        await self._api.close()
