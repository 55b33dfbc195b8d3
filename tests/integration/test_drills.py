"""Fault drills on loopback: what breaks around nmi must not break nmi.

API-server restarts and compaction, Azure AD outages, IMDS throttling, a
Secret rotated mid-stream, a looping pod, slow clients and a flood of
malformed requests — while real requests flow.
"""

import asyncio
import os
import sys
import threading

import pytest

from nmi_sandbox.world import LoopbackWorld

VAULT = "https://vault.azure.net"
ARM = "https://management.azure.com"


async def bound(world: LoopbackWorld, name: str, *, kind: str = "sp"):  # type: ignore[no-untyped-def]
    if kind == "sp":
        ident = world.add_service_principal(f"{name}-id", selector=name)
    else:
        ident = world.add_user_assigned_identity(f"{name}-id", selector=name)
    pod = world.add_pod(name, selector=name)
    world.assign(pod, ident)
    await world.pod_visible(pod)
    await world.synced(lambda idx: bool(idx.assignments("default", name)))
    return pod, ident


async def test_requests_keep_flowing_through_api_server_restart_and_compaction(
    running: LoopbackWorld,
) -> None:
    pod, _ = await bound(running, "steady", kind="mi")
    ip = running.pod_ip(pod)
    stop = asyncio.Event()
    statuses: list[int] = []

    async def flow() -> None:
        while not stop.is_set():
            statuses.append((await running.get_token(ip)).status)

    flowing = asyncio.create_task(flow())
    await running.kube.stop()
    running.kube.compact()
    late_ident = running.add_user_assigned_identity("late-id", selector="late")
    late = running.add_pod("late", selector="late")
    running.assign(late, late_ident)
    await running.kube.start()
    await running.pod_visible(late)
    await running.synced(lambda idx: bool(idx.assignments("default", "late")))
    assert (await running.get_token(running.pod_ip(late))).status == 200
    stop.set()
    await flowing
    assert statuses and set(statuses) == {200}


async def test_azure_ad_outage_serves_cached_tokens_and_recovers(running: LoopbackWorld) -> None:
    pod, _ = await bound(running, "outage")
    ip = running.pod_ip(pod)
    assert (await running.get_token(ip, VAULT)).status == 200
    running.aad.outage = True
    cached = await running.get_token(ip, VAULT)
    assert cached.status == 200
    uncached = await running.get_token(ip, ARM)
    assert uncached.status == 503 and int(uncached.headers["Retry-After"]) >= 1
    assert uncached.body["error"] == "server_error"
    running.aad.outage = False
    assert (await running.get_token(ip, ARM)).status == 200  # no restart needed


async def test_aad_throttling_is_honoured(running: LoopbackWorld) -> None:
    pod, ident = await bound(running, "throttled")
    ip = running.pod_ip(pod)
    running.aad.throttle_next(1, retry_after=3)
    first = await running.get_token(ip, VAULT)
    assert first.status == 429 and first.headers["Retry-After"] == "3"
    sent = running.aad.token_requests[(ident.client_id, VAULT)]
    again = await running.get_token(ip, VAULT)
    assert again.status == 429 and int(again.headers["Retry-After"]) <= 3
    assert running.aad.token_requests[(ident.client_id, VAULT)] == sent  # not sent upstream


async def test_imds_calls_stay_within_the_vms_limits(running: LoopbackWorld) -> None:
    running.imds.latency = 0.05
    pods = [await bound(running, f"mi-{i}", kind="mi") for i in range(8)]
    replies = await asyncio.gather(
        *(running.get_token(running.pod_ip(p), r) for p, _ in pods for r in (ARM, VAULT))
    )
    assert all(r.status == 200 for r in replies), [r.body for r in replies if r.status != 200]
    assert running.imds.max_in_flight <= 5  # queued by nmi, never a 429 from IMDS


async def test_secret_rotated_mid_stream_without_a_failed_request(running: LoopbackWorld) -> None:
    pod, ident = await bound(running, "rotating")
    ip = running.pod_ip(pod)
    resources = [f"https://rotation-{i}.example.com" for i in range(30)]
    for resource in resources:
        running.aad.add_resource(resource)
    old = ident.secret_value
    statuses: list[int] = []
    for i, resource in enumerate(resources):
        if i == 10:
            # A real rotation: the new secret is added in Azure AD, then the Secret is
            # updated, then the old secret is removed once nmi uses the new one.
            running.aad.set_secrets(ident.client_id, [old, "pending"])
            new = running.rotate_secret(ident)
            running.aad.set_secrets(ident.client_id, [old, new])
        if i == 20:
            running.aad.set_secrets(ident.client_id, [ident.secret_value])
        statuses.append((await running.get_token(ip, resource)).status)
    assert set(statuses) == {200}


async def test_looping_pod_cannot_starve_others(world: LoopbackWorld) -> None:
    await world.start_daemon(per_pod_rate=2.0, per_pod_burst=5.0)
    noisy, _ = await bound(world, "noisy")
    quiet, _ = await bound(world, "quiet")
    ip = world.pod_ip(noisy)
    assert (await world.get_token(ip, VAULT)).status == 200
    for i in range(20):
        world.aad.add_resource(f"https://loop-{i}.example.com")
    replies = [await world.get_token(ip, f"https://loop-{i}.example.com") for i in range(20)]
    limited = [r for r in replies if r.status == 429]
    assert limited and all(int(r.headers["Retry-After"]) >= 1 for r in limited)
    assert (await world.get_token(ip, VAULT)).status == 200  # its cached token, over budget
    for _ in range(30):  # cache hits never spend the budget (nor are they refused)
        assert (await world.get_token(world.pod_ip(quiet), VAULT)).status == 200
    assert (await world.get_token(world.pod_ip(quiet), VAULT)).status == 200


async def test_slow_clients_do_not_hold_up_others(running: LoopbackWorld) -> None:
    pod, _ = await bound(running, "fast", kind="mi")
    assert running.daemon is not None
    port = running.daemon.port
    slow = []
    for _ in range(50):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metadata/identity/oauth2/token?api-version=2018-02-01 HTTP/1.1\r\n")
        await writer.drain()
        slow.append(writer)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await running.get_token(running.pod_ip(pod))
        assert reply.status == 200 and loop.time() - started < 1.0
    finally:
        for writer in slow:
            writer.close()


async def test_no_blocking_io_on_the_event_loop(running: LoopbackWorld) -> None:
    """MSAL, requests and file reads run off the loop: an audit hook watches the loop thread."""
    loop_thread = threading.get_ident()
    seen: list[str] = []
    watching = True

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if (
            watching
            and threading.get_ident() == loop_thread
            and event
            in (
                "open",
                "http.client.connect",
                "socket.getaddrinfo",
            )
        ):
            seen.append(f"{event} {str(args)[:120]}")

    sys.addaudithook(hook)
    try:
        mi_pod, _ = await bound(running, "hook-mi", kind="mi")
        sp_pod, _ = await bound(running, "hook-sp")
        with open(os.devnull, "rb"):  # noqa: ASYNC230 - the guard itself must see this
            pass
        assert any(event.startswith("open") for event in seen)
        seen.clear()  # set-up (creating objects, starting watches) is not the request path
        for ip, resource in ((running.pod_ip(mi_pod), ARM), (running.pod_ip(sp_pod), VAULT)):
            for _ in range(3):  # a miss (upstream through MSAL), then hits
                assert (await running.get_token(ip, resource)).status == 200
    finally:
        watching = False
    assert not seen, seen


@pytest.mark.parametrize("count", [300])
async def test_malformed_flood_gets_well_formed_replies(running: LoopbackWorld, count: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    pod, _ = await bound(running, "flooded", kind="mi")
    assert running.daemon is not None
    port = running.daemon.port
    loop = asyncio.get_running_loop()
    cases: list[bytes] = []
    text = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=80)

    @settings(max_examples=count, suppress_health_check=list(HealthCheck), database=None)
    @given(
        method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "BREW", "G\x00T"]),
        path=st.one_of(
            text,
            st.sampled_from(
                [
                    "/metadata/identity/oauth2/token",
                    "//metadata/identity/oauth2/token/",
                    "/host/token",
                    "/metadata/instance",
                ]
            ),
        ),
        query=text,
        headers=st.lists(st.tuples(text, text), max_size=4),
        metadata=st.booleans(),
    )
    def collect(method: str, path: str, query: str, headers: list, metadata: bool) -> None:  # type: ignore[type-arg]
        head = f"{method} /{path.lstrip('/')}?{query} HTTP/1.1\r\nHost: x\r\n"
        if metadata:
            head += "Metadata: true\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        cases.append((head + "Connection: close\r\n\r\n").encode("latin-1"))

    await loop.run_in_executor(None, collect)
    for raw in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        if raw.startswith(b"HEAD "):
            continue
        assert data.startswith(b"HTTP/1."), (raw[:80], data[:80])
        head = data.partition(b"\r\n\r\n")[0]
        status = int(head.split(b" ")[1])
        assert 200 <= status < 600
        if b"application/json" not in head:
            # only the node IMDS's own answers to proxied paths may be other than JSON
            assert status in (200, 404), (raw[:80], data[:200])
    assert (await running.get_token(running.pod_ip(pod))).status == 200


async def test_unreadable_secret_is_a_prompt_retryable_error(running: LoopbackWorld) -> None:
    pod, _ = await bound(running, "no-api")
    await running.kube.stop()  # the Secret was never read: nmi cannot read it now
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await running.get_token(running.pod_ip(pod), VAULT)
    assert reply.status == 503 and int(reply.headers["Retry-After"]) >= 1
    assert loop.time() - started < 5  # not the full sync timeout
    await running.kube.start()
    for _ in range(50):  # the Secret watch retries with backoff; the pod's SDK retries too
        reply = await running.get_token(running.pod_ip(pod), VAULT)
        if reply.status == 200:
            break
        await asyncio.sleep(0.2)
    assert reply.status == 200
