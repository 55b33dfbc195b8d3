"""SecretStore: one watch per Secret on first use, shared, fresh, expired when idle (no I/O).

The API server is the fake of ``test_informer``; it serves each Secret's LIST from
``FakeCluster.secrets`` and keeps every watch stream open so that tests can feed it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from nmi.kube import secrets as secrets_module
from nmi.kube.informer import MODIFIED
from nmi.kube.objects import Secret
from nmi.kube.secrets import SecretStore, SecretUnavailable
from tests.unit.test_informer import Call, FakeApi, FakeResponse, Served, line, status

NS = "ns"
SECRETS_PATH = f"/api/v1/namespaces/{NS}/secrets"
WAIT = 2.0


def secret(name: str, password: str, rv: str = "1") -> dict[str, Any]:
    return {
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": rv},
        "data": {"clientSecret": base64.b64encode(password.encode()).decode()},
    }


def password(found: Secret | None) -> bytes | None:
    return None if found is None else found.data["clientSecret"]


class FakeCluster:
    """Serves single-Secret LISTs from ``secrets`` and opens a stream per watch."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.streams: dict[str, list[FakeResponse]] = {}
        self.gate: asyncio.Event | None = None  # when set: LISTs wait for it
        self.list_status: FakeResponse | None = None  # when set: every LIST answers it
        self.api = FakeApi(serve=self.serve)

    def serve(self, call: Call) -> Served:
        name = (call.param("fieldSelector") or "").removeprefix("metadata.name=")
        if call.is_watch:
            stream = FakeResponse(open_ended=True)
            self.streams.setdefault(name, []).append(stream)
            return stream
        if self.list_status is not None:
            return self.list_status
        items = [self.secrets[name]] if name in self.secrets else []
        doc = {"kind": "SecretList", "metadata": {"resourceVersion": "10"}, "items": items}
        response = FakeResponse(body=json.dumps(doc).encode())
        gate = self.gate
        if gate is None:
            return response

        async def gated(call: Call) -> FakeResponse:
            await gate.wait()
            return response

        return gated

    def lists_of(self, name: str) -> list[Call]:
        return [c for c in self.api.lists if c.param("fieldSelector") == f"metadata.name={name}"]

    def watches_of(self, name: str) -> list[Call]:
        return [c for c in self.api.watches if c.param("fieldSelector") == f"metadata.name={name}"]


@contextlib.asynccontextmanager
async def opened(**kwargs: Any) -> AsyncIterator[tuple[SecretStore, FakeCluster]]:
    cluster = FakeCluster()
    store = SecretStore(api=cluster.api.raw(), **kwargs)
    try:
        yield store, cluster
    finally:
        await store.close()


def watch_tasks() -> dict[str, asyncio.Task[Any]]:
    return {
        t.get_name(): t for t in asyncio.all_tasks() if t.get_name().startswith("watch-secret-")
    }


async def within(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(WAIT):
        return await awaitable


async def test_get_starts_one_watch_per_secret_and_concurrent_gets_share_it() -> None:
    async with opened() as (store, cluster):
        cluster.secrets["sp"] = secret("sp", "s3cret")
        cluster.gate = asyncio.Event()
        first = asyncio.create_task(store.get(NS, "sp"))
        await cluster.api.until(lambda: len(cluster.api.calls) == 1)  # LIST under way
        second = asyncio.create_task(store.get(NS, "sp"))
        cluster.gate.set()
        a, b = await within(asyncio.gather(first, second))
        await cluster.api.until(lambda: len(cluster.api.watches) == 1)
        assert password(a) == password(b) == b"s3cret"
        assert len(cluster.api.lists) == 1
        (listed,) = cluster.api.lists
        (watched,) = cluster.api.watches
        assert listed.path == watched.path == SECRETS_PATH
        assert listed.params == [("fieldSelector", "metadata.name=sp"), ("limit", "500")]
        assert watched.param("fieldSelector") == "metadata.name=sp"
        assert watched.param("labelSelector") is None
        assert set(watch_tasks()) == {"watch-secret-ns-sp"}

        cluster.secrets["other"] = secret("other", "x")
        assert password(await within(store.get(NS, "other"))) == b"x"
        assert len(cluster.lists_of("other")) == 1 and len(cluster.lists_of("sp")) == 1
        assert set(watch_tasks()) == {"watch-secret-ns-sp", "watch-secret-ns-other"}


async def test_a_missing_secret_is_none_and_is_then_served_from_memory() -> None:
    async with opened() as (store, cluster):
        assert await within(store.get(NS, "absent")) is None
        await cluster.api.until(lambda: len(cluster.api.watches) == 1)
        assert await within(store.get(NS, "absent")) is None
        assert len(cluster.api.calls) == 2  # one LIST, one WATCH: no GET per read


async def test_a_forbidden_list_raises_at_once_not_after_the_sync_timeout() -> None:
    async with opened(sync_timeout=60.0) as (store, cluster):
        cluster.list_status = status(403, 'secrets "sp" is forbidden')
        with pytest.raises(SecretUnavailable) as raised:
            await within(store.get(NS, "sp"))  # fails the test if it waited for 60 s
        assert str(raised.value) == (
            'secret ns/sp not readable: ApiError: 403: secrets "sp" is forbidden'
        )
        # Still failing: the next get() answers at once too, without a second watch.
        with pytest.raises(SecretUnavailable):
            await within(store.get(NS, "sp"))
        assert set(watch_tasks()) == {"watch-secret-ns-sp"}


async def test_a_list_that_never_answers_raises_after_the_sync_timeout() -> None:
    async with opened(sync_timeout=0.05) as (store, cluster):
        cluster.gate = asyncio.Event()  # never set
        with pytest.raises(SecretUnavailable, match=r"^secret ns/sp not readable: timeout$"):
            await within(store.get(NS, "sp"))


async def test_peek_is_none_until_synced_and_never_does_io() -> None:
    async with opened() as (store, cluster):
        cluster.secrets["sp"] = secret("sp", "s3cret")
        assert store.peek(NS, "sp") is None  # not watched: peek starts nothing
        assert cluster.api.calls == [] and watch_tasks() == {}

        cluster.gate = asyncio.Event()
        getting = asyncio.create_task(store.get(NS, "sp"))
        await cluster.api.until(lambda: len(cluster.api.calls) == 1)
        assert store.peek(NS, "sp") is None  # watched, LIST not answered yet
        cluster.gate.set()
        await within(getting)
        await cluster.api.until(lambda: len(cluster.api.watches) == 1)
        calls = len(cluster.api.calls)
        assert password(store.peek(NS, "sp")) == b"s3cret"
        assert len(cluster.api.calls) == calls


async def test_a_modified_secret_replaces_the_value_and_fires_changed() -> None:
    async with opened() as (store, cluster):
        cluster.secrets["sp"] = secret("sp", "old")
        assert password(await within(store.get(NS, "sp"))) == b"old"
        await cluster.api.until(lambda: "sp" in cluster.streams)
        generation = store.changed.generation
        changed = asyncio.create_task(store.changed.wait(WAIT))
        await asyncio.sleep(0)  # let the waiter subscribe before the change
        cluster.streams["sp"][0].feed(line(MODIFIED, secret("sp", "rotated", rv="11")))
        assert await changed is True
        assert store.changed.generation == generation + 1
        assert password(store.peek(NS, "sp")) == b"rotated"
        calls = len(cluster.api.calls)
        assert password(await within(store.get(NS, "sp"))) == b"rotated"
        assert len(cluster.api.calls) == calls  # served from the watch, not re-read


class FakeTime:
    """Stands in for the ``time`` module of nmi.kube.secrets."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(secrets_module, "time", fake)
    return fake


async def test_expire_idle_stops_unused_watches_and_a_later_get_starts_a_new_one(
    clock: FakeTime,
) -> None:
    async with opened(idle_after=10.0) as (store, cluster):
        cluster.secrets["a"] = secret("a", "pa")
        cluster.secrets["b"] = secret("b", "pb")
        await within(store.get(NS, "a"))
        clock.now += 8
        await within(store.get(NS, "b"))
        await cluster.api.until(lambda: len(cluster.api.watches) == 2)
        a_task = watch_tasks()["watch-secret-ns-a"]

        clock.now += 2  # a idle for exactly 10 s: not yet
        assert await store.expire_idle() == 0
        clock.now += 0.5
        assert await store.expire_idle() == 1
        assert a_task.cancelled()
        assert cluster.streams["a"][0].closed  # its watch connection was released
        assert set(watch_tasks()) == {"watch-secret-ns-b"}
        assert store.peek(NS, "a") is None
        assert password(store.peek(NS, "b")) == b"pb"

        cluster.secrets["a"] = secret("a", "pa2")
        assert password(await within(store.get(NS, "a"))) == b"pa2"
        assert len(cluster.lists_of("a")) == 2
        assert set(watch_tasks()) == {"watch-secret-ns-a", "watch-secret-ns-b"}


async def test_peek_counts_as_use(clock: FakeTime) -> None:
    async with opened(idle_after=10.0) as (store, cluster):
        cluster.secrets["a"] = secret("a", "pa")
        await within(store.get(NS, "a"))
        clock.now += 9
        assert password(store.peek(NS, "a")) == b"pa"
        clock.now += 9  # 18 s since get(), 9 s since peek()
        assert await store.expire_idle() == 0
        clock.now += 2
        assert await store.expire_idle() == 1


async def test_close_cancels_every_watch() -> None:
    cluster = FakeCluster()
    store = SecretStore(api=cluster.api.raw())
    cluster.secrets["a"] = secret("a", "pa")
    await within(store.get(NS, "a"))
    cluster.list_status = status(403, "forbidden")  # b's informer is in its retry loop
    with pytest.raises(SecretUnavailable):
        await within(store.get(NS, "b"))
    await cluster.api.until(lambda: len(cluster.api.watches) == 1)
    tasks = watch_tasks()
    assert len(tasks) == 2

    await within(store.close())
    assert all(t.cancelled() for t in tasks.values())
    assert watch_tasks() == {}
    assert cluster.streams["a"][0].closed
    assert store.peek(NS, "a") is None
