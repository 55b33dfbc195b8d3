"""``KubeApiServer``: the emulated API server as tests, benchmarks and ``nmi sandbox`` use it.

Why this exists: it ties the pieces together -- a :class:`~.store.Store`, the
:class:`~.registry.Registry` on it, and the :class:`~.handlers.ApiHandler` served
over HTTPS on loopback with a certificate from the sandbox CA -- and gives its users
what a real cluster would not: a kubeconfig for it (``certificate-authority-data``
and a bearer token), direct store access that behaves like the HTTP verbs and emits
the same watch events (:meth:`KubeApiServer.create`, :meth:`~KubeApiServer.patch`...),
fault injection (:meth:`~KubeApiServer.compact`,
:meth:`~KubeApiServer.drop_watches`, :meth:`~KubeApiServer.restart` on the same port
with its state -- and its service-account signing key -- kept), and service-account
tokens minted directly (:meth:`~KubeApiServer.issue_service_account_token`, at any
``now``) with a record of every token issued (:attr:`~KubeApiServer.token_requests`,
:attr:`~KubeApiServer.issued_tokens`).

Everything runs on the event loop that called :meth:`~KubeApiServer.start`; the
synchronous store methods must be called from that loop's thread.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import collections
import copy
import datetime
import errno
import ipaddress
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path

import yaml
from aiohttp import web

from nmi_sandbox.tls import CertificateAuthority

from .errors import resource_not_found
from .handlers import ApiHandler
from .meta import JSON
from .registry import Registry
from .resources import Resource, resource_for_kind
from .selectors import Filter
from .store import Store
from .tokens import DEFAULT_MAX_TOKEN_EXPIRATION, ServiceAccountTokens, openid_configuration

__all__ = ["KubeApiServer"]

logger = logging.getLogger("nmi_sandbox.kube")


def _ephemeral_port_floor() -> int:
    """The lowest port the kernel hands out to outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _namespace_for(res: Resource, namespace: str | None) -> str | None:
    return (namespace or "default") if res.namespaced else None


class KubeApiServer:
    """A Kubernetes API server on loopback (HTTPS, bearer token), see the package docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        ca: CertificateAuthority | None = None,
        bookmark_interval: float = 1.0,
        history_limit: int = 10000,
        service_account_issuer: str | None = None,
        max_token_expiration: int = DEFAULT_MAX_TOKEN_EXPIRATION,
        issued_tokens_limit: int = 10000,
    ) -> None:
        self.host = host
        self.port = port
        self.token: str = token if token is not None else secrets.token_urlsafe(32)
        self.bookmark_interval = bookmark_interval
        self.requests: collections.Counter[str] = collections.Counter()
        # successful token issues by (namespace, serviceaccount, pod name or "")
        self.token_requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        # the claims of the last ``issued_tokens_limit`` tokens issued, oldest first
        self.issued_tokens: builtins.list[JSON] = []
        self.issued_tokens_limit = issued_tokens_limit
        self._service_account_issuer = service_account_issuer

        ips = ["127.0.0.1", "::1"]
        try:
            ipaddress.ip_address(host)
            if host not in ips and host not in ("0.0.0.0", "::"):
                ips.append(host)
            names = ["localhost"]
        except ValueError:
            names = ["localhost", host] if host != "localhost" else ["localhost"]
        self._ca = ca or CertificateAuthority()
        self._cert = self._ca.issue_server(names, ips)
        self._ssl = self._cert.ssl_context()
        self.ca_pem: bytes = self._cert.ca_pem

        self._store = Store(history_limit)
        self._registry = Registry(self._store)
        self._tokens = ServiceAccountTokens(
            self._store,
            lambda: self.issuer,
            max_expiration=max_token_expiration,
            on_issue=self._record_token,
        )
        self._handler = ApiHandler(self, self._store, self._registry, self._tokens)
        self._runner: web.AppRunner | None = None

    @property
    def history_limit(self) -> int:
        """How many events the store keeps for watches to resume from."""
        return self._store.history_limit

    @history_limit.setter
    def history_limit(self, value: int) -> None:
        self._store.history_limit = max(1, value)

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; afterwards :attr:`port` is the real port."""
        if self._runner is not None:
            raise RuntimeError("KubeApiServer already started")
        app = web.Application(client_max_size=3 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handler.handle)
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            sock = await self._bind()
            site = web.SockSite(runner, sock, ssl_context=self._ssl)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = int(sock.getsockname()[1])
        self._runner = runner
        logger.info("kube API emulator listening on %s", self.url)

    def _try_bind(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _bind(self) -> socket.socket:
        if self.port == 0:
            # A port from the kernel's ephemeral range could be taken by some outgoing
            # connection while the server is down in restart(); pick one below it.
            low = _ephemeral_port_floor()
            for _ in range(50):
                if low <= 10000:
                    break
                try:
                    return self._try_bind(secrets.randbelow(low - 10000) + 10000)
                except OSError:
                    continue
            return self._try_bind(0)
        # Same port again (restart): ride out sockets of the previous life still closing.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while True:
            try:
                return self._try_bind(self.port)
            except OSError as e:
                if e.errno != errno.EADDRINUSE or loop.time() >= deadline:
                    raise
                logger.debug("port %d still in use, retrying", self.port)
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Close the listener and every open watch stream (state is kept)."""
        self.drop_watches()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            logger.info("kube API emulator on %s stopped", self.url)

    async def restart(self, *, downtime: float = 0.0) -> None:
        """Stop, stay down for ``downtime`` seconds, and serve again on the same port."""
        await self.stop()
        if downtime > 0:
            await asyncio.sleep(downtime)
        await self.start()

    def kubeconfig_dict(self) -> JSON:
        """A kubeconfig (as a dict) pointing at this server with its CA and token."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [
                {
                    "name": "emulator",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "emulator", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
                }
            ],
            "current-context": "emulator",
        }

    def write_kubeconfig(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`kubeconfig_dict` as YAML to ``path`` (mode 0600) and return it."""
        p = Path(path)
        p.write_text(yaml.safe_dump(self.kubeconfig_dict(), sort_keys=False))
        p.chmod(0o600)
        return p

    # ----------------------------------------------------------------- direct store access

    def create(self, obj: JSON) -> JSON:
        """Create ``obj`` like POST does (``apiVersion`` and ``kind`` select the resource).

        Namespaced objects without ``metadata.namespace`` go to ``default``.  As on
        the real server, a pod's ``status`` is reset to ``Pending`` and a custom
        resource's ``status`` is dropped; set them with ``patch(..., subresource="status")``.
        """
        res = resource_for_kind(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
        meta = obj.get("metadata") or {}
        created = self._registry.create(res, _namespace_for(res, meta.get("namespace")), obj)
        return copy.deepcopy(res.to_view(created))

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> JSON | None:
        """The object, or None."""
        res = resource_for_kind(api_version, kind)
        found = self._store.get(res.storage, _namespace_for(res, namespace), name)
        return copy.deepcopy(res.to_view(found)) if found is not None else None

    def replace(self, obj: JSON) -> JSON:
        """Update ``obj`` like PUT does (a set ``metadata.resourceVersion`` is a precondition)."""
        res = resource_for_kind(str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
        meta = obj.get("metadata") or {}
        ns = _namespace_for(res, meta.get("namespace"))
        updated = self._registry.update(res, ns, str(meta.get("name", "")), obj)
        return copy.deepcopy(res.to_view(updated))

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None,
        patch: JSON,
        *,
        subresource: str | None = None,
    ) -> JSON:
        """Apply a JSON merge patch like PATCH does (``subresource="status"`` for status)."""
        res = resource_for_kind(api_version, kind)
        if subresource not in (None, *(s for s in res.subresources if s == "status")):
            raise resource_not_found()
        ns = _namespace_for(res, namespace)
        result = self._registry.patch(
            res, ns, name, "application/merge-patch+json", patch, subresource
        )
        return copy.deepcopy(res.to_view(result))

    def delete(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> JSON | None:
        """Delete like DELETE does; None if absent.

        Returns the deleted object, or (if finalizers are pending) the object now
        carrying ``deletionTimestamp``.
        """
        res = resource_for_kind(api_version, kind)
        ns = _namespace_for(res, namespace)
        if self._store.get(res.storage, ns, name) is None:
            return None
        obj, _ = self._registry.delete(res, ns, name)
        return copy.deepcopy(res.to_view(obj))

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[JSON]:
        """Matching objects (all namespaces if ``namespace`` is None), each with kind/apiVersion."""
        res = resource_for_kind(api_version, kind)
        flt = Filter.build(res, namespace, label_selector, field_selector)
        page = self._store.list(flt, None, None, None, None)
        return [copy.deepcopy(res.to_view(o)) for o in page.items]

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion."""
        return str(self._store.rv)

    # ----------------------------------------------------------------- service-account tokens

    @property
    def issuer(self) -> str:
        """The service-account issuer (``iss``): the constructor's, else :attr:`url`.

        The default is only meaningful after :meth:`start` (the port is known then).
        """
        return self._service_account_issuer or self.url

    @property
    def max_token_expiration(self) -> int:
        """Longest token lifetime in seconds; longer TokenRequests are shortened to it."""
        return self._tokens.max_expiration

    @max_token_expiration.setter
    def max_token_expiration(self, value: int) -> None:
        self._tokens.max_expiration = value

    @property
    def signing_key_id(self) -> str:
        """The ``kid`` of the service-account signing key (kept across :meth:`restart`)."""
        return self._tokens.key.kid

    def openid_configuration(self) -> JSON:
        """What ``GET /.well-known/openid-configuration`` serves."""
        return openid_configuration(self.issuer)

    def jwks(self) -> JSON:
        """What ``GET /openid/v1/jwks`` serves: the signing key as a JWK Set."""
        return self._tokens.jwks()

    @property
    def token_clock_offset(self) -> float:
        """Seconds the tokens issued over HTTP are dated ahead (negative: behind)."""
        return self._tokens.clock_offset

    @token_clock_offset.setter
    def token_clock_offset(self, value: float) -> None:
        self._tokens.clock_offset = value

    def issue_service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        audiences: Sequence[str],
        expiration_seconds: int = 3600,
        pod: str | None = None,
        now: datetime.datetime | float | None = None,
    ) -> str:
        """Sign a token for service account ``namespace/name`` as a TokenRequest does.

        ``pod`` binds it to that pod (which must exist and run as ``name``); empty
        ``audiences`` mean the server's own (``[issuer]``); ``expiration_seconds``
        is capped at :attr:`max_token_expiration` but, unlike over HTTP, may be under
        10 minutes; ``now`` (a datetime or a Unix time) is when it is issued, so an
        already-expired or a not-yet-valid token can be minted.  Raises
        :class:`~.errors.KubeApiError` as the TokenRequest would (404 for a missing
        service account or pod, 400 for a pod running as another service account).
        """
        return self._tokens.issue(
            namespace,
            name,
            audiences=audiences,
            expiration_seconds=expiration_seconds,
            pod=pod,
            now=now,
        ).token

    def _record_token(self, namespace: str, name: str, pod: str, claims: JSON) -> None:
        self.token_requests[(namespace, name, pod)] += 1
        self.issued_tokens.append(claims)
        excess = len(self.issued_tokens) - max(self.issued_tokens_limit, 0)
        if excess > 0:
            del self.issued_tokens[:excess]

    # ----------------------------------------------------------------- fault injection

    def compact(self) -> None:
        """Forget all event history, like an etcd compaction at the current revision."""
        self._store.compact()

    def drop_watches(self) -> None:
        """End every open watch stream cleanly; clients have to re-watch."""
        self._store.drop_watches()

    def watch_count(self, resource: str) -> int:
        """How many watch streams are open on ``resource`` (a plural, e.g. ``pods``)."""
        return self._store.watch_count(resource)

    async def wait_for_watchers(self, resource: str, count: int = 1, timeout: float = 10) -> None:
        """Resolve once ``count`` watch streams are open on ``resource``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.watch_count(resource) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.watch_count(resource)} watch(es) open on {resource}, "
                    f"wanted {count} within {timeout}s"
                )
            await self._store.wait_change(remaining)
