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

    async def get(
        self, path: str, params: list[tuple[str, str]], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        response: aiohttp.ClientResponse = await self._api.call_api(
            path,
            "GET",
            query_params=params,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        return response

    async def post(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        response: aiohttp.ClientResponse = await self._api.call_api(
            path,
            "POST",
            body=body,
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        return response

    async def patch(
        self,
        path: str,
        body: Any,
        *,
        content_type: str = "application/json-patch+json",
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        response: aiohttp.ClientResponse = await self._api.call_api(
            path,
            "PATCH",
            body=body,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        return response

    async def put(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        response: aiohttp.ClientResponse = await self._api.call_api(
            path,
            "PUT",
            body=body,
            header_params={"Accept": "application/json", "Content-Type": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        return response

    async def delete(self, path: str, *, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        response: aiohttp.ClientResponse = await self._api.call_api(
            path,
            "DELETE",
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        return response

    async def close(self) -> None:
        await self._api.close()
