"""Informer: paginated LIST, resumable WATCH, 410 re-LIST, skipped garbage, backoff (no I/O).

The API server is a fake ``RawApi`` serving canned LIST pages and watch streams.  A watch
stream can be left open (the informer then blocks on it, as on a quiet cluster) and fed
later.  Tests wait on the fake's progress (each API call, each chunk consumed, each
handler call), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import pytest

from nmi.kube import informer as informer_module
from nmi.kube.informer import ADDED, DELETED, MODIFIED, Informer, RawApi

PATH = "/apis/example.io/v1/things"
WAIT = 2.0  # seconds any single condition may take before the test fails


# -- the fake API server ------------------------------------------------------------------


class FakeResponse:
    """The part of ``aiohttp.ClientResponse`` the informer reads.

    ``chunks`` are what ``content.iter_any()`` yields; unless ``open_ended``, the
    stream ends after them.  ``feed``/``end`` add to a stream that is being read.
    """

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        chunks: Iterable[bytes] = (),
        *,
        open_ended: bool = False,
    ) -> None:
        self.status = status
        self._body = body
        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        for chunk in chunks:
            self._chunks.put_nowait(chunk)
        if not open_ended:
            self._chunks.put_nowait(None)
        self.content = self
        self.closed = False
        self.on_progress: Callable[[], None] = lambda: None

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self._chunks.put_nowait(chunk)

    def end(self) -> None:
        self._chunks.put_nowait(None)

    async def read(self) -> bytes:
        return self._body

    async def iter_any(self) -> AsyncIterator[bytes]:
        while True:
            self.on_progress()  # everything yielded so far has been handled
            chunk = await self._chunks.get()
            if chunk is None:
                return
            yield chunk

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.closed = True


@dataclass
class Call:
    path: str
    params: list[tuple[str, str]]
    timeout: aiohttp.ClientTimeout

    @property
    def is_watch(self) -> bool:
        return ("watch", "1") in self.params

    def param(self, name: str) -> str | None:
        return dict(self.params).get(name)


Served = FakeResponse | Callable[[Call], Awaitable[FakeResponse]]


class FakeApi:
    """Answers GETs from ``script`` (in order) or from ``serve``; once both give
    nothing, an open-ended empty stream (a watch on a quiet cluster)."""

    def __init__(self, *script: Served, serve: Callable[[Call], Served] | None = None) -> None:
        self.script: deque[Served] = deque(script)
        self.serve = serve
        self.calls: list[Call] = []
        self.responses: list[FakeResponse] = []
        self._waiters: list[asyncio.Future[None]] = []

    async def get(
        self, path: str, params: list[tuple[str, str]], *, timeout: aiohttp.ClientTimeout
    ) -> FakeResponse:
        call = Call(path, list(params), timeout)
        self.calls.append(call)
        self.poke()
        if self.script:
            served: Served = self.script.popleft()
        elif self.serve is not None:
            served = self.serve(call)
        else:
            served = FakeResponse(open_ended=True)
        response = served if isinstance(served, FakeResponse) else await served(call)
        response.on_progress = self.poke
        self.responses.append(response)
        return response

    def poke(self) -> None:
        """Something happened: let every ``until`` re-check its condition."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter

    def raw(self) -> RawApi:
        """This fake as the informer's ``RawApi`` (its responses are duck-typed)."""
        return cast(RawApi, self)

    @property
    def lists(self) -> list[Call]:
        return [c for c in self.calls if not c.is_watch]

    @property
    def watches(self) -> list[Call]:
        return [c for c in self.calls if c.is_watch]


def raising(exc: Exception) -> Callable[[Call], Awaitable[FakeResponse]]:
    async def serve(call: Call) -> FakeResponse:
        raise exc

    return serve


# -- canned API documents ---------------------------------------------------------------


def thing(
    name: str, value: str = "v1", rv: str = "1", namespace: str = "default"
) -> dict[str, Any]:
    meta = {"name": name, "resourceVersion": rv}
    if namespace:
        meta["namespace"] = namespace
    return {"metadata": meta, "data": {"v": value}}


def page(items: list[dict[str, Any]], rv: str, cont: str = "") -> FakeResponse:
    meta = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    return FakeResponse(body=json.dumps({"metadata": meta, "items": items}).encode())


def line(kind: str, obj: Any) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def bookmark(rv: str) -> bytes:
    return line("BOOKMARK", {"kind": "Thing", "metadata": {"resourceVersion": rv}})


def watch(*chunks: bytes, open_ended: bool = False) -> FakeResponse:
    return FakeResponse(chunks=chunks, open_ended=open_ended)


def status(code: int, message: str) -> FakeResponse:
    body = {"kind": "Status", "status": "Failure", "message": message, "code": code}
    return FakeResponse(status=code, body=json.dumps(body).encode())


@dataclass(frozen=True)
class Thing:
    name: str
    value: str

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Thing:
        if raw.get("bad"):
            raise ValueError("not a thing")
        return cls(raw["metadata"]["name"], raw["data"]["v"])


A1, A2 = Thing("a", "v1"), Thing("a", "v2")
B1, B2 = Thing("b", "v1"), Thing("b", "v2")
C1, D1 = Thing("c", "v1"), Thing("d", "v1")


class Handler:
    """Records (kind, old, new) and wakes the fake API's waiters."""

    def __init__(self, api: FakeApi) -> None:
        self.api = api
        self.events: list[tuple[str, Thing | None, Thing | None]] = []

    def __call__(self, kind: str, old: Any, new: Any) -> None:
        self.events.append((kind, old, new))
        self.api.poke()


def make(api: FakeApi, **kwargs: Any) -> tuple[Informer[Thing], Handler]:
    handler = Handler(api)
    kwargs.setdefault("backoff_initial", 0.001)
    kwargs.setdefault("backoff_max", 0.004)
    inf: Informer[Thing] = Informer(
        api=api.raw(), path=PATH, parse=Thing.parse, name="things", handler=handler, **kwargs
    )
    return inf, handler


@contextlib.asynccontextmanager
async def running(inf: Informer[Thing]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(inf.run())
    try:
        yield task
    finally:
        died = task.done() and not task.cancelled()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if died:
            task.result()  # run() must never end by itself: show why it did


# -- LIST ---------------------------------------------------------------------------------


async def test_list_follows_continue_tokens_into_the_store_and_reports_added() -> None:
    api = FakeApi(
        page([thing("a"), thing("b")], rv="7", cont="tok-1"),
        page([thing("c", namespace="")], rv="7"),
    )
    inf, handler = make(api, page_size=2)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 1)
    first, second = api.lists
    assert first.path == second.path == PATH
    assert first.params == [("limit", "2")]
    assert second.params == [("limit", "2"), ("continue", "tok-1")]
    assert inf.store == {"default/a": A1, "default/b": B1, "c": C1}  # cluster-scoped: name
    assert handler.events == [(ADDED, None, A1), (ADDED, None, B1), (ADDED, None, C1)]
    assert inf.synced.is_set() and inf.lists == 1
    assert inf.resource_version == "7"


async def test_selectors_are_sent_on_list_and_on_watch() -> None:
    api = FakeApi(page([thing("a")], rv="5"))
    inf, _ = make(api, label_selector="nodename=n1", field_selector="spec.nodeName=n1")
    async with running(inf):
        await api.until(lambda: len(api.watches) == 1)
    selectors = [("labelSelector", "nodename=n1"), ("fieldSelector", "spec.nodeName=n1")]
    assert api.lists[0].params == [*selectors, ("limit", "500")]
    assert api.watches[0].path == PATH
    assert api.watches[0].params == [
        *selectors,
        ("watch", "1"),
        ("allowWatchBookmarks", "true"),
        ("timeoutSeconds", "290"),
        ("resourceVersion", "5"),
    ]


async def test_list_once_fills_the_store_once_and_starts_no_watch() -> None:
    api = FakeApi(page([thing("a")], rv="3", cont="c"), page([thing("b")], rv="3"))
    inf, handler = make(api, page_size=1)
    await inf.list_once()
    assert [c.is_watch for c in api.calls] == [False, False]
    assert inf.store == {"default/a": A1, "default/b": B1}
    assert handler.events == [(ADDED, None, A1), (ADDED, None, B1)]
    assert inf.synced.is_set() and inf.resource_version == "3"


async def test_gone_during_pagination_relists_from_the_first_page() -> None:
    api = FakeApi(
        page([thing("a")], rv="3", cont="expired"),
        status(410, "The provided continue parameter is too old"),
        page([thing("b")], rv="9"),
    )
    inf, handler = make(api, page_size=1)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 1)
    assert [c.param("continue") for c in api.lists] == [None, "expired", None]
    assert inf.store == {"default/b": B1}
    assert handler.events == [(ADDED, None, B1)]  # the half-read snapshot never leaked
    assert api.watches[0].param("resourceVersion") == "9"


# -- WATCH --------------------------------------------------------------------------------


async def test_watch_resumes_from_the_last_event_and_bookmark_version() -> None:
    api = FakeApi(
        page([], rv="5"),
        watch(line(ADDED, thing("a", rv="6"))),  # then the stream ends (server timeout)
        watch(bookmark("9")),
    )
    inf, handler = make(api)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 3)
    assert [w.param("resourceVersion") for w in api.watches] == ["5", "6", "9"]
    assert inf.store == {"default/a": A1}  # the bookmark touched nothing
    assert handler.events == [(ADDED, None, A1)]
    assert inf.lists == 1  # a stream that ends is resumed, not re-listed


async def test_watch_events_update_the_store_and_reach_the_handler_with_old_and_new() -> None:
    stream = watch(open_ended=True)
    api = FakeApi(page([thing("a")], rv="5"), stream)
    inf, handler = make(api)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 1)
        stream.feed(
            line(MODIFIED, thing("a", "v2", rv="6")),
            line(ADDED, thing("b", rv="7")),
            line(ADDED, thing("b", "v2", rv="8")),  # ADDED for a known key: a change
            line(DELETED, thing("a", "v2", rv="9")),
            line(DELETED, thing("zzz", rv="10")),  # never seen: nothing to report
        )
        await api.until(lambda: inf.resource_version == "10")
    assert handler.events == [
        (ADDED, None, A1),
        (MODIFIED, A1, A2),
        (ADDED, None, B1),
        (MODIFIED, B1, B2),
        (DELETED, A2, None),
    ]
    assert inf.store == {"default/b": B2}


async def test_a_watch_line_split_across_chunks_is_reassembled() -> None:
    first = line(ADDED, thing("a", rv="6"))
    second = line(ADDED, thing("b", rv="7")).rstrip(b"\n")  # the last line has no newline
    api = FakeApi(
        page([], rv="5"),
        watch(first[:10], first[10:25], first[25:] + b"\n" + second[:7], second[7:]),
    )
    inf, handler = make(api)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 2)
    assert inf.store == {"default/a": A1, "default/b": B1}
    assert handler.events == [(ADDED, None, A1), (ADDED, None, B1)]
    assert api.watches[1].param("resourceVersion") == "7"
    assert inf.errors == 0


async def test_unreadable_lines_and_unparseable_objects_are_skipped() -> None:
    api = FakeApi(
        page([], rv="5"),
        watch(
            b"this is not json\n",
            b'{"type": "ADDED"}\n',  # no object
            b"[1, 2]\n",
            line(ADDED, {**thing("bad", rv="6"), "bad": True}),  # parse raises
            line(ADDED, thing("a", rv="7")),
        ),
    )
    inf, handler = make(api)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 2)
    assert inf.store == {"default/a": A1}
    assert handler.events == [(ADDED, None, A1)]
    assert inf.errors == 0 and not inf.failed.is_set()
    assert api.watches[1].param("resourceVersion") == "7"


@pytest.mark.parametrize("malformed", [None, {"metadata": "oops"}], ids=["null", "metadata"])
async def test_a_malformed_object_is_skipped_and_the_stream_continues(malformed: Any) -> None:
    api = FakeApi(page([], rv="5"), watch(line(ADDED, malformed), line(ADDED, thing("a", rv="7"))))
    inf, _ = make(api)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 2)
    assert inf.errors == 0
    assert inf.store == {"default/a": A1}


# -- 410 Gone -----------------------------------------------------------------------------


def gone_status() -> FakeResponse:
    return status(410, "too old resource version: 5 (12)")


def gone_event() -> FakeResponse:
    expired = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410}
    return watch(line("ERROR", expired))


@pytest.mark.parametrize("gone", [gone_status, gone_event], ids=["http-410", "error-event"])
async def test_gone_relists_and_reports_the_differences_as_events(
    gone: Callable[[], FakeResponse],
) -> None:
    api = FakeApi(
        page([thing("a"), thing("b"), thing("c")], rv="5"),
        gone(),
        page([thing("b", "v2"), thing("c"), thing("d")], rv="12"),
    )
    inf, handler = make(api)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 2)
    assert handler.events[3:] == [(DELETED, A1, None), (MODIFIED, B1, B2), (ADDED, None, D1)]
    assert inf.store == {"default/b": B2, "default/c": C1, "default/d": D1}
    assert inf.lists == 2
    assert inf.errors == 0 and not inf.failed.is_set()  # expiry is routine, not a failure
    assert api.watches[1].param("resourceVersion") == "12"


# -- failures -----------------------------------------------------------------------------


class Jitter:
    """Stands in for ``random``: records the (low, high) bounds of each backoff."""

    def __init__(self) -> None:
        self.bounds: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.bounds.append((low, high))
        return low


async def test_api_errors_back_off_exponentially_set_failed_and_a_list_clears_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jitter = Jitter()
    monkeypatch.setattr(informer_module, "random", jitter)
    seen: list[tuple[bool, str]] = []

    def snapshot(response: FakeResponse) -> Callable[[Call], Awaitable[FakeResponse]]:
        async def serve(call: Call) -> FakeResponse:
            seen.append((inf.failed.is_set(), inf.last_error))
            return response

        return serve

    api = FakeApi(
        status(500, "etcd down"),
        raising(aiohttp.ClientConnectionError("connection refused")),
        status(503, "unavailable"),
        status(429, "slow down"),
        snapshot(page([thing("a")], rv="5")),
        snapshot(watch()),  # ends normally: the backoff starts over
        status(500, "watch broke"),
    )
    inf, _ = make(api, backoff_initial=0.001, backoff_max=0.004)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 3)
    assert seen == [(True, "ApiError: 429: slow down"), (False, "ApiError: 429: slow down")]
    # Jitter between half and all of a backoff that doubles up to backoff_max.
    assert [low * 2 for low, _ in jitter.bounds] == pytest.approx([h for _, h in jitter.bounds])
    assert [h for _, h in jitter.bounds] == pytest.approx([0.001, 0.002, 0.004, 0.004, 0.001])
    assert inf.errors == 5
    assert inf.last_error == "ApiError: 500: watch broke"
    assert inf.lists == 1  # a failed watch resumes; only a LIST that failed is retried


async def test_an_error_event_other_than_410_is_a_failure_and_the_watch_resumes() -> None:
    failure = {"kind": "Status", "code": 500, "message": "internal error"}
    api = FakeApi(page([], rv="5"), watch(line(ADDED, thing("a", rv="6")), line("ERROR", failure)))
    inf, _ = make(api)
    async with running(inf):
        await api.until(lambda: len(api.watches) == 2)
    assert inf.errors == 1 and inf.failed.is_set()
    assert inf.last_error == "ApiError: 500: internal error"
    assert api.watches[1].param("resourceVersion") == "6"
    assert inf.lists == 1
