"""The access log's two writers agree, and request stats fold into Prometheus families."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from nmi.config import LogFormat
from nmi.ops.accesslog import FLUSH_LINES, AccessLog
from nmi.ops.metrics import LATENCY_BUCKETS, RequestStats

FIXED = {
    "route": "token",
    "method": "GET",
    "status": 200,
    "ip": "10.0.0.7",
    "namespace": "ns",
    "pod": "web-1",
    "identity": "ns/my id",
    "resource": "https://vault.azure.net",
    "cache": "hit",
}


@pytest.fixture(autouse=True)
def _access_log_on() -> None:
    logging.getLogger("nmi.access").setLevel(logging.INFO)


@pytest.mark.parametrize("fmt", [LogFormat.TEXT, LogFormat.JSON])
def test_prefixed_lines_equal_plain_lines(fmt: LogFormat) -> None:
    plain, prefixed = io.StringIO(), io.StringIO()
    a = AccessLog(fmt=fmt, stream=plain)
    b = AccessLog(fmt=fmt, stream=prefixed)
    a.write({**FIXED, "latency_ms": 0.042, "client_request_id": "abc def"})
    b.write_prefixed(b.prefix(FIXED), 0.042, "abc def")
    a.flush()
    b.flush()
    strip = (lambda line: line.split(" ", 2)[2]) if fmt is LogFormat.TEXT else json.loads
    one, two = plain.getvalue().rstrip("\n"), prefixed.getvalue().rstrip("\n")
    if fmt is LogFormat.JSON:
        first, second = json.loads(one), json.loads(two)
        assert first.pop("ts") and second.pop("ts")
        assert first == second
    else:
        assert strip(one) == strip(two)
        assert 'identity="ns/my id"' in two and 'client_request_id="abc def"' in two


class Stream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed = asyncio.Event()

    def flush(self) -> None:
        self.flushed.set()


async def test_lines_are_batched_then_written() -> None:
    out = Stream()
    log = AccessLog(fmt=LogFormat.TEXT, stream=out)
    prefix = log.prefix(FIXED)
    log.write_prefixed(prefix, 1.0, "")
    log.write_prefixed(prefix, 2.0, "")
    assert out.getvalue() == ""  # held for one write
    await asyncio.wait_for(out.flushed.wait(), 5)
    assert out.getvalue().count("\n") == 2  # written by the timer, together
    for i in range(FLUSH_LINES):
        log.write_prefixed(prefix, float(i), "")
    assert out.getvalue().count("\n") == 2 + FLUSH_LINES  # a full batch goes at once


def test_without_a_loop_lines_are_written_at_once() -> None:
    out = io.StringIO()
    log = AccessLog(fmt=LogFormat.TEXT, stream=out)
    log.write({"route": "token"})
    assert out.getvalue().count("\n") == 1


def test_request_stats_fold_into_families() -> None:
    stats = RequestStats()
    stats.observe("token", 200, 0.0004, "ns", "https://vault.azure.net")
    stats.observe("token", 200, 0.003, "ns", "https://vault.azure.net")
    stats.observe("token", 400, 0.001, "other-ns", "other")
    stats.observe("proxy", 200, 100.0, "", "")
    families = {f.name: f for f in stats.collect()}
    requests = {
        (s.labels["route"], s.labels["status"]): s.value for s in families["nmi_requests"].samples
    }
    assert requests == {("token", "200"): 2, ("token", "400"): 1, ("proxy", "200"): 1}
    route = {
        (s.name, s.labels.get("le")): s.value
        for s in families["nmi_request_duration_seconds"].samples
        if s.labels["route"] == "token"
    }
    assert route[("nmi_request_duration_seconds_bucket", "0.0005")] == 1
    assert route[("nmi_request_duration_seconds_bucket", "0.001")] == 2  # le is inclusive
    assert route[("nmi_request_duration_seconds_bucket", "0.005")] == 3
    assert route[("nmi_request_duration_seconds_bucket", "+Inf")] == 3
    assert route[("nmi_request_duration_seconds_count", None)] == 3
    assert route[("nmi_request_duration_seconds_sum", None)] == pytest.approx(0.0044)
    proxy_inf = [
        s.value
        for s in families["nmi_request_duration_seconds"].samples
        if s.labels["route"] == "proxy" and s.labels.get("le") == "+Inf"
    ]
    assert proxy_inf == [1]  # above the last bound (60 s) still counts
    compat = families["aadpodidentity_nmi_operations_duration_seconds"].samples
    assert {s.labels["namespace"] for s in compat} == {"ns", "other-ns"}  # token routes only
    assert len(LATENCY_BUCKETS) + 3 == len(
        [s for s in compat if s.labels["namespace"] == "other-ns"]
    )


def test_request_stats_are_bounded() -> None:
    stats = RequestStats(max_series=2)
    for i in range(10):
        stats.observe("token", 200, 0.001, f"ns-{i}", "other")
    families = {f.name: f for f in stats.collect()}
    namespaces = {
        s.labels["namespace"]
        for s in families["aadpodidentity_nmi_operations_duration_seconds"].samples
    }
    assert namespaces == {"ns-0", "ns-1", "(other)"}


def test_repeated_refusals_leave_one_line_per_interval_with_the_count() -> None:
    from nmi.imds.bookkeeping import DenialLines

    now = [100.0]
    lines = DenialLines(interval=10.0, clock=lambda: now[0])
    assert lines.admit("10.0.0.1", 400, "token") == 0
    assert [lines.admit("10.0.0.1", 400, "token") for _ in range(500)] == [None] * 500
    assert lines.admit("10.0.0.2", 400, "token") == 0  # another pod: its own line
    assert lines.admit("10.0.0.1", 404, "token") == 0  # another status: its own line
    now[0] += 10.0
    assert lines.admit("10.0.0.1", 400, "token") == 500  # the count rides on the next line
    assert lines.suppressed == 500


def test_the_render_cache_is_bounded_in_bytes() -> None:
    from nmi.imds.replies import TokenBodies

    bodies = TokenBodies(max_entries=10_000, max_bytes=200_000)
    for i in range(500):
        bodies.response(
            access_token="t" * 2000 + str(i),
            client_id="c",
            expires_on=2_000_000_000,
            not_before=0,
            now=1_000_000_000,
            resource="r",
            token_type="Bearer",
        )
        assert bodies.bytes <= 200_000
