"""A hostile pod, for the drills: the floods issue 10 reproduced against nmi.

Run inside a pod's network namespace (``python -m nmi_sandbox.attacker MODE ...``)
against the metadata address; prints one JSON line with what happened.  Used by
``tests/e2e/test_floods.py`` (small numbers, assertions) and ``bench/floods.py``
(the issue's numbers, figures).  Modes:

* ``body N SIZE``: N connections, each a token request with a SIZE-byte body;
* ``idle N SECONDS``: N connections that send nothing, held SECONDS;
* ``query N SIZE``: N valid token queries padded to SIZE bytes, all different;
* ``storm N``: N different spellings of one resource (a token each, if bound);
* ``denials N``: N refused token requests as fast as 8 connections allow;
* ``victim SECONDS INTERVAL``: a well-behaved pod: one token request every INTERVAL,
  its latencies reported (p50/p99/max) with the statuses.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

HOST = "169.254.169.254"
PORT = 80
TOKEN = "/metadata/identity/oauth2/token"
ARM = "https://management.azure.com"


def _request(query: str, *, body: int = 0, close: bool = False) -> bytes:
    head = (
        f"GET {TOKEN}?{query} HTTP/1.1\r\nHost: {HOST}\r\nMetadata: true\r\n"
        + (f"Content-Length: {body}\r\n" if body else "")
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode()


async def _reply(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def _connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, PORT)


async def body(n: int, size: int) -> dict[str, object]:
    statuses: Counter[str] = Counter()
    chunk = b"a" * 65536

    async def one() -> None:
        try:
            reader, writer = await _connect()
            writer.write(_request(f"api-version=2018-02-01&resource={ARM}", body=size))
            left = size
            while left > 0:
                writer.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
                await writer.drain()
            statuses[str(await asyncio.wait_for(_reply(reader), 30))] += 1
            writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            statuses[type(exc).__name__] += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return {"statuses": dict(statuses)}


async def idle(n: int, seconds: float) -> dict[str, object]:
    held: list[asyncio.StreamWriter] = []
    errors: Counter[str] = Counter()
    for _ in range(n):
        try:
            _, writer = await asyncio.wait_for(_connect(), 5)
        except (OSError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1
            continue
        held.append(writer)
    print(json.dumps({"held": len(held)}), flush=True)  # the drill measures nmi now
    await asyncio.sleep(seconds)
    for writer in held:
        writer.close()
    return {"opened": len(held), "errors": dict(errors)}


async def query(n: int, size: int) -> dict[str, object]:
    statuses: Counter[int] = Counter()
    reader, writer = await _connect()
    base = f"api-version=2018-02-01&resource={ARM}&pad="
    for i in range(n):
        pad = str(i).rjust(max(size - len(base), 1), "x")
        writer.write(_request(base + pad))
        statuses[await _reply(reader)] += 1
    writer.close()
    return {"statuses": dict(statuses)}


async def storm(n: int) -> dict[str, object]:
    statuses: Counter[int] = Counter()
    reader, writer = await _connect()
    for i in range(n):
        writer.write(_request(f"api-version=2018-02-01&resource={ARM}{'/' * (i + 1)}"))
        statuses[await _reply(reader)] += 1
    writer.close()
    return {"statuses": dict(statuses)}


async def denials(n: int) -> dict[str, object]:
    statuses: Counter[int] = Counter()
    per = n // 8

    async def one() -> None:
        reader, writer = await _connect()
        for _ in range(per):
            writer.write(_request(f"api-version=2018-02-01&resource={ARM}"))
            statuses[await _reply(reader)] += 1
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(8)))
    return {"statuses": dict(statuses), "seconds": round(time.monotonic() - started, 2)}


async def victim(seconds: float, interval: float) -> dict[str, object]:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    end = time.monotonic() + seconds
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            if conn is None:
                conn = await asyncio.wait_for(_connect(), 5)
            reader, writer = conn
            writer.write(_request(f"api-version=2018-02-01&resource={ARM}"))
            statuses[str(await asyncio.wait_for(_reply(reader), 10))] += 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            statuses[type(exc).__name__] += 1
            conn = None
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
    ordered = sorted(latencies) or [0.0]
    return {
        "requests": len(latencies),
        "statuses": dict(statuses),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


MODES: dict[str, Callable[[list[str]], Coroutine[Any, Any, dict[str, object]]]] = {
    "body": lambda a: body(int(a[0]), int(a[1])),
    "idle": lambda a: idle(int(a[0]), float(a[1])),
    "query": lambda a: query(int(a[0]), int(a[1])),
    "storm": lambda a: storm(int(a[0])),
    "denials": lambda a: denials(int(a[0])),
    "victim": lambda a: victim(float(a[0]), float(a[1])),
}


def main(argv: Sequence[str]) -> int:
    mode, *args = argv
    result = asyncio.run(MODES[mode](list(args)))
    print(json.dumps({"mode": mode, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
