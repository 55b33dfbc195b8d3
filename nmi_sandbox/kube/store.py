"""The versioned store: what etcd plus the apiserver's watch cache do for the real server.

Why this exists: the daemon's correctness rests on resourceVersion semantics --
lists that are consistent snapshots, watches that resume exactly where a list or
an earlier watch stopped, 410 ``Expired`` once history is gone -- so they are
kept in one place, apart from HTTP and from the per-kind rules:

* one global, monotonically increasing ``resourceVersion`` shared by all
  resources (like the etcd revision); :meth:`Store.commit` is the only write
  and bumps it;
* a bounded history of events (``history_limit``), forgotten by
  :meth:`Store.compact` like an etcd compaction;
* LIST snapshots at the current or an exact past revision, pages and
  ``continue`` tokens (which expire with compaction);
* open watches (:class:`Watcher`) and the fan-out of every committed event to
  them, filtered as the cacher does (a selector move-out is a DELETED);
* waiting for the revision to reach a value, or for any change at all.

All of it runs on the event loop that started the server; watchers may be
woken from another thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import logging
from dataclasses import dataclass

from .errors import bad_request, expired, status, too_large_rv
from .meta import JSON, object_key, with_rv
from .resources import BY_STORAGE
from .selectors import Filter

__all__ = ["TOO_LARGE_RV_WAIT", "Event", "Page", "Store", "WatchStart", "Watcher", "parse_rv"]

logger = logging.getLogger("nmi_sandbox.kube")

TOO_LARGE_RV_WAIT = 3.0  # seconds the real cacher waits for a future resourceVersion

_CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter, or use the continue token in "
    "this response to retrieve the remainder of the results. Continuing with the provided "
    "token results in an inconsistent list - objects that were created, modified, or deleted "
    "between the time the first chunk was returned and now may show up in the list."
)


def parse_rv(value: str) -> int:
    try:
        rv = int(value)
    except ValueError:
        raise bad_request(f'invalid resource version: "{value}"') from None
    if rv < 0:
        raise bad_request(f'invalid resource version: "{value}"')
    return rv


@dataclass(frozen=True)
class Event:
    """One committed change: the object after it (``obj``) and before it (``prev``)."""

    rv: int
    storage: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: JSON
    prev: JSON | None


def _filter_event(flt: Filter, ev: Event) -> tuple[str, JSON] | None:
    """What a watcher with this filter sees of an event (the cacher's convertToWatchEvent)."""
    if ev.type == "ADDED":
        return ("ADDED", ev.obj) if flt(ev.obj) else None
    if ev.type == "DELETED":
        return ("DELETED", ev.obj) if flt(ev.obj) else None
    now = flt(ev.obj)
    before = ev.prev is not None and flt(ev.prev)
    if now and before:
        return ("MODIFIED", ev.obj)
    if now:
        return ("ADDED", ev.obj)
    if before and ev.prev is not None:
        return ("DELETED", with_rv(ev.prev, ev.rv))
    return None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Watcher:
    """One open watch stream: a queue of pending events and a wake-up signal."""

    def __init__(self, flt: Filter, loop: asyncio.AbstractEventLoop) -> None:
        self.flt = flt
        self.loop = loop
        self.queue: collections.deque[tuple[str, JSON]] = collections.deque()
        self.wake = asyncio.Event()
        self.closed = False

    def _signal(self) -> None:
        if _running_loop() is self.loop:
            self.wake.set()
        else:
            self.loop.call_soon_threadsafe(self.wake.set)

    def push(self, ev: Event) -> None:
        item = _filter_event(self.flt, ev)
        if item is not None:
            self.queue.append(item)
            self._signal()

    def close(self) -> None:
        self.closed = True
        self._signal()


@dataclass
class WatchStart:
    """How a watch begins: the events to replay, or the error to send, and its watcher."""

    initial: list[tuple[str, JSON]]
    snapshot_rv: int
    watcher: Watcher | None = None
    error: JSON | None = None


def _encode_continue(rv: int, start: tuple[str, str], epoch: int) -> str:
    payload = {"v": "meta.k8s.io/v1", "rv": rv, "start": "/".join(start) + "\x00", "c": epoch}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, tuple[str, str], int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        if payload.get("v") != "meta.k8s.io/v1":
            raise ValueError("continue key is not valid: incorrect encoded start resourceVersion")
        ns, _, name = str(payload["start"]).rstrip("\x00").partition("/")
        return int(payload["rv"]), (ns, name), int(payload.get("c", 0))
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise bad_request(f"continue key is not valid: {e}") from None


@dataclass
class Page:
    items: list[JSON]
    rv: int
    cont: str = ""
    remaining: int | None = None


class Store:
    """Objects by storage and key, their history, and the watches on them."""

    def __init__(self, history_limit: int = 10000) -> None:
        self.history_limit = max(1, history_limit)
        self.rv = 0
        self.history: collections.deque[Event] = collections.deque()
        self.history_start = 0  # every event with rv > this is still in history
        self.epoch = 0  # bumped by compact(): continue tokens from before are expired
        self.objects: dict[str, dict[tuple[str, str], JSON]] = {
            storage: {} for storage in BY_STORAGE
        }
        self.watchers: set[Watcher] = set()
        self._waiters: list[asyncio.Future[None]] = []

    def get(self, storage: str, namespace: str | None, name: str) -> JSON | None:
        """The stored object (not a copy), or None."""
        return self.objects[storage].get((namespace or "", name))

    # ----------------------------------------------------------------- writes

    def commit(self, storage: str, etype: str, obj: JSON, prev: JSON | None) -> JSON:
        """Store ``obj`` (or remove it: DELETED) at the next revision and tell the watchers."""
        self.rv += 1
        rv = self.rv
        obj["metadata"]["resourceVersion"] = str(rv)
        key = object_key(obj)
        if etype == "DELETED":
            del self.objects[storage][key]
        else:
            self.objects[storage][key] = obj
        ev = Event(rv, storage, etype, obj, prev)
        self.history.append(ev)
        while len(self.history) > self.history_limit:
            self.history_start = self.history.popleft().rv
        for watcher in list(self.watchers):
            if watcher.flt.res.storage == storage and not watcher.closed:
                watcher.push(ev)
        logger.debug("%s %s %s/%s rv=%d", etype, storage, key[0], key[1], rv)
        self.notify()
        return obj

    def compact(self) -> None:
        """Forget all event history, like an etcd compaction at the current revision."""
        self.history.clear()
        self.history_start = self.rv
        self.epoch += 1
        logger.info("history compacted at resourceVersion %d", self.rv)

    # ----------------------------------------------------------------- reads

    def state_at(self, storage: str, rv: int) -> dict[tuple[str, str], JSON]:
        """The objects of ``storage`` as they were at ``rv`` (must be >= history_start)."""
        state = dict(self.objects[storage])
        for ev in reversed(self.history):
            if ev.rv <= rv:
                break
            if ev.storage != storage:
                continue
            key = object_key(ev.obj)
            if ev.type == "ADDED":
                state.pop(key, None)
            elif ev.prev is not None:
                state[key] = ev.prev
        return state

    def list(
        self,
        flt: Filter,
        rv_param: str | None,
        rv_match: str | None,
        limit: int | None,
        cont: str | None,
    ) -> Page:
        """One page of a LIST: the latest state, an exact revision, or a continuation."""
        storage = flt.res.storage
        start: tuple[str, str] | None = None
        if cont:
            if rv_param:
                raise bad_request("specifying resource version is not allowed when using continue")
            token_rv, start, epoch = _decode_continue(cont)
            if token_rv == -1:
                list_rv, state = self.rv, self.objects[storage]
            elif epoch != self.epoch or token_rv < self.history_start:
                err = expired(_CONTINUE_EXPIRED)
                err.status["metadata"] = {"continue": _encode_continue(-1, start, self.epoch)}
                raise err
            else:
                list_rv, state = token_rv, self.state_at(storage, token_rv)
        elif rv_match == "Exact":
            if not rv_param or rv_param == "0":
                raise bad_request(
                    'resourceVersionMatch "Exact" requires a non-zero resourceVersion'
                )
            wanted = parse_rv(rv_param)
            if wanted > self.rv:
                raise too_large_rv(wanted, self.rv)
            if wanted < self.history_start:
                raise expired(f"too old resource version: {wanted} ({self.history_start})")
            list_rv, state = wanted, self.state_at(storage, wanted)
        else:
            list_rv, state = self.rv, self.objects[storage]
        keys = sorted(state)
        if start is not None:
            keys = [k for k in keys if k > start]
        if flt.namespace is not None:
            keys = [k for k in keys if k[0] == flt.namespace]
        items: list[JSON] = []
        last: tuple[str, str] | None = None
        examined = 0
        for key in keys:
            if limit is not None and limit > 0 and len(items) >= limit:
                break
            examined += 1
            last = key
            if flt(state[key]):
                items.append(state[key])
        page = Page(items, list_rv)
        if limit is not None and limit > 0 and examined < len(keys) and last is not None:
            page.cont = _encode_continue(list_rv, last, self.epoch)
            if not flt.has_selectors:
                page.remaining = len(keys) - examined
        return page

    # ----------------------------------------------------------------- watches

    def open_watch(
        self,
        flt: Filter,
        start_rv: int | None,
        send_initial: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> WatchStart:
        """Snapshot or replay, and register the watcher, with no write in between.

        From no revision (or with ``sendInitialEvents``): synthetic ADDED events for
        what matches now.  From a revision still in history: the events after it.
        From a compacted revision: a 410 ``Expired`` Status and no watcher.
        """
        start = WatchStart([], self.rv)
        if start_rv is None or send_initial:
            start.initial = [("ADDED", o) for o in self.list(flt, None, None, None, None).items]
        elif start_rv < self.history_start:
            start.error = status(
                410, "Expired", f"too old resource version: {start_rv} ({self.history_start})"
            )
            return start
        else:
            for ev in self.history:
                if ev.rv > start_rv and ev.storage == flt.res.storage:
                    item = _filter_event(flt, ev)
                    if item is not None:
                        start.initial.append(item)
        start.watcher = Watcher(flt, loop)
        self.watchers.add(start.watcher)
        self.notify()
        return start

    def close_watch(self, watcher: Watcher) -> None:
        watcher.closed = True
        self.watchers.discard(watcher)
        self.notify()

    def drop_watches(self) -> None:
        """End every open watch stream cleanly; clients have to re-watch."""
        for watcher in list(self.watchers):
            watcher.close()

    def watch_count(self, plural: str) -> int:
        return sum(1 for w in self.watchers if w.flt.res.plural == plural and not w.closed)

    # ----------------------------------------------------------------- change notification

    async def wait_change(self, timeout: float) -> None:
        """Return after the next write or watch registration, or after ``timeout``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait([fut], timeout=timeout)
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                if fut.get_loop() is _running_loop():
                    fut.set_result(None)
                else:
                    fut.get_loop().call_soon_threadsafe(_resolve_future, fut)

    async def wait_rv(self, rv: int, timeout: float) -> None:
        """Wait for the revision to reach ``rv``; 504 ``Too large resource version`` if not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.rv < rv:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise too_large_rv(rv, self.rv)
            await self.wait_change(remaining)
