"""The token listener's HTTP/1.1 handling, over real loopback sockets.

A small handler stands in for nmi's: ``/fast`` is answered synchronously,
``/slow`` waits until the test releases it, anything else is answered by the
coroutine path at once.  What is checked is the connection's behaviour:
keep-alive, pipelined replies in order, limits, timeouts, broken HTTP,
client disconnects and a graceful stop.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest

from nmi.imds.connection import MAX_DISCARD as MAX_BODY
from nmi.imds.connection import MAX_HEADERS
from nmi.imds.listener import Listener, per_address_limit, raise_open_file_limit
from nmi.imds.messages import Reply, Request, encode


class FakeHandler:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen: list[Request] = []
        self.cancelled = asyncio.Event()
        self.errors: list[int] = []
        self.started = asyncio.Event()

    def fast(self, request: Request) -> bytes | None:
        if request.target == "/fast":
            self.seen.append(request)
            return encode(Reply(200, b'{"path":"fast"}'), close=False)
        return None

    async def __call__(self, request: Request) -> Reply:
        self.seen.append(request)
        if request.target == "/slow":
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        body = json.dumps({"path": request.target, "body": len(request.body)}).encode()
        return Reply(200, body)

    def protocol_error(self, peer_ip: str, status: int, reason: str) -> None:
        self.errors.append(status)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Listener, FakeHandler, int]]:
    handler = FakeHandler()
    listener = Listener(
        handler, keepalive_timeout=0.5, request_timeout=0.5, write_timeout=1.0, sweep_interval=0.1
    )
    port = await listener.listen("127.0.0.1", 0)
    try:
        yield listener, handler, port
    finally:
        await listener.stop(1.0)


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return status, headers, body


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


async def test_keep_alive_serves_many_requests_on_one_connection(served) -> None:  # type: ignore[no-untyped-def]
    _, handler, port = served
    reader, writer = await connect(port)
    for path in ("/fast", "/other", "/fast"):
        writer.write(get(path))
        status, headers, _ = await read_reply(reader)
        assert status == 200 and "connection" not in headers
        assert headers["server"] == "nmi" and headers["date"]
    assert [r.target for r in handler.seen] == ["/fast", "/other", "/fast"]
    assert handler.seen[0].peer_ip == "127.0.0.1"
    writer.close()


async def test_pipelined_replies_keep_request_order(served) -> None:  # type: ignore[no-untyped-def]
    _, handler, port = served
    reader, writer = await connect(port)
    writer.write(get("/slow") + get("/fast") + get("/other"))
    await handler.started.wait()
    handler.release.set()
    bodies = [json.loads((await read_reply(reader))[2])["path"] for _ in range(3)]
    assert bodies == ["/slow", "fast", "/other"]
    writer.close()


async def test_requests_before_a_broken_one_are_still_answered(served) -> None:  # type: ignore[no-untyped-def]
    _, handler, port = served
    reader, writer = await connect(port)
    writer.write(get("/slow") + get("/other") + b"NOT HTTP\r\n\r\n")
    await handler.started.wait()
    handler.release.set()
    assert json.loads((await read_reply(reader))[2])["path"] == "/slow"
    assert json.loads((await read_reply(reader))[2])["path"] == "/other"
    status, headers, _ = await read_reply(reader)
    assert status == 400 and headers["connection"] == "close"
    writer.close()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (
            b"GET / HTTP/1.1\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
            + b"\r\n",
            431,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
            + b"a" * (MAX_BODY + 1),
            413,
        ),
    ],
    ids=["garbage", "cl-and-te", "huge-header", "many-headers", "huge-body"],
)
async def test_unreadable_requests_get_json_and_the_connection_ends(  # type: ignore[no-untyped-def]
    served, raw: bytes, status: int
) -> None:
    _, handler, port = served
    reader, writer = await connect(port)
    writer.write(raw)
    with_error = await read_reply(reader)
    assert with_error[0] == status
    assert with_error[1]["connection"] == "close"
    assert with_error[1]["content-type"].startswith("application/json")
    assert json.loads(with_error[2])["error"] == "invalid_request"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
    assert handler.errors == [status]
    writer.close()


async def test_http10_and_connection_close_end_the_connection(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port = served
    for raw in (b"GET /fast HTTP/1.0\r\n\r\n", get("/fast", "Connection: close\r\n")):
        reader, writer = await connect(port)
        writer.write(raw + get("/fast"))  # the second request is never answered
        status, headers, _ = await read_reply(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_upgrade_offers_are_declined_in_http11(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port = served
    for path in ("/fast", "/other"):
        reader, writer = await connect(port)
        writer.write(get(path, "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"))
        status, _, body = await read_reply(reader)
        assert status == 200 and body
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_body_and_head(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port = served
    reader, writer = await connect(port)
    # The proxied metadata APIs may take a body (scheduled events are acknowledged by POST).
    writer.write(
        b"POST /metadata/scheduledevents HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert json.loads((await read_reply(reader))[2])["body"] == 5
    # Other routes take none: what is sent is read and dropped, never held.
    writer.write(b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert json.loads((await read_reply(reader))[2])["body"] == 0
    writer.write(b"HEAD /other HTTP/1.1\r\nHost: x\r\n\r\n" + get("/fast"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"Content-Length: " in head  # the length a GET would have, and no body:
    assert json.loads((await read_reply(reader))[2])["path"] == "fast"
    writer.close()


async def test_incomplete_request_times_out_with_408(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port = served
    reader, writer = await connect(port)
    writer.write(b"GET /fast HTTP/1.1\r\nHost: x\r\n")  # never finished
    status, headers, _ = await read_reply(reader)
    assert status == 408 and headers["connection"] == "close"
    writer.close()


async def test_idle_keep_alive_connection_is_closed(served) -> None:  # type: ignore[no-untyped-def]
    listener, _, port = served
    reader, writer = await connect(port)
    writer.write(get("/fast"))
    await read_reply(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after keepalive_timeout
    writer.close()
    assert not listener.connections


async def test_client_that_leaves_cancels_its_request(served) -> None:  # type: ignore[no-untyped-def]
    _, handler, port = served
    _, writer = await connect(port)
    writer.write(get("/slow"))
    await handler.started.wait()
    writer.close()
    await asyncio.wait_for(handler.cancelled.wait(), 5)


async def test_stop_finishes_replies_in_progress_and_closes_idle_connections(served) -> None:  # type: ignore[no-untyped-def]
    listener, handler, port = served
    idle_reader, idle_writer = await connect(port)
    idle_writer.write(get("/fast"))
    await read_reply(idle_reader)
    reader, writer = await connect(port)
    writer.write(get("/slow"))
    await handler.started.wait()
    stopping = asyncio.create_task(listener.stop(5.0))
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # idle: closed at once
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
    handler.release.set()
    status, headers, _ = await read_reply(reader)
    assert status == 200 and headers["connection"] == "close"
    await asyncio.wait_for(stopping, 5)
    assert not listener.connections
    for w in (writer, idle_writer):
        w.close()


async def test_client_that_reads_no_replies_is_dropped(served) -> None:  # type: ignore[no-untyped-def]
    listener, _, port = served
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up quickly
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(get("/fast"))
    await read_reply(reader)  # the connection is established and served
    assert len(listener.connections) == 1
    started = asyncio.get_running_loop().time()
    writer.write(get("/fast") * 100_000)  # replies pile up: the client reads no more
    try:
        await asyncio.wait_for(listener._all_closed.wait(), 20)  # paused, then aborted
        assert asyncio.get_running_loop().time() - started >= listener.write_timeout
    finally:
        writer.transport.abort()


async def test_a_header_that_never_ends_is_refused(served) -> None:  # type: ignore[no-untyped-def]
    _, _, port = served
    reader, writer = await connect(port)
    writer.write(b"GET /fast HTTP/1.1\r\nX-Endless: ")
    for _ in range(200):  # piece by piece, as a slow client would
        writer.write(b"a" * 1024)
        await writer.drain()
    status, headers, _ = await read_reply(reader)
    assert status == 431 and headers["connection"] == "close"
    writer.close()


async def test_one_address_cannot_hold_too_many_connections() -> None:
    handler = FakeHandler()
    listener = Listener(handler, max_connections_per_ip=2)
    port = await listener.listen("127.0.0.1", 0)
    try:
        held = [await connect(port) for _ in range(2)]
        for reader, writer in held:
            writer.write(get("/fast"))
            assert (await read_reply(reader))[0] == 200
        reader, writer = await connect(port)
        writer.write(get("/fast"))
        status, headers, body = await read_reply(reader)
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(body)["error"] == "too_many_requests"
        assert listener.refused == 1 and len(listener.connections) == 2
        writer.close()
        held[0][1].close()
        await held[0][1].wait_closed()
        await asyncio.wait_for(_until(lambda: len(listener.connections) <= 1), 5)
        reader, writer = await connect(port)  # a slot is free again
        writer.write(get("/fast"))
        assert (await read_reply(reader))[0] == 200
        writer.close()
        held[1][1].close()
    finally:
        await listener.stop(1.0)


async def _until(condition) -> None:  # type: ignore[no-untyped-def]
    while not condition():  # noqa: ASYNC110 - the listener has no event for this count
        await asyncio.sleep(0.01)


def test_per_address_limit_follows_the_open_file_limit() -> None:
    assert per_address_limit(1024) == 256  # a quarter of the descriptors
    assert per_address_limit(1 << 20) == 4096
    assert per_address_limit(100) == 64
    assert raise_open_file_limit() >= 64


async def test_the_cap_is_enforced_when_a_connection_is_accepted() -> None:
    """Silent connections count too: the one over the limit is refused at accept."""
    handler = FakeHandler()
    listener = Listener(handler, max_connections_per_ip=3)
    port = await listener.listen("127.0.0.1", 0)
    try:
        held = [await connect(port) for _ in range(3)]  # never send anything
        await asyncio.wait_for(_until(lambda: len(listener.connections) == 3), 5)
        reader, writer = await connect(port)
        status, headers, _ = await read_reply(reader)  # without having sent a request
        assert status == 429 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert len(listener.connections) == 3 and listener.refused == 1
        for _, w in held:
            w.close()
        writer.close()
    finally:
        await listener.stop(1.0)


async def test_a_full_listener_makes_room_from_the_address_holding_the_most() -> None:
    handler = FakeHandler()
    listener = Listener(handler, max_connections_per_ip=10, max_connections=4)
    port = await listener.listen("127.0.0.1", 0)
    try:
        flood = [await connect(port) for _ in range(4)]  # 127.0.0.1: all four slots
        await asyncio.wait_for(_until(lambda: len(listener.connections) == 4), 5)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.2", 0)
        )
        writer.write(get("/fast"))
        assert (await read_reply(reader))[0] == 200  # admitted: an idle flood connection went
        assert listener.evicted == 1 and len(listener.connections) == 4
        closed = [r for r, _ in flood if await _closed(r)]
        assert len(closed) == 1
        more = await connect(port)  # the flooding address gets no more
        assert (await read_reply(more[0]))[0] == 429
        for _, w in [*flood, more, (reader, writer)]:
            w.close()
    finally:
        await listener.stop(1.0)


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 0.5) == b""
    except TimeoutError:
        return False


async def test_bytes_held_are_bounded_per_address_and_in_all() -> None:
    handler = FakeHandler()
    listener = Listener(handler, max_bytes_per_ip=64 * 1024, max_bytes=96 * 1024)
    port = await listener.listen("127.0.0.1", 0)
    try:
        # Heads of 30 KB that never end, on several connections of one address.
        part = b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 30_000 + b"\r\n"
        held = []
        for _ in range(2):
            reader, writer = await connect(port)
            writer.write(part)
            held.append((reader, writer))
        await asyncio.wait_for(_until(lambda: listener.held >= 60_000), 5)
        reader, writer = await connect(port)
        writer.write(part)
        status, headers, body = await read_reply(reader)
        assert status == 503 and headers["connection"] == "close"
        assert json.loads(body)["error"] == "server_error"
        assert listener.held <= 64 * 1024
        # Another address still has room, up to the listener's budget.
        r2, w2 = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        w2.write(get("/fast"))
        assert (await read_reply(r2))[0] == 200
        for _, w in [*held, (reader, writer), (r2, w2)]:
            w.close()
        await asyncio.wait_for(_until(lambda: listener.held == 0), 5)
    finally:
        await listener.stop(1.0)


async def test_a_token_request_body_is_dropped_not_held() -> None:
    handler = FakeHandler()
    listener = Listener(handler)
    port = await listener.listen("127.0.0.1", 0)
    try:
        reader, writer = await connect(port)
        size = MAX_BODY  # a megabyte, as the attack sent
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        peak = 0
        for _ in range(size // 65536):
            writer.write(b"a" * 65536)
            await writer.drain()
            peak = max(peak, listener.held)
        await asyncio.wait_for(handler.started.wait(), 5)
        assert handler.seen[-1].body == b"" and peak < 4096, peak
        handler.release.set()
        assert (await read_reply(reader))[0] == 200
        writer.close()
    finally:
        await listener.stop(1.0)
