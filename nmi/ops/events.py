"""Kubernetes Events on the pod when its token request is refused or fails (and on
the objects the controller and the node guard report about).

Why: an application owner sees "Identity not found" in their SDK's stack trace
and nothing else; the reason (no binding selects the pod's label, MIC has not
assigned the identity yet, Azure AD rejected the secret) lives in nmi's logs on
one node, which they usually cannot read.  ``kubectl describe pod`` shows the
pod's Events, so nmi writes one there: the same answer in the place people
look first.

Constraints that shape this module:

* The request path must never wait for the API server, nor fail because of
  it: :meth:`EventRecorder.record` is synchronous, puts the Event on a bounded
  queue and returns; :meth:`EventRecorder.run` sends in the background and
  only counts and logs its failures.
* A pod retrying in a tight loop must not flood the API server (nor etcd):
  at most one Event per (pod UID, reason) per ``per_pod_interval`` seconds,
  plus a global token bucket.  Occurrences in between are counted and folded
  into the next Event (``count``, and "(12 more in the last 60s)" in the
  message); if none follows, a summary Event is sent once the interval is over.
* Messages are shown to anyone who can read the pod's Events: they never carry
  a token, a secret or a full client id.  Callers write them from redacted
  parts, and :func:`scrub` redacts GUIDs and JWT-looking strings again as a
  last line of defence.
* Each emitted occurrence is a new core/v1 Event (POST only: :class:`KubeApi`
  has no PATCH, and rate limiting already keeps the number of objects small).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from ..kube.changes import ChangeSignal
from ..kube.objects import Pod
from .logs import redact_id as redact

log = logging.getLogger(__name__)

# Reasons (CamelCase, as Kubernetes reasons are).
IDENTITY_NOT_FOUND = "IdentityNotFound"
MULTIPLE_IDENTITIES = "MultipleIdentities"
IDENTITY_NOT_ASSIGNED = "IdentityNotAssigned"
TOKEN_REQUEST_FAILED = "TokenRequestFailed"
IDENTITY_MISCONFIGURED = "IdentityMisconfigured"
INTERCEPTION_BYPASSED = "InterceptionBypassed"  # on the node

REASONS = (
    IDENTITY_NOT_FOUND,
    MULTIPLE_IDENTITIES,
    IDENTITY_NOT_ASSIGNED,
    TOKEN_REQUEST_FAILED,
    IDENTITY_MISCONFIGURED,
)

WARNING = "Warning"
NORMAL = "Normal"
ACTION_GET_TOKEN = "GetToken"

MAX_MESSAGE = 1024  # events.k8s.io caps the note at 1 kB; stay within it for both views
MAX_NAME = 253

_GUID = re.compile(
    r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def scrub(message: str) -> str:
    """Redact ids and anything token-shaped, and bound the length."""
    text = _JWT.sub("[redacted]", message)
    text = _GUID.sub(lambda m: redact(m.group(0)), text)
    text = " ".join(text.split())  # no control characters or line breaks
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    return text


def rfc3339(epoch: float, *, micro: bool = False) -> str:
    """``2006-01-02T15:04:05Z`` (metav1.Time) or with microseconds (metav1.MicroTime)."""
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    if micro:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- what an Event is about ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Involved:
    """The object an Event is about (its ``involvedObject``)."""

    kind: str
    api_version: str
    namespace: str  # "" for cluster-scoped objects (their Events live in "default")
    name: str
    uid: str = ""

    @property
    def key(self) -> str:
        return self.uid or f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def event_namespace(self) -> str:
        return self.namespace or "default"


def about(obj: Pod | Involved) -> Involved:
    if isinstance(obj, Involved):
        return obj
    return Involved("Pod", "v1", obj.meta.namespace, obj.meta.name, obj.meta.uid)


def node(name: str, uid: str = "") -> Involved:
    return Involved("Node", "v1", "", name, uid)


# -- the recorder ----------------------------------------------------------------


class PostResponse(Protocol):
    """The part of :class:`aiohttp.ClientResponse` the sender uses."""

    @property
    def status(self) -> int: ...

    async def read(self) -> bytes: ...

    def release(self) -> Any: ...


class EventApi(Protocol):
    """What the recorder needs from an API client (:class:`~nmi.kube.client.KubeApi`)."""

    async def post(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> PostResponse: ...


@dataclass(slots=True)
class _KeyState:
    """Rate-limiting state of one (pod UID, reason)."""

    last_emitted: float  # clock() of the last Event sent (or -inf)
    pending: int = 0  # occurrences not reported yet
    pending_first: float = 0.0  # wall time of the first unreported occurrence
    pending_last: float = 0.0  # wall time of the last unreported occurrence
    about: Involved | None = None
    message: str = ""
    type: str = WARNING
    action: str = ACTION_GET_TOKEN


@dataclass(frozen=True, slots=True)
class _Outgoing:
    namespace: str
    body: dict[str, Any]


class EventRecorder:
    """Rate-limited, non-blocking Kubernetes Events about pods.

    ``record`` must be called from the event loop's thread (the request path
    is); ``run`` is the one background sender.
    """

    def __init__(
        self,
        *,
        api: EventApi,
        node_name: str,
        component: str = "nmi",
        burst: int = 5,
        per_pod_interval: float = 60.0,
        queue_size: int = 1000,
        refill_per_second: float = 1.0,
        max_tracked: int = 10_000,
        request_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if burst < 1 or per_pod_interval < 0 or queue_size < 1 or refill_per_second <= 0:
            raise ValueError("burst and queue_size must be >= 1, intervals and rates positive")
        self.api = api
        self.node_name = node_name
        self.component = component
        self.burst = burst
        self.per_pod_interval = per_pod_interval
        self.refill_per_second = refill_per_second
        self.max_tracked = max_tracked
        self.request_timeout = request_timeout
        self._clock = clock
        self._wall = wall_clock
        self._queue: asyncio.Queue[_Outgoing] = asyncio.Queue(maxsize=queue_size)
        self._keys: dict[tuple[str, str], _KeyState] = {}
        self._tokens = float(burst)
        self._refilled_at = clock()
        self._last_name = 0
        self._wake: asyncio.Event | None = None
        self._failing = False
        self.progress = ChangeSignal()  # fires after every send attempt
        # Counters.
        self.recorded = 0  # calls to record()
        self.emitted = 0  # Events created on the API server
        self.suppressed = 0  # occurrences folded into a later Event by rate limiting
        self.dropped = 0  # queue full
        self.failed = 0  # API errors (the Event was lost)

    # -- request path: synchronous, never blocks, never raises ----------------

    def record(
        self,
        pod: Pod | Involved,
        *,
        reason: str,
        message: str,
        type: str = WARNING,
        action: str = ACTION_GET_TOKEN,
    ) -> None:
        """Note one occurrence; an Event is queued unless rate limiting folds it."""
        try:
            self._record(about(pod), reason=reason, message=message, type=type, action=action)
        except Exception:  # never let observability break a request
            log.debug("event not recorded", exc_info=True)

    def _record(
        self, target: Involved, *, reason: str, message: str, type: str, action: str
    ) -> None:
        self.recorded += 1
        now = self._clock()
        wall = self._wall()
        key = (target.key, reason)
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= self.max_tracked:
                self._prune(now)
            if len(self._keys) >= self.max_tracked:
                self.suppressed += 1  # cannot track more pods: stay quiet, never flood
                return
            state = _KeyState(last_emitted=float("-inf"))
            self._keys[key] = state
        # The latest occurrence speaks for the pending ones.
        if not state.pending:
            state.pending_first = wall
        state.pending += 1
        state.pending_last = wall
        state.about, state.message, state.type, state.action = target, message, type, action
        if now - state.last_emitted < self.per_pod_interval:
            self.suppressed += 1
            self._poke()
            return
        if self._queue.full():
            # The occurrence stays pending: a summary reports it once there is room.
            self.dropped += 1
            return
        if not self._take_token(now):
            self.suppressed += 1
            self._poke()
            return
        self._emit(key, state, now)

    def _take_token(self, now: float) -> bool:
        elapsed = max(now - self._refilled_at, 0.0)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.refill_per_second)
        self._refilled_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _emit(self, key: tuple[str, str], state: _KeyState, now: float) -> None:
        assert state.about is not None
        count = state.pending
        message = state.message
        if count > 1:
            window = max(state.pending_last - state.pending_first, 0.0)
            if state.last_emitted != float("-inf"):
                window = max(window, now - state.last_emitted)
            message = f"{message} ({count - 1} more in the last {_seconds(window)})"
        body = self.event_body(
            state.about,
            reason=key[1],
            message=message,
            type=state.type,
            action=state.action,
            count=count,
            first=state.pending_first,
            last=state.pending_last,
        )
        self._queue.put_nowait(_Outgoing(state.about.event_namespace, body))
        state.last_emitted = now
        state.pending = 0
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- summaries and bookkeeping ------------------------------------------------

    def flush_due(self) -> int:
        """Queue a summary Event for every key whose interval ended with occurrences pending.

        Called by :meth:`run`; public so that tests (and shutdown) can drive it.
        Returns how many were queued.
        """
        now = self._clock()
        queued = 0
        for key, state in list(self._keys.items()):
            if not state.pending or state.about is None:
                continue
            if now - state.last_emitted < self.per_pod_interval:
                continue
            if self._queue.full() or not self._take_token(now):
                break
            self._emit(key, state, now)
            queued += 1
        self._prune(now)
        return queued

    def _next_due(self) -> float | None:
        """Seconds until the next summary may be due (None: nothing pending)."""
        now = self._clock()
        waits = [
            state.last_emitted + self.per_pod_interval - now
            for state in self._keys.values()
            if state.pending
        ]
        if not waits:
            return None
        # A due summary may also be waiting for the global bucket to refill.
        return max(min(waits), 1.0 / self.refill_per_second if self._tokens < 1 else 0.0)

    def _prune(self, now: float) -> None:
        idle = [
            key
            for key, state in self._keys.items()
            if not state.pending and now - state.last_emitted >= self.per_pod_interval
        ]
        for key in idle:
            del self._keys[key]

    # -- the Event object -----------------------------------------------------------

    def _name_for(self, pod_name: str) -> str:
        stamp = time.time_ns()
        if stamp <= self._last_name:
            stamp = self._last_name + 1
        self._last_name = stamp
        suffix = f".{stamp:x}"
        return pod_name[: MAX_NAME - len(suffix)] + suffix

    def event_body(
        self,
        obj: Pod | Involved,
        *,
        reason: str,
        message: str,
        type: str = WARNING,
        action: str = ACTION_GET_TOKEN,
        count: int = 1,
        first: float | None = None,
        last: float | None = None,
    ) -> dict[str, Any]:
        """A core/v1 Event about ``obj``, as client-go's recorder writes it."""
        target = about(obj)
        now = self._wall()
        first = now if first is None else first
        last = now if last is None else last
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": self._name_for(target.name or target.kind.lower()),
                "namespace": target.event_namespace,
            },
            "involvedObject": {
                "kind": target.kind,
                "apiVersion": target.api_version,
                **({"namespace": target.namespace} if target.namespace else {}),
                "name": target.name,
                **({"uid": target.uid} if target.uid else {}),
            },
            "reason": reason,
            "message": scrub(message),
            "type": type if type in (WARNING, NORMAL) else WARNING,
            "source": {"component": self.component, "host": self.node_name},
            "reportingComponent": self.component,
            "reportingInstance": self.node_name,
            "action": action,
            "count": max(count, 1),
            "firstTimestamp": rfc3339(first),
            "lastTimestamp": rfc3339(last),
            "eventTime": rfc3339(now, micro=True),
        }

    # -- background sender ----------------------------------------------------------

    async def run(self) -> None:
        """Send queued Events until cancelled; failures are counted, never raised."""
        self._wake = asyncio.Event()
        while True:
            if self._queue.empty():
                self._wake.clear()
                wait = self._next_due()
                if wait is None or wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                self.flush_due()
                if self._queue.empty():
                    continue
            item = self._queue.get_nowait()
            try:
                await self._send(item)
            finally:
                self._queue.task_done()
                self.progress.fire()

    async def _send(self, item: _Outgoing) -> None:
        path = f"/api/v1/namespaces/{item.namespace}/events"
        try:
            resp = await self.api.post(
                path, item.body, timeout=aiohttp.ClientTimeout(total=self.request_timeout)
            )
            try:
                status = int(resp.status)
                detail = b"" if status in (200, 201) else await resp.read()
            finally:
                resp.release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failure(f"{type(exc).__name__}: {exc}", item)
            return
        if status in (200, 201):
            self.emitted += 1
            if self._failing:
                log.info("events are being created again")
                self._failing = False
            return
        self._failure(f"HTTP {status}: {detail[:200].decode('utf-8', 'replace')}", item)

    def _failure(self, why: str, item: _Outgoing) -> None:
        self.failed += 1
        fields = {
            "namespace": item.namespace,
            "pod": item.body["involvedObject"]["name"],
            "event_reason": item.body["reason"],
            "error": why,
        }
        if self._failing:
            log.debug("event not created", extra={"fields": fields})
        else:
            self._failing = True
            log.warning(
                "event not created (further failures logged at debug)", extra={"fields": fields}
            )

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued Event was sent (or failed); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    async def wait(self, predicate: Callable[[EventRecorder], bool], timeout: float) -> bool:
        """Wait (without polling) until ``predicate(self)`` holds after a send; False on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if not await self.progress.wait(deadline - time.monotonic()):
                return predicate(self)
        return True

    @property
    def queued(self) -> int:
        return self._queue.qsize()


def _seconds(value: float) -> str:
    return f"{round(value)}s"


__all__ = [
    "ACTION_GET_TOKEN",
    "IDENTITY_MISCONFIGURED",
    "IDENTITY_NOT_ASSIGNED",
    "IDENTITY_NOT_FOUND",
    "MULTIPLE_IDENTITIES",
    "REASONS",
    "TOKEN_REQUEST_FAILED",
    "EventApi",
    "EventRecorder",
    "rfc3339",
    "scrub",
]
