"""One client connection of the token listener: HTTP/1.1 over an asyncio protocol.

Requests are parsed by llhttp (through ``httptools``, the parser Node.js and
aiohttp use, strict: no lenient modes, so conflicting ``Content-Length`` /
``Transfer-Encoding`` and other smuggling shapes are errors).  Each complete
request first goes to the handler's synchronous ``fast`` path: a cache hit is
answered right there, inside ``data_received``, with one ``write`` — no task,
no future, no response object.  Anything else runs as one task per request
(``handler(request)``), and requests pipelined behind it wait their turn so
replies leave in order.

Limits keep one client from costing others: the request head is bounded
(431); a body is kept only for the proxied metadata APIs, which may take one
(scheduled events are acknowledged by POST), and only up to
:data:`MAX_PROXY_BODY` — the token routes take none, so what a client sends
there is read and dropped, never held (up to :data:`MAX_DISCARD`, then 413);
every byte a connection holds counts against its address's and the
listener's budget (``Listener.hold``: 503 beyond); a client that stops
sending half-way through a request is answered 408, one that stops reading
its replies stops being read, and idle keep-alive connections are closed (the
timers are checked by the listener's once-a-second sweep, not armed per
request).  Broken HTTP gets
the same IMDS-style JSON error as everything else, then the connection ends.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from . import replies
from .arrival import arrival_interface
from .messages import Reply, Request, encode
from .target import Route, classify

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any

log = logging.getLogger(__name__)

MAX_HEAD = 32 * 1024  # request line + headers
MAX_HEADERS = 100
MAX_PROXY_BODY = 64 * 1024  # kept for the proxied metadata APIs only
MAX_DISCARD = 1 << 20  # body bytes read and dropped on a route that takes none
MAX_PIPELINED = 16  # requests queued behind a slow one before reading pauses
MAX_QUEUED_BYTES = 64 * 1024  # held in queued requests before reading pauses
_BODY_ROUTES = frozenset({Route.PROXY, Route.INSTANCE})
LINGER = 2.0  # seconds an errored connection keeps draining what the client still sends


class RequestHandler(Protocol):
    def fast(self, request: Request) -> bytes | None:
        """The complete reply bytes when the request can be answered synchronously."""

    def __call__(self, request: Request) -> Coroutine[Any, Any, Reply]:
        """Answer any request (never raises but for cancellation)."""

    def protocol_error(self, peer_ip: str, status: int, reason: str) -> None:
        """Account for a request that could not be read (answered by the connection)."""


class ListenerState(Protocol):
    handler: RequestHandler
    closing: bool

    def opened(self, connection: HttpConnection) -> bool: ...

    def closed(self, connection: HttpConnection) -> None: ...

    def hold(self, connection: HttpConnection, size: int) -> bool: ...

    def release(self, connection: HttpConnection, size: int) -> None: ...


class _Refuse(Exception):
    """Raised inside a parser callback: answer ``status`` and end the connection."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_begun",
        "_body",
        "_body_wanted",
        "_closing",
        "_discarded",
        "_head_bytes",
        "_head_held",
        "_head_wire",
        "_headers",
        "_in_head",
        "_in_request",
        "_loop",
        "_paused_reading",
        "_queue",
        "_queued_bytes",
        "_request_bytes",
        "_task",
        "_url",
        "_write_paused",
        "admitted",
        "handler",
        "held",
        "ifindex",
        "last_activity",
        "lingering_until",
        "listener",
        "parser",
        "peer_ip",
        "request_started",
        "transport",
        "write_paused_at",
    )

    def __init__(self, listener: ListenerState) -> None:
        self.listener = listener
        self.handler = listener.handler
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.ifindex = 0  # the interface the connection arrived through (0: unknown)
        self.last_activity = self._loop.time()
        self.request_started = 0.0
        self.write_paused_at = 0.0
        self.lingering_until = 0.0
        self.admitted = False
        self.held = 0  # bytes this connection holds (head, body, queued requests)
        self._url: list[bytes] = []
        self._headers: list[tuple[str, str]] = []
        self._body: bytearray | None = None
        self._body_wanted = False
        self._discarded = 0
        self._request_bytes = 0  # held for the request being read
        self._head_held = 0  # wire bytes held for a head not complete yet
        self._queued_bytes = 0
        self._head_bytes = 0
        self._head_wire = 0
        self._begun = False
        self._in_head = False
        self._in_request = False
        self._queue: collections.deque[Request | Reply] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._write_paused = False
        self._paused_reading = False
        self._closing = False

    # -- transport events ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            ip = str(peer[0])
            self.peer_ip = ip[7:] if ip.startswith("::ffff:") and "." in ip else ip
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.ifindex = arrival_interface(sock)
        self.admitted = self.listener.opened(self)
        if not self.admitted:
            # Over the connection limits: refused at once, before it can hold anything.
            self._closing = True
            transport.write(
                encode(replies.error(429, "too_many_requests", "Too many connections"), close=True)
            )
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.closed(self)  # releases what it held
        self._closing = True
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()  # the client is gone: stop waiting on its behalf
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self.write_paused_at = self._loop.time()
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._next()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # after the last reply (or lingering after an error): dropped
        self.last_activity = self._loop.time()
        self._begun = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refuse):
                self._fail(refused.status, refused.description)
            else:
                log.error("error while reading a request", exc_info=refused or exc)
                self._fail(500, "Internal error while reading the request")
        except httptools.HttpParserUpgrade:
            # An upgrade offer (h2c, websocket) is declined by answering in HTTP/1.1
            # (RFC 9110 7.8); what follows it is not HTTP/1.1, so the connection ends.
            self._closing_after_replies()
        except httptools.HttpParserError as exc:
            self._fail(400, f"Bad Request: the request could not be read ({_reason(exc)})")
        else:
            if self._in_head:
                # An incomplete head: httptools holds the partial header until it ends, so
                # this chunk counts against the budgets (an upper bound when the head began
                # in it) until the head is complete.
                if not self.listener.hold(self, len(data)):
                    self._fail(503, "Service Unavailable: too many requests being read")
                    return
                self._head_held += len(data)
            if self._in_head and not self._begun:
                # A head that was already incomplete before this chunk and still is: all
                # of it is head (httptools would buffer a never-ending header).  A chunk in
                # which a request began is not counted: pipelined requests before it are
                # not head bytes, and the chunk size itself is bounded.
                self._head_wire += len(data)
                if self._head_wire > MAX_HEAD:
                    self._fail(431, "Request Header Fields Too Large")

    def eof_received(self) -> bool | None:
        return None  # the client is done sending: close (a waiting request is cancelled)

    # -- parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun = True
        self._head_wire = 0
        self._url = []
        self._headers = []
        self._body = None
        self._body_wanted = False
        self._discarded = 0
        self._head_bytes = 0
        self._in_head = True
        self._in_request = True
        self.request_started = self._loop.time()

    def _hold(self, size: int) -> None:
        """Account ``size`` more bytes held for the request being read."""
        if not self.listener.hold(self, size):
            raise _Refuse(503, "Service Unavailable: too many requests being read")
        self._request_bytes += size

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD:
            raise _Refuse(414, "URI Too Long")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD:
            raise _Refuse(431, "Request Header Fields Too Large")
        if len(self._headers) >= MAX_HEADERS:
            raise _Refuse(431, "Request Header Fields Too Large: too many headers")
        self._head_bytes += 64  # the strings' and the tuple's overhead
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_wire = 0
        if self._head_held:  # the wire bytes of the head become the parsed request's
            self.listener.release(self, self._head_held)
            self._head_held = 0
        self._hold(self._head_bytes)
        target = (self._url[0] if len(self._url) == 1 else b"".join(self._url)).decode("latin-1")
        self._body_wanted = classify(target).route in _BODY_ROUTES
        if (
            self._task is None
            and not self._queue
            and self.transport is not None
            and any(k == "expect" and v.lower() == "100-continue" for k, v in self._headers)
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if not self._body_wanted:
            # The token routes take no body: read and drop it, never hold it.
            self._discarded += len(body)
            if self._discarded > MAX_DISCARD:
                raise _Refuse(413, "Request Entity Too Large")
            return
        if self._body is None:
            self._body = bytearray()
        if len(self._body) + len(body) > MAX_PROXY_BODY:
            raise _Refuse(413, "Request Entity Too Large")
        self._hold(len(body))
        self._body += body

    def on_message_complete(self) -> None:
        self._in_request = False
        parser = self.parser
        request = Request(
            method=parser.get_method().decode("latin-1"),
            target=(self._url[0] if len(self._url) == 1 else b"".join(self._url)).decode("latin-1"),
            headers=self._headers,
            peer_ip=self.peer_ip,
            ifindex=self.ifindex,
            keep_alive=parser.should_keep_alive(),
            body=bytes(self._body) if self._body else b"",
            size=self._request_bytes,
        )
        self._body = None
        self._request_bytes = 0
        if self._task is not None or self._queue or self._write_paused:
            self._queue.append(request)
            self._queued_bytes += request.size
            if len(self._queue) >= MAX_PIPELINED or self._queued_bytes >= MAX_QUEUED_BYTES:
                self._pause_reading()
            return
        self._serve(request)

    # -- answering -----------------------------------------------------------

    def _serve(self, request: Request) -> None:
        keep_alive = request.keep_alive and not self.listener.closing
        if not keep_alive:
            self._closing = True  # nothing after this request is read
            self._pause_reading()
        else:
            data = self.handler.fast(request)
            if data is not None:
                assert self.transport is not None
                self.listener.release(self, request.size)
                self.transport.write(data)
                return
        self._task = self._loop.create_task(self._answer(request, keep_alive))

    async def _answer(self, request: Request, keep_alive: bool) -> None:
        try:
            reply = await self.handler(request)
        except Exception:  # the handler answers every error itself; this is a last resort
            log.exception("unexpected error answering a request")
            reply = replies.internal_error()
        finally:
            self.listener.release(self, request.size)
        self.last_activity = self._loop.time()
        transport = self.transport
        if transport is None:
            return
        close = (
            not keep_alive
            or reply.close
            or self.listener.closing
            or (self._closing and not self._queue)  # nothing more will be read or answered
        )
        transport.write(encode(reply, close=close, head_only=request.method == "HEAD"))
        self._task = None
        if close:
            self._closing = True
            self._queue.clear()
            transport.close()
            return
        self._next()

    def _next(self) -> None:
        """Answer requests that queued behind a slow one, in order."""
        while self._queue and self._task is None and not self._write_paused:
            item = self._queue.popleft()
            if isinstance(item, Reply):
                self._write_and_close(item)
                return
            self._queued_bytes -= item.size
            self._serve(item)
        if (
            self._paused_reading
            and len(self._queue) < MAX_PIPELINED
            and self._queued_bytes < MAX_QUEUED_BYTES
            and not self._write_paused
        ):
            self._paused_reading = False
            if self.transport is not None and not self._closing:
                self.transport.resume_reading()
        if self._closing and self._task is None and not self._queue and self.transport:
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def _fail(self, status: int, description: str) -> None:
        """The request stream is broken: answer (after earlier replies), then close."""
        if self._closing:
            return  # bytes after the connection's last request: never read, never answered
        self.handler.protocol_error(self.peer_ip, status, description)
        code = {429: "too_many_requests", 500: "server_error", 503: "server_error"}.get(
            status, "invalid_request"
        )
        reply = replies.error(status, code, description)  # 429: with Retry-After
        reply.close = True
        self._closing = True
        self._in_request = False
        self._pause_reading()
        if self._task is not None or self._queue or self._write_paused:
            self._queue.append(reply)
        else:
            self._write_and_close(reply)

    def _write_and_close(self, reply: Reply) -> None:
        """Send an error and end the connection, lingering so that the reply arrives.

        The client may still be sending (the rest of a refused body or header):
        closing with unread data makes the kernel answer with a reset, which can
        destroy the reply before the client reads it.  So the sending side is shut,
        what still arrives is read and dropped, and the socket closes when the
        client closes its side or after ``LINGER`` seconds (the listener's sweep).
        """
        self._queue.clear()
        transport = self.transport
        if transport is None:
            return
        transport.write(encode(reply, close=True))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.lingering_until = self._loop.time() + LINGER
        if self._paused_reading:
            self._paused_reading = False
            transport.resume_reading()

    def _closing_after_replies(self) -> None:
        self._closing = True
        self._pause_reading()
        if self._task is None and not self._queue and self.transport is not None:
            self.transport.close()

    # -- the listener's sweep ------------------------------------------------

    @property
    def idle(self) -> bool:
        return self._task is None and not self._queue and not self._in_request

    def sweep(
        self, now: float, *, keepalive: float, request_timeout: float, write_timeout: float
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.lingering_until:
            if now > self.lingering_until:
                transport.close()
        elif self._write_paused and now - self.write_paused_at > write_timeout:
            transport.abort()  # it stopped reading its replies
        elif (
            self._in_request and self._task is None and now - self.request_started > request_timeout
        ):
            self._fail(408, "Request Timeout: the request was not completed in time")
        elif self.idle and now - self.last_activity > keepalive:
            transport.close()

    def shutdown(self) -> None:
        """Stop after the reply in progress (idle connections end now)."""
        transport = self.transport
        if transport is None:
            return
        if self.idle:
            self._closing = True
            transport.close()
        else:
            self._closing_after_replies()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:120]
