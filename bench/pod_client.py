"""A token client the benchmark runs *inside a pod's network namespace* (stdlib only).

Two modes, each printing one JSON object on stdout:

``burst N``
    Opens N connections to the metadata address first, then sends one token
    request on every connection at the same moment: N concurrent first
    requests, for the cold-path measurement.  Reports every status, the
    latencies (ms, from send to the complete reply) and how many distinct
    access tokens came back.

``paced RATE DURATION CONNECTIONS``
    A fixed request rate over keep-alive connections for a bounded time (the
    soak): request k is due at ``start + k / RATE`` and goes out on
    connection ``k mod CONNECTIONS`` as soon as that connection is free.
    Latency counts from the due time, so a stall shows up in it instead of
    silently lowering the rate.

usage: pod_client.py burst N HOST PATH
       pod_client.py paced RATE DURATION CONNECTIONS HOST PATH
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import sys
import time
from typing import Any

TIMEOUT = 30.0


def _request(host: str, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nMetadata: true\r\nUser-Agent: nmi-bench\r\n\r\n"
    ).encode()


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return status, body


def _token_digest(body: bytes) -> str:
    try:
        token = json.loads(body).get("access_token", "")
    except (ValueError, AttributeError):
        token = ""
    return hashlib.sha256(str(token).encode()).hexdigest()[:16] if token else ""


async def burst(count: int, host: str, path: str) -> dict[str, Any]:
    conns = await asyncio.gather(
        *(asyncio.wait_for(asyncio.open_connection(host, 80), TIMEOUT) for _ in range(count))
    )
    request = _request(host, path)
    go = asyncio.Event()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
        await go.wait()
        started = time.perf_counter()
        writer.write(request)
        try:
            status, body = await asyncio.wait_for(_read_reply(reader), TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            return {"status": 0, "ms": (time.perf_counter() - started) * 1000, "error": repr(exc)}
        finally:
            writer.close()
        return {
            "status": status,
            "ms": (time.perf_counter() - started) * 1000,
            "token": _token_digest(body),
        }

    tasks = [asyncio.create_task(one(r, w)) for r, w in conns]
    await asyncio.sleep(0.05)  # every task is parked on the event
    go.set()
    results = await asyncio.gather(*tasks)
    return {
        "statuses": dict(collections.Counter(str(r["status"]) for r in results)),
        "latencies_ms": sorted(r["ms"] for r in results),
        "distinct_tokens": len({r["token"] for r in results if r.get("token")}),
        "errors": [r["error"] for r in results if "error" in r][:5],
    }


async def paced(
    rate: float, duration: float, connections: int, host: str, path: str
) -> dict[str, Any]:
    request = _request(host, path)
    total = int(rate * duration)
    start = time.perf_counter() + 0.2
    deadline = start + duration + TIMEOUT
    latencies: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    reconnects = 0

    async def worker(index: int) -> None:
        nonlocal reconnects
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for k in range(index, total, connections):
            due = start + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() > deadline:
                statuses["not_sent"] += 1
                continue
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, 80), TIMEOUT)
                    reconnects += 1
                conn[1].write(request)
                status, _ = await asyncio.wait_for(_read_reply(conn[0]), TIMEOUT)
                statuses[str(status)] += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                statuses["error"] += 1
                if len(errors) < 5:
                    errors.append(repr(exc))
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            latencies.append((time.perf_counter() - due) * 1000)
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    summary: dict[str, float] = {}
    if latencies:
        for label, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999)):
            summary[label] = latencies[min(len(latencies) - 1, int(len(latencies) * q))]
        summary["max"] = latencies[-1]
    return {
        "scheduled": total,
        "elapsed_s": elapsed,
        "achieved_rps": sum(statuses.values()) / elapsed if elapsed > 0 else 0.0,
        "statuses": dict(statuses),
        "connections_opened": reconnects,
        "latency_ms": summary,
        "errors": errors,
    }


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "burst":
        result = asyncio.run(burst(int(argv[1]), argv[2], argv[3]))
    elif len(argv) == 6 and argv[0] == "paced":
        result = asyncio.run(paced(float(argv[1]), float(argv[2]), int(argv[3]), argv[4], argv[5]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
