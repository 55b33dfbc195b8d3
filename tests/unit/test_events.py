"""EventRecorder: rate limiting, the Event body, and a sender that never gives up (no I/O)."""

import asyncio
import datetime
import re
from typing import Any

import aiohttp
import pytest

from nmi.config import Settings
from nmi.identity.decide import Deny, Grant, IdentitySelector, Wait
from nmi.imds import failures
from nmi.kube.objects import AzureIdentity, Pod
from nmi.ops import events as ev
from nmi.ops.events import EventRecorder
from nmi.tokens.model import UpstreamError
from nmi_sandbox import manifests as m

NODE = "node-1"
CLIENT_ID = "aaaaaaaa-1111-2222-3333-444444444444"
WALL0 = 1_790_000_000.25  # 2026-09-21T...


def make_pod(name: str = "app", uid: str = "uid-1", namespace: str = "default") -> Pod:
    return Pod.parse(
        m.pod(name=name, namespace=namespace, node=NODE, ip="10.0.0.5", labels={}, uid=uid)
    )


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = WALL0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


class FakeResponse:
    def __init__(self, status: int, body: bytes = b"{}") -> None:
        self.status = status
        self._body = body
        self.released = False

    async def read(self) -> bytes:
        return self._body

    def release(self) -> None:
        self.released = True


class FakeApi:
    """Records POSTs; ``script`` gives one outcome per call (status or exception), then 201."""

    def __init__(self, script: list[int | Exception] | None = None) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.script = list(script or [])
        self.responses: list[FakeResponse] = []

    async def post(
        self, path: str, body: dict[str, Any], *, timeout: aiohttp.ClientTimeout
    ) -> FakeResponse:
        self.posts.append((path, body))
        outcome = self.script.pop(0) if self.script else 201
        if isinstance(outcome, Exception):
            raise outcome
        resp = FakeResponse(outcome, b'{"message":"nope"}')
        self.responses.append(resp)
        return resp


def recorder(clock: Clock, api: FakeApi | None = None, **kw: Any) -> EventRecorder:
    return EventRecorder(
        api=api or FakeApi(),
        node_name=NODE,
        clock=lambda: clock.mono,
        wall_clock=lambda: clock.wall,
        **kw,
    )


def queued(rec: EventRecorder) -> list[dict[str, Any]]:
    """Take everything queued (what run() would send)."""
    out = []
    while rec.queued:
        item = rec._queue.get_nowait()
        rec._queue.task_done()
        out.append(item.body)
    return out


# -- the Event object ----------------------------------------------------------


def test_event_body_is_a_core_v1_event_about_the_pod() -> None:
    clock = Clock()
    rec = recorder(clock)
    pod = make_pod()
    rec.record(pod, reason=ev.IDENTITY_NOT_FOUND, message="Token request refused")
    [body] = queued(rec)
    assert body["apiVersion"] == "v1" and body["kind"] == "Event"
    assert body["metadata"]["namespace"] == "default"
    assert re.fullmatch(r"app\.[0-9a-f]+", body["metadata"]["name"])
    assert body["involvedObject"] == {
        "kind": "Pod",
        "apiVersion": "v1",
        "namespace": "default",
        "name": "app",
        "uid": "uid-1",
    }
    assert body["reason"] == "IdentityNotFound"
    assert body["type"] == "Warning"
    assert body["action"] == "GetToken"
    assert body["source"] == {"component": "nmi", "host": NODE}
    assert body["reportingComponent"] == "nmi" and body["reportingInstance"] == NODE
    assert body["count"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["firstTimestamp"])
    assert body["firstTimestamp"] == body["lastTimestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", body["eventTime"])
    parsed = datetime.datetime.strptime(body["eventTime"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert parsed.replace(tzinfo=datetime.UTC).timestamp() == pytest.approx(WALL0)
    assert body["message"] == "Token request refused"


def test_event_names_are_unique_and_bounded() -> None:
    rec = recorder(Clock())
    long_name = "p" * 253
    names = {
        rec.event_body(make_pod(name=long_name), reason="R", message="m")["metadata"]["name"]
        for _ in range(100)
    }
    assert len(names) == 100
    assert all(len(n) <= 253 for n in names)


def test_messages_never_carry_ids_or_tokens() -> None:
    jwt_like = "eyJhbGciOiJSUzI1NiJ9.eyJhcHBpZCI6IjEyMyJ9.c2lnbmF0dXJl"
    text = ev.scrub(f"AADSTS700016: Application with identifier '{CLIENT_ID}' {jwt_like}\nx")
    assert CLIENT_ID not in text and jwt_like not in text
    assert "aaaa##### REDACTED #####4444" in text
    assert "\n" not in text
    assert len(ev.scrub("x" * 5000)) <= ev.MAX_MESSAGE


def test_messages_for_each_reason() -> None:
    """The Events a refusal or failure leaves (built by imds.failures): reason and text."""
    settings = Settings(node_name="n")
    sel = IdentitySelector(client_id=CLIENT_ID)

    def event(failure: failures.Failure) -> tuple[str, str]:
        assert failure.event is not None
        return failure.event

    reason, message = event(
        failures.refused(
            Deny("not_found", "no identity is assigned to this pod"),
            resource="https://vault.azure.net",
            selector=IdentitySelector(),
            settings=settings,
        )
    )
    assert reason == ev.IDENTITY_NOT_FOUND and "Identity not found" in message
    reason, message = event(
        failures.refused(
            Deny("multiple", "2 identities are assigned to this pod"),
            resource="r",
            selector=IdentitySelector(),
            settings=settings,
        )
    )
    assert reason == ev.MULTIPLE_IDENTITIES and "client_id" in message
    reason, message = event(
        failures.refused(
            Wait("assigned", "the pod's identity is not yet Assigned"),
            resource="r",
            selector=sel,
            settings=settings,
        )
    )
    assert reason == ev.IDENTITY_NOT_ASSIGNED and CLIENT_ID not in message
    identity = AzureIdentity.parse(
        m.azure_identity(name="id", namespace="default", type=1, client_id=CLIENT_ID)
    )
    reason, message = event(
        failures.upstream(
            UpstreamError(
                source="aad",
                status=401,
                error="invalid_client",
                description=f"AADSTS7000215: Invalid client secret provided for {CLIENT_ID}",
                retryable=False,
            ),
            Grant(identity),
            "r",
        )
    )
    assert reason == ev.TOKEN_REQUEST_FAILED and "default/id" in message
    rec = recorder(Clock())
    body = rec.event_body(make_pod(), reason=reason, message=message)
    assert CLIENT_ID not in body["message"] and "invalid_client" in body["message"]
    reason, _ = event(failures.misconfigured("secret x is empty", Grant(identity), "r"))
    assert reason == ev.IDENTITY_MISCONFIGURED
    reason, _ = event(failures.credential_unavailable("timeout", Grant(identity), "r"))
    assert reason == ev.TOKEN_REQUEST_FAILED
    assert set(ev.REASONS) == {
        "IdentityNotFound",
        "MultipleIdentities",
        "IdentityNotAssigned",
        "TokenRequestFailed",
        "IdentityMisconfigured",
    }


# -- rate limiting ---------------------------------------------------------------


def test_a_looping_pod_gets_one_event_then_a_summary() -> None:
    clock = Clock()
    rec = recorder(clock)
    pod = make_pod()
    for _ in range(50):
        rec.record(pod, reason=ev.IDENTITY_NOT_FOUND, message="refused")
        clock.advance(0.1)  # 5 s in all
    [first] = queued(rec)
    assert first["count"] == 1 and first["message"] == "refused"
    assert rec.suppressed == 49 and rec.recorded == 50
    # Nothing is due before the interval is over.
    clock.advance(50)
    assert rec.flush_due() == 0
    clock.advance(5)  # 60 s after the first Event
    assert rec.flush_due() == 1
    [summary] = queued(rec)
    assert summary["count"] == 49
    assert summary["message"] == "refused (48 more in the last 60s)"
    assert summary["firstTimestamp"] < summary["lastTimestamp"]
    # Every occurrence is accounted for exactly once.
    assert first["count"] + summary["count"] == 50
    # Nothing left: no more summaries.
    clock.advance(120)
    assert rec.flush_due() == 0 and not queued(rec)


def test_the_next_occurrence_after_the_interval_carries_the_pending_ones() -> None:
    clock = Clock()
    rec = recorder(clock)
    pod = make_pod()
    rec.record(pod, reason=ev.IDENTITY_NOT_FOUND, message="first")
    for _ in range(12):
        clock.advance(1)
        rec.record(pod, reason=ev.IDENTITY_NOT_FOUND, message="again")
    clock.advance(60)
    rec.record(pod, reason=ev.IDENTITY_NOT_FOUND, message="latest")
    first, second = queued(rec)
    assert first["count"] == 1
    assert second["count"] == 13
    assert second["message"] == "latest (12 more in the last 72s)"


def test_reasons_and_pods_are_limited_separately() -> None:
    clock = Clock()
    rec = recorder(clock)
    a, b = make_pod("a", "uid-a"), make_pod("b", "uid-b")
    rec.record(a, reason=ev.IDENTITY_NOT_FOUND, message="m")
    rec.record(a, reason=ev.MULTIPLE_IDENTITIES, message="m")
    rec.record(b, reason=ev.IDENTITY_NOT_FOUND, message="m")
    rec.record(b, reason=ev.IDENTITY_NOT_FOUND, message="m")
    bodies = queued(rec)
    assert [(x["involvedObject"]["uid"], x["reason"]) for x in bodies] == [
        ("uid-a", "IdentityNotFound"),
        ("uid-a", "MultipleIdentities"),
        ("uid-b", "IdentityNotFound"),
    ]
    # A replaced pod (same name, new UID) is a new pod.
    rec.record(make_pod("a", "uid-a2"), reason=ev.IDENTITY_NOT_FOUND, message="m")
    assert len(queued(rec)) == 1


def test_global_bucket_caps_many_pods_and_refills() -> None:
    clock = Clock()
    rec = recorder(clock, burst=5, refill_per_second=1.0)
    pods = [make_pod(f"p{i}", f"uid-{i}") for i in range(20)]
    for pod in pods:
        rec.record(pod, reason=ev.IDENTITY_NOT_FOUND, message="m")
    assert len(queued(rec)) == 5
    assert rec.suppressed == 15
    clock.advance(2.0)
    assert rec.flush_due() == 2
    clock.advance(100.0)  # the bucket holds at most `burst`
    assert rec.flush_due() == 5
    sent = queued(rec)
    assert len(sent) == 7 and all(b["count"] == 1 for b in sent)
    assert rec._next_due() is not None  # 8 pods still pending, sent as the bucket refills


def test_full_queue_drops_and_counts_but_keeps_the_occurrence_pending() -> None:
    clock = Clock()
    rec = recorder(clock, queue_size=2, per_pod_interval=0.0, burst=100)
    pod = make_pod()
    for reason in ("A", "B", "C", "D"):
        rec.record(pod, reason=reason, message="m")
    assert rec.queued == 2 and rec.dropped == 2
    queued(rec)
    assert rec.flush_due() == 2  # the dropped ones are reported once there is room
    assert sorted(b["reason"] for b in queued(rec)) == ["C", "D"]


def test_record_never_raises() -> None:
    rec = recorder(Clock())
    rec.record(None, reason="R", message="m")  # type: ignore[arg-type]
    rec.record(make_pod(), reason="R", message=None)  # type: ignore[arg-type]
    assert rec.queued <= 1


def test_tracked_keys_are_bounded() -> None:
    clock = Clock()
    rec = recorder(clock, max_tracked=10, burst=100)
    for i in range(30):
        rec.record(make_pod(f"p{i}", f"u{i}"), reason="R", message="m")
    assert len(rec._keys) <= 10
    assert rec.queued == 10 and rec.suppressed == 20
    clock.advance(61)
    rec.record(make_pod("late", "u-late"), reason="R", message="m")  # idle keys were pruned
    assert rec.queued == 11


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        EventRecorder(api=FakeApi(), node_name=NODE, burst=0)


# -- the sender --------------------------------------------------------------------


async def test_sender_posts_counts_failures_and_keeps_going() -> None:
    clock = Clock()
    api = FakeApi(script=[ConnectionResetError("reset"), 403, 500])
    rec = recorder(clock, api=api, per_pod_interval=0.0, burst=100)
    task = asyncio.create_task(rec.run())
    try:
        for i in range(5):
            rec.record(make_pod(f"p{i}", f"u{i}"), reason="R", message="m")
        assert await rec.flush(timeout=5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rec.failed == 3 and rec.emitted == 2
    assert [path for path, _ in api.posts] == ["/api/v1/namespaces/default/events"] * 5
    assert all(r.released for r in api.responses)


async def test_sender_sends_summaries_when_the_interval_ends() -> None:
    api = FakeApi()
    rec = EventRecorder(api=api, node_name=NODE, per_pod_interval=0.2)
    task = asyncio.create_task(rec.run())
    try:
        pod = make_pod()
        for _ in range(10):
            rec.record(pod, reason=ev.IDENTITY_NOT_FOUND, message="m")
        assert await rec.wait(lambda r: r.emitted >= 2, timeout=5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [b["count"] for _, b in api.posts] == [1, 9]
    assert "(8 more in the last" in api.posts[1][1]["message"]
