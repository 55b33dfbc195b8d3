"""Prometheus metrics on ``--prometheus-address:--prometheus-port``/metrics.

Label sets are bounded: routes are classes (never raw paths), resources are
never labels (a pod chooses them), identity types are 0/1/2/node.  Counters
that already exist as plain integers elsewhere (token cache, watches) are
read at scrape time by a collector, so the request path pays nothing for
them; the per-request series are plain-integer histograms (``RequestStats``)
turned into metric families only when scraped.  The aad-pod-identity names
are exported too, with bounded labels, where their meaning is the same, so
existing dashboards keep working:

* ``aadpodidentity_nmi_operations_duration_seconds`` (``operation_type`` = the
  route's canonical path, ``status_code``, ``namespace`` = the pod's, and
  ``resource`` only for well-known Azure resources, else ``other``)
* ``aadpodidentity_imds_operations_duration_seconds`` /
  ``aadpodidentity_imds_operations_errors_count`` (``operation_type`` =
  ``adal_token_msi``, ``adal_token_msi_userassignedid``, ``adal_token``)
* ``aadpodidentity_kubernetes_api_operations_errors_count``
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 120)

KNOWN_RESOURCES = frozenset(
    {
        "https://management.azure.com",
        "https://management.core.windows.net",
        "https://vault.azure.net",
        "https://storage.azure.com",
        "https://database.windows.net",
        "https://graph.microsoft.com",
        "https://ossrdbms-aad.database.windows.net",
        "https://eventhubs.azure.net",
        "https://servicebus.azure.net",
        "https://cognitiveservices.azure.com",
        "https://monitor.azure.com",
    }
)

ROUTE_PATHS = {
    "token": "/metadata/identity/oauth2/token",
    "host_token": "/host/token",
    "identity_other": "/metadata/identity",
    "instance": "/metadata/instance",
    "proxy": "/metadata",
    "invalid": "invalid",
}

IMDS_OPERATION = {"0": "adal_token_msi_userassignedid", "node": "adal_token_msi"}


@functools.lru_cache(maxsize=1024)
def resource_label(resource: str) -> str:
    return resource.rstrip("/") if resource.rstrip("/") in KNOWN_RESOURCES else "other"


OVERFLOW_NAMESPACE = "(other)"  # not a valid namespace name: no collision


class RequestStats:
    """Request counts and latencies as plain integers, exported when scraped.

    One series per (route, status, namespace, resource label); a request costs
    a dictionary lookup, a bisect and two additions.  Scraping folds the series
    into ``nmi_requests_total``, ``nmi_request_duration_seconds`` (by route) and
    the aad-pod-identity compatible ``aadpodidentity_nmi_operations_duration_seconds``.
    """

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS, max_series: int = 10_000):
        self.buckets = buckets
        self.max_series = max_series
        # [count in bucket 0 .. n-1, count above the last bound, sum of seconds]
        self._series: dict[tuple[str, int, str, str], list[float]] = {}
        self._width = len(buckets) + 2
        self._labels = [repr(float(bound)) for bound in buckets]  # as prometheus_client: "1.0"

    def observe(
        self, route: str, status: int, seconds: float, namespace: str, resource: str
    ) -> None:
        key = (route, status, namespace, resource)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= self.max_series:
                key = (route, status, OVERFLOW_NAMESPACE, resource)
                series = self._series.get(key)
            if series is None:
                series = self._series[key] = [0] * self._width
        series[bisect_left(self.buckets, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        counts: dict[tuple[str, str], float] = {}
        by_route: dict[str, list[float]] = {}
        requests = CounterMetricFamily(
            "nmi_requests",
            "Requests served, by route class and status.",
            labels=["route", "status"],
        )
        durations = HistogramMetricFamily(
            "nmi_request_duration_seconds", "Time to answer a request.", labels=["route"]
        )
        compat = HistogramMetricFamily(
            "aadpodidentity_nmi_operations_duration_seconds",
            "aad-pod-identity compatible request latency (bounded labels).",
            labels=["operation_type", "status_code", "namespace", "resource"],
        )
        for (route, status, namespace, resource), series in list(self._series.items()):
            key = (route, str(status))
            counts[key] = counts.get(key, 0) + sum(series[:-1])
            total = by_route.setdefault(route, [0] * self._width)
            for i, value in enumerate(series):
                total[i] += value
            if route in ("token", "host_token"):
                compat.add_metric(
                    [ROUTE_PATHS[route], str(status), namespace, resource],
                    self._buckets(series),
                    series[-1],
                )
        for (route, status_text), count in counts.items():
            requests.add_metric([route, status_text], count)
        for route, series in by_route.items():
            durations.add_metric([route], self._buckets(series), series[-1])
        yield requests
        yield durations
        yield compat

    def _buckets(self, series: list[float]) -> list[tuple[str, float]]:
        cumulative = 0.0
        out: list[tuple[str, float]] = []
        for label, count in zip(self._labels, series, strict=False):
            cumulative += count
            out.append((label, cumulative))
        out.append(("+Inf", cumulative + series[len(self.buckets)]))
        return out


class Metrics:
    """All of nmi's metrics in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = RequestStats()
        r.register(_FnCollector(self.requests.collect))
        self.upstream_seconds = Histogram(
            "nmi_upstream_request_duration_seconds",
            "Upstream token calls (Azure AD, IMDS).",
            ["source", "identity_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "nmi_upstream_errors",
            "Failed upstream token calls.",
            ["source", "identity_type", "retryable"],
            registry=r,
        )
        self.compat_imds_seconds = Histogram(
            "aadpodidentity_imds_operations_duration_seconds",
            "aad-pod-identity compatible upstream token latency.",
            ["operation_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compat_imds_errors = ExactCounter(
            "aadpodidentity_imds_operations_errors_count",
            "aad-pod-identity compatible upstream token errors.",
            ["operation_type"],
            registry=r,
        )
        self.assignment_wait = Histogram(
            "nmi_assignment_wait_seconds",
            "Time a request waited for its AzureAssignedIdentity (Created -> Assigned).",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.denials = Counter(
            "nmi_denied_requests",
            "Requests refused by the identity decision.",
            ["reason"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "nmi_event_loop_lag_seconds",
            "How late the event loop ran a periodic timer (blocking work shows here).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.reconciles = Counter(
            "nmi_iptables_reconcile",
            "iptables reconcile results.",
            ["result"],
            registry=r,
        )

    def observe_request(
        self, *, route: str, status: int, seconds: float, namespace: str, resource: str
    ) -> None:
        if route in ("token", "host_token"):
            self.requests.observe(route, status, seconds, namespace, resource_label(resource))
        else:
            self.requests.observe(route, status, seconds, "", "")

    def observe_upstream(
        self, *, source: str, identity_type: str, seconds: float, error: bool, retryable: bool
    ) -> None:
        self.upstream_seconds.labels(source, identity_type).observe(seconds)
        compat = IMDS_OPERATION.get(identity_type, "adal_token")
        self.compat_imds_seconds.labels(compat).observe(seconds)
        if error:
            self.upstream_errors.labels(source, identity_type, str(retryable).lower()).inc()
            self.compat_imds_errors.labels(compat).inc()

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_FnCollector(collect))

    async def handle(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


class _FnCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()

    def describe(self) -> Iterable[Metric]:
        return []


def counter(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float]]
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def gauge(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float]]
) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


def exact_counter(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[list[str], float]]
) -> Metric:
    """A counter under its exact name, without the ``_total`` prometheus_client appends.

    aad-pod-identity's names end in ``_count`` (OpenCensus exported them as is) and its
    users' dashboards query them so; the text format then calls such a series ``untyped``.
    """
    family = Metric(name, doc, "unknown")
    for label_values, value in values:
        family.add_sample(name, dict(zip(labels, label_values, strict=True)), value)
    return family


class ExactCounter(Collector):
    """A labelled counter exported by :func:`exact_counter` (``labels(...).inc()``)."""

    def __init__(
        self, name: str, doc: str, labels: Iterable[str] = (), *, registry: CollectorRegistry
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labels)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0
        registry.register(self)

    def labels(self, *values: str) -> _ExactChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected")
        return _ExactChild(self, tuple(str(v) for v in values))

    def inc(self, amount: float = 1.0) -> None:
        _ExactChild(self, ()).inc(amount)

    def value(self, *values: str) -> float:
        return self._values.get(tuple(values), 0.0)

    def collect(self) -> Iterator[Metric]:
        yield exact_counter(
            self.name, self.doc, self.labelnames, [(list(k), v) for k, v in self._values.items()]
        )

    def describe(self) -> Iterable[Metric]:
        return []


class _ExactChild:
    __slots__ = ("_counter", "_key")

    def __init__(self, counter: ExactCounter, key: tuple[str, ...]) -> None:
        self._counter, self._key = counter, key

    def inc(self, amount: float = 1.0) -> None:
        values = self._counter._values
        values[self._key] = values.get(self._key, 0.0) + amount


class Scrapable(Protocol):
    async def handle(self, request: web.Request) -> web.Response: ...


class MetricsServer:
    def __init__(self, metrics: Scrapable) -> None:
        self.metrics = metrics
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


__all__: list[Any] = ["Metrics", "MetricsServer", "counter", "gauge", "resource_label"]
