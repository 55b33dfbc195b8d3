"""Upstream under pressure: fair between pods, bounded, never a call nobody waits for,
the same answer for every waiter, and short-lived tokens served (issue 10, items 11-14)."""

import asyncio
import time

from nmi_sandbox.world import LoopbackWorld
from tests.integration.test_token_path import ARM, bound_pod


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for a condition of the daemon's state (polled: it has no change signal)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_fourth_pods_first_token_does_not_wait_behind_three_bursts(
    world: LoopbackWorld,
) -> None:
    daemon = await world.start_daemon(per_pod_rate=1000, per_pod_burst=1000)
    world.imds.latency = 0.3
    for i in range(60):
        world.imds.add_resource(f"https://burst-{i}.example")
    pods = [await bound_pod(world, f"burst{n}") for n in range(3)]
    quiet, _ = await bound_pod(world, "quiet")

    async def burst(n: int) -> None:
        pod, _ = pods[n]
        await asyncio.gather(
            *(
                world.get_token(world.pod_ip(pod), f"https://burst-{n * 20 + i}.example")
                for i in range(20)
            )
        )

    bursts = [asyncio.create_task(burst(n)) for n in range(3)]
    lane = daemon.upstream.imds_lane
    await until(lambda: lane.queued >= 12)
    started = time.monotonic()
    reply = await world.get_token(world.pod_ip(quiet), ARM)
    waited = time.monotonic() - started
    assert reply.status == 200, reply.body
    # Round robin: behind at most one call of each bursting pod (0.3 s each, 5 slots),
    # not behind all of their queued calls (FIFO: 2 s and more).
    assert waited < 1.2, waited
    results = await asyncio.gather(*bursts, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)]


async def test_calls_whose_clients_hung_up_are_not_sent(world: LoopbackWorld) -> None:
    daemon = await world.start_daemon(per_pod_rate=1000, per_pod_burst=1000)
    world.imds.latency = 0.5
    for i in range(40):
        world.imds.add_resource(f"https://gone-{i}.example")
    pod, _ = await bound_pod(world, "impatient")
    lane = daemon.upstream.imds_lane
    before = sum(world.imds.token_requests.values())

    async def impatient(i: int) -> None:
        """An SDK whose request times out: it sends, then closes its socket."""
        _, writer = await asyncio.open_connection(
            "127.0.0.1", daemon.port, local_addr=(world.pod_ip(pod), 0)
        )
        writer.write(
            b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource="
            + f"https://gone-{i}.example".encode()
            + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"
        )
        await until(lambda: lane.busy + lane.queued == i + 1)  # it reached its queue
        writer.close()

    for i in range(8):
        await impatient(i)
    await until(lambda: lane.queued == 0 and lane.busy == 0)
    sent = sum(world.imds.token_requests.values()) - before
    # 5 slots: the first five calls were already running and complete; the queued ones
    # were dropped when their turn came, since nobody waited for them any more.
    assert sent <= 5 and lane.abandoned >= 3, (sent, lane.abandoned)


async def test_a_slow_azure_ad_does_not_slow_managed_identities(world: LoopbackWorld) -> None:
    await world.start_daemon(per_pod_rate=1000, per_pod_burst=1000)
    sp_pods = [await bound_pod(world, f"sp{n}", kind="sp") for n in range(2)]
    mi_pod, _ = await bound_pod(world, "mi")
    world.aad.latency = 3.0
    resources = [
        "https://vault.azure.net",
        "https://storage.azure.com",
        "https://graph.microsoft.com",
    ]
    slow = [
        asyncio.create_task(world.get_token(world.pod_ip(pod), resource))
        for pod, _ in sp_pods
        for resource in resources
    ]
    await asyncio.sleep(0.2)  # let the Azure AD calls take their threads
    started = time.monotonic()
    reply = await world.get_token(world.pod_ip(mi_pod), ARM)
    assert reply.status == 200, reply.body
    assert time.monotonic() - started < 1.0
    world.aad.latency = 0.0
    for result in await asyncio.gather(*slow):
        assert result.status == 200, result.body


async def test_every_waiter_of_a_failed_call_gets_the_same_answer(world: LoopbackWorld) -> None:
    await world.start_daemon(per_pod_rate=1000, per_pod_burst=1000)
    pod, _ = await bound_pod(world, "joined", kind="sp")
    world.aad.latency = 0.3
    world.aad.fail_next(1, status=500)
    replies = await asyncio.gather(*(world.get_token(world.pod_ip(pod), ARM) for _ in range(5)))
    assert [r.status for r in replies] == [503] * 5, [(r.status, r.body) for r in replies]
    assert all(r.headers.get("Retry-After") for r in replies)
    # A design-time refusal (unknown resource) is 400 with Azure AD's own error, for all.
    unknown = "https://nothing-here.example"
    replies = await asyncio.gather(*(world.get_token(world.pod_ip(pod), unknown) for _ in range(5)))
    assert {r.status for r in replies} == {400}
    assert {r.body["error"] for r in replies} == {"invalid_resource"}
    assert all("Retry-After" not in r.headers for r in replies)


async def test_short_lived_tokens_are_served_and_cached(world: LoopbackWorld) -> None:
    await world.start_daemon()
    world.imds.token_lifetime = 240  # under the SDKs' 5-minute margin
    pod, ident = await bound_pod(world, "short")
    replies = [await world.get_token(world.pod_ip(pod), ARM) for _ in range(20)]
    assert {r.status for r in replies} == {200}, replies[0].body
    assert all(0 < int(r.body["expires_in"]) <= 240 for r in replies)
    assert len({r.token for r in replies}) == 1
    assert world.imds.token_requests[(ident.client_id, ARM)] == 1
