"""What every request leaves behind: a metric, an access-log line, and for a
refusal an Event on the pod and the identity's last error.

Why its own module: this is the per-request bookkeeping of both paths — the
synchronous cache hit (where it must cost almost nothing: the log line's
repeating part is rendered once per pod, identity and resource) and the full
path — and keeping it out of the routes leaves them a straight line from
request to reply.  Nothing here can fail a request: the access log batches
its writes, Events are queued and rate limited by the recorder.

A pod that loops on a refused request must not fill the node's disk: the lines
of refused requests (status 400 and above) are limited per address, status
and route to one every :data:`DENIAL_LOG_INTERVAL` seconds; the next line
that is written says how many were left out (``suppressed=N``).  Successful
requests are always logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..identity.decide import Deny
from ..kube.objects import Pod
from ..ops.accesslog import AccessLog
from ..ops.events import EventRecorder
from ..ops.last_errors import LastErrors
from ..ops.metrics import Metrics
from .failures import Failure
from .messages import Request
from .target import Route

log = logging.getLogger(__name__)

MAX_LINE_PREFIXES = 4096
MAX_CLIENT_REQUEST_ID = 64
DENIAL_LOG_INTERVAL = 10.0
MAX_DENIAL_KEYS = 4096


class DenialLines:
    """How many lines of a repeated refusal to leave out (per address, status, route)."""

    def __init__(
        self, *, interval: float = DENIAL_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._keys: dict[tuple[str, int, str], tuple[float, int]] = {}
        self.suppressed = 0

    def admit(self, ip: str, status: int, route: str) -> int | None:
        """None: leave this line out; else the number left out since the last one."""
        now = self._clock()
        key = (ip, status, route)
        found = self._keys.get(key)
        if found is not None and now - found[0] < self.interval:
            self._keys[key] = (found[0], found[1] + 1)
            self.suppressed += 1
            return None
        if found is None and len(self._keys) >= MAX_DENIAL_KEYS:
            self._prune(now)
        self._keys[key] = (now, 0)
        return found[1] if found is not None else 0

    def _prune(self, now: float) -> None:
        stale = [k for k, (t, _) in self._keys.items() if now - t >= self.interval]
        for key in stale:
            del self._keys[key]
        if len(self._keys) >= MAX_DENIAL_KEYS:
            self._keys.clear()  # a flood of addresses: forget, never grow


@dataclass(slots=True)
class Access:
    """What one request did, for the access log (never a token or a secret)."""

    route: str = "-"
    ip: str = ""
    pod: str = ""
    namespace: str = ""
    identity: str = ""
    resource: str = ""
    cache: str = "-"
    upstream_request_id: str = ""
    waited_ms: float = 0.0
    reason: str = ""


class Bookkeeping:
    def __init__(
        self,
        *,
        settings: Settings,
        metrics: Metrics | None = None,
        events: EventRecorder | None = None,
        last_errors: LastErrors | None = None,
    ) -> None:
        self.metrics = metrics
        self.events = events
        self.last_errors = last_errors
        self.access_log = AccessLog(fmt=settings.log_format)
        self.denial_lines = DenialLines()
        self._line_prefixes: dict[tuple[str, str, str, str, str], str] = {}

    # -- the cache-hit path -----------------------------------------------------

    def hit(self, request: Request, pod: Pod, identity: str, resource: str, seconds: float) -> None:
        """A token served from the cache on the synchronous path."""
        namespace = pod.meta.namespace
        if self.metrics is not None:
            self.metrics.observe_request(
                route="token", status=200, seconds=seconds, namespace=namespace, resource=resource
            )
        if not self.access_log.enabled:
            return
        key = (request.peer_ip, namespace, pod.meta.name, identity, resource)
        prefix = self._line_prefixes.get(key)
        if prefix is None:
            if len(self._line_prefixes) >= MAX_LINE_PREFIXES:
                self._line_prefixes.clear()
            prefix = self.access_log.prefix(
                {
                    "route": "token",
                    "method": "GET",
                    "status": 200,
                    "ip": request.peer_ip,
                    "namespace": namespace,
                    "pod": pod.meta.name,
                    "identity": identity,
                    "resource": resource,
                    "cache": "hit",
                }
            )
            self._line_prefixes[key] = prefix
        self.access_log.write_prefixed(
            prefix,
            round(seconds * 1000, 3),
            request.header("x-ms-client-request-id")[:MAX_CLIENT_REQUEST_ID],
        )

    # -- the full path ------------------------------------------------------------

    def finished(self, request: Request, access: Access, status: int, seconds: float) -> None:
        """Any request answered by the full path (status 499: the client went away)."""
        if self.metrics is not None:
            self.metrics.observe_request(
                route=access.route,
                status=status,
                seconds=seconds,
                namespace=access.namespace,
                resource=access.resource,
            )
        if not self.access_log.enabled:
            return
        suppressed = 0
        if status >= 400:
            admitted = self.denial_lines.admit(access.ip, status, access.route)
            if admitted is None:
                return
            suppressed = admitted
        fields: dict[str, Any] = {
            "route": access.route,
            "method": request.method,
            "status": status,
            "ip": access.ip,
            "namespace": access.namespace,
            "pod": access.pod,
            "identity": access.identity,
            "resource": access.resource,
            "cache": access.cache,
            "latency_ms": round(seconds * 1000, 3),
        }
        if access.waited_ms:
            fields["waited_ms"] = round(access.waited_ms, 1)
        if access.upstream_request_id:
            fields["upstream_request_id"] = access.upstream_request_id
        client_request = request.header("x-ms-client-request-id")
        if client_request:
            fields["client_request_id"] = client_request[:MAX_CLIENT_REQUEST_ID]
        if access.reason:
            fields["reason"] = access.reason
        if suppressed:
            fields["suppressed"] = suppressed
        self.access_log.write(fields)

    def failed(self, pod: Pod | None, failure: Failure, access: Access) -> None:
        """A request that ends without a token: the log's reason, the pod's Event, the
        identity's last error."""
        access.reason = failure.reason
        if pod is not None and failure.event is not None and self.events is not None:
            reason, message = failure.event
            self.events.record(pod, reason=reason, message=message)
        if failure.owner is not None and failure.summary and self.last_errors is not None:
            self.last_errors.record(failure.owner, failure.summary)

    def denied(self, decision_kind: str) -> None:
        if self.metrics is not None:
            self.metrics.denials.labels(decision_kind).inc()

    def waited(self, seconds: float, decision: object) -> None:
        """Time a request waited for the controller (not a new pod's grace running out)."""
        if (
            seconds > 0.001
            and self.metrics is not None
            and not (isinstance(decision, Deny) and decision.kind == "not_found")
        ):
            self.metrics.assignment_wait.observe(seconds)

    # -- the connection -------------------------------------------------------------

    def protocol_error(self, peer_ip: str, status: int, reason: str) -> None:
        """A request the connection could not read (it answers with JSON and closes)."""
        log.debug("unreadable request from %s: %s", peer_ip, reason)
        if self.metrics is not None:
            self.metrics.observe_request(
                route=Route.INVALID.value, status=status, seconds=0.0, namespace="", resource=""
            )
        if self.access_log.enabled:
            admitted = self.denial_lines.admit(peer_ip, status, Route.INVALID.value)
            if admitted is None:
                return
            fields: dict[str, Any] = {
                "route": Route.INVALID.value,
                "status": status,
                "ip": peer_ip,
                "reason": reason,
            }
            if admitted:
                fields["suppressed"] = admitted
            self.access_log.write(fields)

    def flush(self) -> None:
        self.access_log.flush()
