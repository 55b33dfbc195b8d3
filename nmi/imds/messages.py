"""HTTP/1.1 messages of the token listener: the request as parsed, the reply as sent.

The listener speaks HTTP/1.1 itself (``connection.py``) instead of through a
web framework: a cache hit is then one parse and one ``write`` of bytes that
were rendered at most once a second.  These are the plain values that pass
between the connection and the request handler, and the one function that
turns a reply into bytes on the wire (with the ``Date``, ``Server``,
``Content-Length`` and, when the connection ends, ``Connection: close``
headers every reply carries).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

SERVER = b"nmi"
JSON = "application/json; charset=utf-8"

_STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Unknown\r\n".encode()


class HttpDate:
    """The ``Date`` header value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> tuple[int, bytes]:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode()
        return second, self._value


CLOCK = HttpDate()


@dataclass(slots=True)
class Request:
    """One parsed request.  ``target`` is the raw request target (latin-1 decoded)."""

    method: str
    target: str
    headers: list[tuple[str, str]]  # as received, names lower-cased
    peer_ip: str
    ifindex: int = 0  # the interface the connection arrived through (0: unknown)
    keep_alive: bool = True
    body: bytes = b""
    size: int = 0  # bytes of the connection's budget it holds (see Listener.hold)

    def header(self, name: str, default: str = "") -> str:
        """The first value of a header (``name`` in lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return default


@dataclass(slots=True)
class Reply:
    """A complete reply: nmi's answers are small and never streamed."""

    status: int
    body: bytes = b""
    content_type: str | None = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False  # end the connection after this reply


def _clean(text: str) -> bytes:
    # Header values come from nmi or from the node IMDS's parsed answer; a CR or LF
    # would still split the header, so they are dropped rather than trusted.
    data = text.encode("latin-1", "replace")
    return data.replace(b"\r", b"").replace(b"\n", b"") if b"\r" in data or b"\n" in data else data


def encode(reply: Reply, *, close: bool, head_only: bool = False) -> bytes:
    """The reply as bytes on the wire (``close`` adds ``Connection: close``)."""
    _, date = CLOCK.now()
    parts = [
        status_line(reply.status),
        b"Date: " + date + b"\r\nServer: " + SERVER + b"\r\n",
    ]
    if reply.content_type is not None:
        parts.append(b"Content-Type: " + _clean(reply.content_type) + b"\r\n")
    for key, value in reply.headers:
        parts.append(_clean(key) + b": " + _clean(value) + b"\r\n")
    parts.append(b"Content-Length: " + str(len(reply.body)).encode() + b"\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(reply.body)
    return b"".join(parts)
