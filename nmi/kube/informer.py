"""A generic list+watch loop that keeps a local copy of one kind of object.

The same loop serves pods, the four aadpodidentity CRDs and Secrets.  It
follows the API server's contract to the letter:

* the first LIST (paginated) gives a consistent snapshot and a resourceVersion;
* the WATCH resumes from the last resourceVersion seen (events and bookmarks
  both advance it), so a dropped stream or an API-server restart loses nothing;
* a ``410 Gone`` (HTTP status, or an ``ERROR`` event with code 410) means the
  version was compacted: re-LIST at once, and turn the difference between the
  old and new snapshot into synthetic events so that indexes stay right;
* any other failure backs off exponentially with jitter, capped, and retries
  forever: the cached view keeps serving meanwhile.

Objects are parsed once, here, into small frozen views; a malformed object is
logged and skipped rather than stopping the stream.  It uses the
kubernetes-asyncio ``ApiClient`` (auth, TLS, token refresh from the kubeconfig
or the in-cluster service account) and reads the raw JSON lines of the stream
itself: one code path for every resource, no model deserialisation cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

import aiohttp

log = logging.getLogger(__name__)

T = TypeVar("T")

# Event kinds delivered to handlers.
ADDED = "ADDED"
MODIFIED = "MODIFIED"
DELETED = "DELETED"

Handler = Callable[[str, Any, Any], None]


class Gone(Exception):
    """The resourceVersion is too old (HTTP 410): a fresh LIST is needed."""


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class RawApi(Protocol):
    """What the informer needs from an API client: one raw GET."""

    async def get(
        self, path: str, params: list[tuple[str, str]], *, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse: ...


class Informer(Generic[T]):
    """Keeps ``store`` (key ``namespace/name``) equal to the server's objects."""

    def __init__(
        self,
        *,
        api: RawApi,
        path: str,
        parse: Callable[[Mapping[str, Any]], T],
        name: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        handler: Handler | None = None,
        watch_timeout: int = 290,
        page_size: int = 500,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
    ) -> None:
        self.api = api
        self.path = path
        self.parse = parse
        self.name = name
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.handler = handler
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

        self.store: dict[str, T] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.failed = asyncio.Event()  # set while the last attempt failed
        # Observability.
        self.lists = 0
        self.watch_restarts = 0
        self.errors = 0
        self.last_contact = 0.0  # monotonic time of the last byte from the server
        self.last_error: str = ""

    # -- public -------------------------------------------------------------

    async def run(self) -> None:
        """Run forever (until cancelled)."""
        need_list = True
        backoff = self.backoff_initial
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                await self._watch()
                self.watch_restarts += 1  # the stream ended (timeout, server restart): resume
                backoff = self.backoff_initial
            except Gone:
                log.info(
                    "%s: resourceVersion %s expired, re-listing", self.name, self.resource_version
                )
                if need_list:
                    # The LIST itself answered 410 (a continue token expired mid-way):
                    # start over, but not in a tight loop if the server keeps doing so.
                    await asyncio.sleep(random.uniform(backoff / 2, backoff))  # noqa: S311
                    backoff = min(backoff * 2, self.backoff_max)
                need_list = True
                self.watch_restarts += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                self.watch_restarts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.failed.set()
                delay = random.uniform(backoff / 2, backoff)  # noqa: S311 - jitter
                log.warning("%s: %s; retrying in %.2fs", self.name, self.last_error, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.backoff_max)

    async def list_once(self) -> None:
        """One consistent LIST into ``store`` (and the handler), without the watch that
        follows: what ``nmi explain`` needs from a cluster it only looks at."""
        await self._list()

    def staleness(self) -> float:
        """Seconds since the server was last heard from (0 before the first contact)."""
        return time.monotonic() - self.last_contact if self.last_contact else 0.0

    # -- list ---------------------------------------------------------------

    def _selectors(self) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        if self.label_selector:
            params.append(("labelSelector", self.label_selector))
        if self.field_selector:
            params.append(("fieldSelector", self.field_selector))
        return params

    async def _list(self) -> None:
        items: dict[str, T] = {}
        cont = ""
        rv = ""
        while True:
            params = [*self._selectors(), ("limit", str(self.page_size))]
            if cont:
                params.append(("continue", cont))
            resp = await self.api.get(self.path, params, timeout=aiohttp.ClientTimeout(total=60))
            async with resp:
                if resp.status == 410:
                    raise Gone()
                body = await resp.read()
                if resp.status != 200:
                    raise ApiError(resp.status, _status_message(body))
            self.last_contact = time.monotonic()
            doc = json.loads(body)
            for raw in doc.get("items") or ():
                key, obj = self._parse(raw)
                if key is not None:
                    items[key] = obj
            meta = doc.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or rv)
            cont = str(meta.get("continue") or "")
            if not cont:
                break
        self.lists += 1
        self._replace(items)
        self.resource_version = rv
        self.failed.clear()
        self.synced.set()

    def _replace(self, items: dict[str, T]) -> None:
        old = self.store
        self.store = items
        if self.handler is None:
            return
        for key, obj in old.items():
            if key not in items:
                self.handler(DELETED, obj, None)
        for key, obj in items.items():
            previous = old.get(key)
            if previous is None:
                self.handler(ADDED, None, obj)
            elif previous != obj:
                self.handler(MODIFIED, previous, obj)

    # -- watch --------------------------------------------------------------

    async def _watch(self) -> None:
        params = [
            *self._selectors(),
            ("watch", "1"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(self.watch_timeout)),
        ]
        if self.resource_version:
            params.append(("resourceVersion", self.resource_version))
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=self.watch_timeout + 30
        )
        resp = await self.api.get(self.path, params, timeout=timeout)
        async with resp:
            if resp.status == 410:
                raise Gone()
            if resp.status != 200:
                raise ApiError(resp.status, _status_message(await resp.read()))
            self.last_contact = time.monotonic()
            async for line in _lines(resp):
                self.last_contact = time.monotonic()
                self._on_line(line)

    def _on_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
            raw = event["object"]
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable watch event skipped", self.name)
            return
        if kind == "ERROR":
            code = raw.get("code") if isinstance(raw, Mapping) else None
            if code == 410:
                raise Gone()
            raise ApiError(
                int(code or 500), str(raw.get("message", "")) if isinstance(raw, Mapping) else ""
            )
        meta = raw.get("metadata") if isinstance(raw, Mapping) else None
        if not isinstance(meta, Mapping):
            log.warning("%s: watch event without object metadata skipped", self.name)
            return
        rv = meta.get("resourceVersion")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return
        key, obj = self._parse(raw)
        if rv:
            self.resource_version = str(rv)
        if key is None:
            return
        if kind in (ADDED, MODIFIED):
            previous = self.store.get(key)
            self.store[key] = obj
            if self.handler is not None:
                self.handler(MODIFIED if previous is not None else ADDED, previous, obj)
        elif kind == DELETED:
            previous = self.store.pop(key, None)
            if previous is not None and self.handler is not None:
                self.handler(DELETED, previous, None)

    def _parse(self, raw: Mapping[str, Any]) -> tuple[str | None, T]:
        meta = raw.get("metadata") if isinstance(raw, Mapping) else None
        if not isinstance(meta, Mapping):
            log.warning("%s: object without metadata skipped", self.name)
            return None, None  # type: ignore[return-value]
        ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        try:
            obj = self.parse(raw)
        except Exception as exc:
            log.warning("%s: cannot read %s/%s: %s", self.name, ns, name, exc)
            return None, None  # type: ignore[return-value]
        return (f"{ns}/{name}" if ns else name), obj


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Split a watch stream into lines without a line-length limit."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while True:
            idx = buf.find(b"\n")
            if idx < 0:
                break
            line, buf = buf[:idx], buf[idx + 1 :]
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def _status_message(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        doc = json.loads(body)
        return str(doc.get("message") or doc.get("reason") or "")
    return body[:200].decode("utf-8", "replace")
