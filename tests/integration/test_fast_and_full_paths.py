"""The synchronous cache-hit path and the full path give the same reply to every request.

Both paths are driven directly (``ImdsHandler.fast`` and ``ImdsHandler.__call__``) over
one table of requests — hits, refusals, malformed requests, other pods' identities,
exception pods, unknown callers — on the real daemon against the emulators.  Where
the fast path answers, the full path must answer byte for byte the same (but for
the lifetime fields, which tick with the clock); where it declines, the full path
answers.  The table also fixes which requests the fast path must answer, so a
regression that sends every request down the slow path fails too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nmi.imds.messages import Request
from nmi.imds.routes import ImdsHandler
from nmi_sandbox.world import LoopbackWorld

ARM = "https://management.azure.com"
VAULT = "https://vault.azure.net"
TOKEN = "/metadata/identity/oauth2/token"
TICKING = {"expires_in", "expires_on", "ext_expires_in"}


@dataclass
class Case:
    name: str
    ip: str
    target: str
    headers: dict[str, str]
    method: str = "GET"
    fast: bool = False  # the fast path must answer it


def parse_reply(data: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


def comparable(body: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in body.items() if k not in TICKING}


async def test_fast_and_full_paths_agree(world: LoopbackWorld) -> None:
    daemon = await world.start_daemon()
    handler = daemon.handler
    assert isinstance(handler, ImdsHandler)
    one = world.add_user_assigned_identity("one", selector="one")
    two = world.add_user_assigned_identity("two", selector="one")
    other = world.add_user_assigned_identity("other", selector="other")
    single = world.add_pod("single", selector="one")
    world.assign(single, one)
    double = world.add_pod("double", selector="one")
    world.assign(double, one)
    world.assign(double, two)
    stranger = world.add_pod("stranger")
    exempt = world.add_pod("exempt", labels={"exempt": "yes"})
    world.kube.create(
        {
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": "AzurePodIdentityException",
            "metadata": {"name": "exempt", "namespace": "default"},
            "spec": {"podLabels": {"exempt": "yes"}},
        }
    )
    for pod in (single, double, stranger, exempt):
        await world.pod_visible(pod)
    await world.synced(
        lambda idx: (
            len(idx.assignments("default", "double")) == 2
            and bool(idx.assignments("default", "single"))
            and bool(idx.exceptions_in("default"))
        )
    )
    # Warm the cache through the real path: these become hits.
    for ip, query in (
        (world.pod_ip(single), {}),
        (world.pod_ip(double), {"client_id": two.client_id}),
        (world.pod_ip(exempt), {"client_id": one.client_id}),
    ):
        reply = await world.get_token(ip, ARM, **query)
        assert reply.status == 200, reply.body

    md = {"Metadata": "true"}
    q = f"{TOKEN}?api-version=2018-02-01&resource={ARM}"
    cases = [
        Case("hit", world.pod_ip(single), q, md, fast=True),
        Case(
            "hit, selector upper case",
            world.pod_ip(single),
            f"{q}&client_id={one.client_id.upper()}",
            md,
            fast=True,
        ),
        Case(
            "hit by client_id",
            world.pod_ip(double),
            f"{q}&client_id={two.client_id}",
            md,
            fast=True,
        ),
        Case(
            "exception pod, node identity",
            world.pod_ip(exempt),
            f"{q}&client_id={one.client_id}",
            md,
            fast=True,
        ),
        Case("no Metadata header", world.pod_ip(single), q, {}, fast=True),
        Case("Metadata: false", world.pod_ip(single), q, {"Metadata": "false"}, fast=True),
        Case("POST", world.pod_ip(single), q, md, method="POST", fast=True),
        Case("HEAD", world.pod_ip(single), q, md, method="HEAD", fast=True),
        Case("no api-version", world.pod_ip(single), f"{TOKEN}?resource={ARM}", md, fast=True),
        Case(
            "bad api-version",
            world.pod_ip(single),
            f"{TOKEN}?api-version=x&resource={ARM}",
            md,
            fast=True,
        ),
        Case("no resource", world.pod_ip(single), f"{TOKEN}?api-version=2018-02-01", md, fast=True),
        Case("two selectors", world.pod_ip(double), f"{q}&client_id=a&object_id=b", md, fast=True),
        Case(
            "miss: other resource",
            world.pod_ip(single),
            f"{TOKEN}?api-version=2018-02-01&resource={VAULT}",
            md,
        ),
        Case("several identities, no selector", world.pod_ip(double), q, md),
        Case(
            "another pod's identity", world.pod_ip(single), f"{q}&client_id={other.client_id}", md
        ),
        Case("no identity", world.pod_ip(stranger), q, md),
        Case("unknown caller", "127.0.0.254", q, md),
        Case(
            "trailing slash (msal-node)",
            world.pod_ip(single),
            f"{TOKEN}/?api-version=2018-02-01&resource={ARM}",
            md,
            fast=True,
        ),
    ]
    answered_fast = []
    for case in cases:
        request = Request(
            method=case.method,
            target=case.target,
            headers=[(k.lower(), v) for k, v in case.headers.items()],
            peer_ip=case.ip,
        )
        fast = handler.fast(request)
        full = await handler(
            Request(
                method=case.method,
                target=case.target,
                headers=request.headers,
                peer_ip=case.ip,
            )
        )
        full_body = json.loads(full.body) if full.body else {}
        if case.fast:
            assert fast is not None, f"{case.name}: the fast path declined"
        else:
            assert fast is None, f"{case.name}: the fast path answered what needs the full path"
        if fast is None:
            continue
        answered_fast.append(case.name)
        status, body = parse_reply(fast)
        if case.method == "HEAD":
            assert status == full.status, case.name
            assert b"Content-Length: " + str(len(full.body)).encode() in fast, case.name
            continue
        assert status == full.status, f"{case.name}: fast {status}, full {full.status}"
        assert comparable(body) == comparable(full_body), case.name
        for field in TICKING & body.keys():
            assert abs(int(str(body[field])) - int(str(full_body[field]))) <= 1, case.name
    assert len(answered_fast) == sum(c.fast for c in cases)
