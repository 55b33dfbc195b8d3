"""Sequential keep-alive HTTP client for the benchmarks, run as its own process.

usage: http_client.py HOST PORT SOURCE_IP TARGET COUNT -> one JSON line of latency stats
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import time


def main() -> None:
    host, port, source, target, count = sys.argv[1:6]
    conn = http.client.HTTPConnection(host, int(port), source_address=(source, 0), timeout=30)
    headers = {"Metadata": "true"}
    samples: list[float] = []
    errors = 0
    for _ in range(int(count)):
        started = time.perf_counter()
        conn.request("GET", target, headers=headers)
        response = conn.getresponse()
        response.read()
        samples.append((time.perf_counter() - started) * 1000)
        if response.status != 200:
            errors += 1
    conn.close()
    samples.sort()
    print(
        json.dumps(
            {
                "n": len(samples),
                "errors": errors,
                "p50_ms": statistics.median(samples),
                "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
                "mean_ms": statistics.fmean(samples),
            }
        )
    )


if __name__ == "__main__":
    main()
