"""Events on refused pods and ``nmi explain``, against the loopback world.

Events are written through the real :class:`~nmi.kube.client.KubeApi` to the API
emulator; explain runs its real code path (KubeApi, ClusterWatch one-shot LIST,
decide) and, for cache state, talks to an :class:`~nmi.explain.admin.AdminServer` on a
Unix socket serving a daemon started by ``world.start_daemon()``.
"""

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nmi.config import Settings
from nmi.explain.admin import AdminServer, query_admin
from nmi.explain.command import run
from nmi.identity.decide import Deny, IdentitySelector, owner_of
from nmi.imds import failures
from nmi.imds.replies import IDENTITY_NOT_FOUND, MULTIPLE_IDENTITIES
from nmi.kube.client import KubeApi
from nmi.kube.objects import Pod
from nmi.ops import events as ev
from nmi.ops.events import EventRecorder
from nmi.ops.last_errors import LastErrors
from nmi_sandbox import manifests as m
from nmi_sandbox.world import Identity, LoopbackWorld

ARM = "https://management.azure.com"


@contextlib.asynccontextmanager
async def sender(world: LoopbackWorld, **kw: Any) -> AsyncIterator[EventRecorder]:
    api = await KubeApi.connect(str(world.kubeconfig))
    rec = EventRecorder(api=api, node_name=world.node, **kw)
    task = asyncio.create_task(rec.run())
    try:
        yield rec
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()


def events_of(world: LoopbackWorld, uid: str) -> list[dict[str, Any]]:
    found = world.kube.list("v1", "Event", None, field_selector=f"involvedObject.uid={uid}")
    return sorted(found, key=lambda e: e["metadata"]["resourceVersion"])


def pod_view(raw: dict[str, Any]) -> Pod:
    return Pod.parse(raw)


async def explain(world: LoopbackWorld, *argv: str, **env: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = [*argv, "--kubeconfig", str(world.kubeconfig)]
    if "--admin-socket" not in argv:
        args += ["--admin-socket", str(world.workdir / "no-such.sock")]
    code = await run(args, out=out, err=err, environ=env)
    return code, out.getvalue(), err.getvalue()


async def explain_json(world: LoopbackWorld, *argv: str, **env: str) -> tuple[int, dict[str, Any]]:
    code, out, err = await explain(world, *argv, "--output", "json", **env)
    assert out, err
    return code, json.loads(out)


def bound(world: LoopbackWorld, name: str, **kw: Any) -> tuple[dict[str, Any], Identity]:
    ident = world.add_user_assigned_identity(f"{name}-id")
    pod = world.add_pod(name, selector=ident.selector, **kw)
    world.assign(pod, ident)
    return pod, ident


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="nmi-adm-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- events


async def test_refused_pod_gets_a_warning_event(running: LoopbackWorld) -> None:
    raw = running.add_pod("lonely")
    await running.pod_visible(raw)
    reply = await running.get_token(running.pod_ip(raw), ARM)
    assert reply.status == 400 and reply.body["error_description"] == IDENTITY_NOT_FOUND
    # What the handler does on that refusal, with the daemon's own view of the pod.
    assert running.daemon is not None and running.daemon.handler is not None
    pod = running.daemon.index.pod("default", "lonely")
    assert pod is not None
    decision = running.daemon.resolver.decide_now(pod, IdentitySelector())
    assert isinstance(decision, Deny)
    wired = running.daemon.events  # the daemon records it itself
    assert isinstance(wired, EventRecorder)
    assert await wired.flush()
    assert wired.failed == 0
    [event] = events_of(running, pod.meta.uid)
    assert event["metadata"]["namespace"] == "default"
    assert event["metadata"]["name"].startswith("lonely.")
    assert event["involvedObject"] == {
        "kind": "Pod",
        "apiVersion": "v1",
        "namespace": "default",
        "name": "lonely",
        "uid": raw["metadata"]["uid"],
    }
    assert event["reason"] == "IdentityNotFound" and event["type"] == "Warning"
    assert "Identity not found" in event["message"]
    assert event["source"] == {"component": "nmi", "host": running.node}
    assert event["count"] == 1 and event["action"] == "GetToken"
    assert event["eventTime"].endswith("Z") and "." in event["eventTime"]
    # The same Event through events.k8s.io/v1, as `kubectl events` reads it.
    [v1] = [
        e
        for e in running.kube.list("events.k8s.io/v1", "Event", "default")
        if e["regarding"]["uid"] == pod.meta.uid
    ]
    assert v1["reportingController"] == "nmi" and v1["reportingInstance"] == running.node
    assert v1["note"] == event["message"]


async def test_a_pod_refused_50_times_gets_one_event_then_a_summary(
    world: LoopbackWorld,
) -> None:
    raw = world.add_pod("looping")
    pod = pod_view(raw)
    sel = IdentitySelector()
    event = failures.refused(
        Deny("not_found", "no identity is assigned to this pod"),
        resource=ARM,
        selector=sel,
        settings=Settings(node_name=world.node),
    ).event
    assert event is not None
    reason, message = event
    # The default interval (60 s): 50 occurrences, one Event.
    async with sender(world) as rec:
        for _ in range(50):
            rec.record(pod, reason=reason, message=message)
        assert await rec.flush()
        assert rec.emitted == 1 and rec.suppressed == 49
    assert len(events_of(world, pod.meta.uid)) == 1
    # A short interval: the 49 folded occurrences arrive as one summary Event.
    raw2 = world.add_pod("looping-2")
    pod2 = pod_view(raw2)
    async with sender(world, per_pod_interval=0.3) as rec:
        for _ in range(50):
            rec.record(pod2, reason=reason, message=message)
        assert await rec.wait(lambda r: r.emitted >= 2, timeout=10)
        assert await rec.flush()
    found = events_of(world, pod2.meta.uid)
    assert [e["count"] for e in found] == [1, 49]
    assert "(48 more in the last" in found[1]["message"]
    assert all(e["reason"] == "IdentityNotFound" for e in found)


async def test_many_pods_share_one_global_budget(world: LoopbackWorld) -> None:
    pods = [pod_view(world.add_pod(f"burst-{i}")) for i in range(12)]
    async with sender(world, burst=5, refill_per_second=20.0) as rec:
        for pod in pods:
            rec.record(pod, reason=ev.MULTIPLE_IDENTITIES, message="m")
        assert rec.suppressed == 7  # beyond the burst: sent as the bucket refills
        assert await rec.wait(lambda r: r.emitted == 12, timeout=10)
    for pod in pods:
        assert len(events_of(world, pod.meta.uid)) == 1


async def test_api_errors_are_counted_and_sending_continues(world: LoopbackWorld) -> None:
    pod = pod_view(world.add_pod("ghostly"))
    missing_ns = Pod.parse(
        m.pod(name="x", namespace="no-such-namespace", node=world.node, ip="127.0.0.99", uid="u")
    )
    async with sender(world, per_pod_interval=0.0) as rec:
        rec.record(missing_ns, reason=ev.IDENTITY_NOT_FOUND, message="m")
        rec.record(pod, reason=ev.IDENTITY_NOT_FOUND, message="m")
        assert await rec.flush()
        assert rec.failed == 1 and rec.emitted == 1
    assert len(events_of(world, pod.meta.uid)) == 1


# ----------------------------------------------------------------------------- wired daemon


async def test_wired_daemon_records_events_for_refused_requests(running: LoopbackWorld) -> None:
    """The daemon records Events itself (``--kube-events``, on by default)."""
    daemon = running.daemon
    assert daemon is not None
    rec = daemon.events
    assert isinstance(rec, EventRecorder)
    raw = running.add_pod("wired-loop")
    await running.pod_visible(raw)
    for _ in range(50):
        reply = await running.get_token(running.pod_ip(raw), ARM)
        assert reply.status == 400
    assert await rec.flush()
    uid = raw["metadata"]["uid"]
    [event] = events_of(running, uid)
    assert event["reason"] == "IdentityNotFound"
    assert rec.suppressed >= 49


# ----------------------------------------------------------------------------- explain


async def test_explain_allowed_pod(world: LoopbackWorld) -> None:
    _, ident = bound(world, "allowed")
    code, out, err = await explain(world, "default/allowed")
    assert code == 0, out + err
    assert "DECISION: grant AzureIdentity default/allowed-id" in out
    assert "user-assigned managed identity" in out
    assert ident.client_id not in out
    assert f"{ident.client_id[:4]}##### REDACTED #####{ident.client_id[-4:]}" in out
    assert "label aadpodidbinding: 'allowed-id'" in out
    assert "default/allowed-default-allowed-id: identity default/allowed-id, state " in out
    assert f"node {world.node}: usable" in out
    assert "cache state unavailable" in out
    assert "IMDS reply: HTTP 200" in out


async def test_explain_refused_at_once(world: LoopbackWorld) -> None:
    world.add_pod("nobody", labels={"app": "x"})
    code, out, _ = await explain(world, "default/nobody")
    assert code == 1
    assert "label aadpodidbinding: (not set)" in out
    assert "DECISION: deny" in out and IDENTITY_NOT_FOUND in out
    assert "HTTP 400" in out and '"error":"invalid_request"' in out
    code, doc = await explain_json(world, "default/nobody")
    assert code == 1 and doc["exit_code"] == 1
    decision = doc["explanation"]["decision"]
    assert decision["kind"] == "deny" and decision["deny_kind"] == "not_found"
    assert decision["imds"] == {
        "status": 400,
        "body": {"error": "invalid_request", "error_description": IDENTITY_NOT_FOUND},
    }


async def test_explain_multiple_identities_and_a_selector(world: LoopbackWorld) -> None:
    pod, first = bound(world, "multi")
    second = world.add_user_assigned_identity("multi-second", selector=first.selector)
    world.assign(pod, second)
    code, out, _ = await explain(world, "default/multi")
    assert code == 1 and MULTIPLE_IDENTITIES in out
    code, doc = await explain_json(
        world, "default/multi", "--client-id", second.client_id.upper(), "--resource", ARM
    )
    assert code == 0
    granted = doc["explanation"]["decision"]["identity"]
    assert granted["name"] == "multi-second"
    assert second.client_id not in json.dumps(doc)
    assert doc["explanation"]["resource"] == ARM
    assert doc["daemon"]["available"] is False
    code, _, err = await explain(
        world, "default/multi", "--client-id", first.client_id, "--msi-res-id", "/x"
    )
    assert code == 2 and "at most one" in err


async def test_explain_pod_not_found_not_scheduled_not_running(world: LoopbackWorld) -> None:
    code, out, _ = await explain(world, "default/ghost")
    assert code == 1 and "does not exist" in out
    unscheduled = m.pod(name="floating", node="", ip="127.0.0.200")
    unscheduled.pop("status")
    world.kube.create(unscheduled)
    code, out, _ = await explain(world, "default/floating")
    assert code == 1 and "not scheduled on a node" in out
    bound(world, "finished", phase="Succeeded")
    code, doc = await explain_json(world, "default/finished")
    assert code == 1
    assert "Succeeded" in doc["explanation"]["caller_problem"]
    assert doc["explanation"]["decision"]["kind"] == "no_pod"
    code, out, _ = await explain(world, "default/finished", "--node", "some-other-node")
    assert code == 1 and "is not on node some-other-node" in out


async def test_explain_waiting_for_mic_and_namespaced_rules(world: LoopbackWorld) -> None:
    ident = world.add_user_assigned_identity("elsewhere", namespace="other", selector="shared")
    world.add_pod("waiting", selector="shared")
    # Standard mode: a binding selects the pod, no assignment yet -> nmi waits for MIC.
    code, doc = await explain_json(world, "default/waiting")
    assert code == 1
    decision = doc["explanation"]["decision"]
    assert decision["kind"] == "wait" and decision["stage"] == "created"
    assert decision["imds"]["status"] == 404
    [binding] = doc["explanation"]["bindings"]
    assert binding["used"] is True and binding["namespace"] == "other"
    # Namespaced rules drop the other namespace's binding, and say why.
    code, out, _ = await explain(world, "default/waiting", "--forceNamespaced")
    assert code == 1
    assert "other/elsewhere-binding -> AzureIdentity other/elsewhere" in out
    assert "DROPPED: namespaced rules (--forceNamespaced" in out
    assert IDENTITY_NOT_FOUND in out
    code, _, _ = await explain(world, "default/waiting", FORCENAMESPACED="true")
    assert code == 1
    assert ident.client_id  # identity exists; only the rules keep it away


async def test_explain_managed_mode_and_exception_pods(world: LoopbackWorld) -> None:
    ident = world.add_user_assigned_identity("managed-id")
    world.add_pod("managed", selector=ident.selector)
    code, out, _ = await explain(world, "default/managed", "--operation-mode", "managed")
    assert code == 0 and "not used in managed mode" in out
    world.kube.create(m.exception(name="mic", labels={"component": "mic"}))
    world.add_pod("mic-pod", labels={"component": "mic"})
    code, out, _ = await explain(world, "default/mic-pod")
    assert code == 0
    assert "MATCHES" in out and "the node's own identity" in out


async def test_explain_by_ip(world: LoopbackWorld) -> None:
    pod, _ = bound(world, "by-ip")
    ip = world.pod_ip(pod)
    code, out, _ = await explain(world, "--ip", ip, "--node", world.node)
    assert code == 0 and "pod default/by-ip" in out
    code, doc = await explain_json(world, "--ip", ip, NODE_NAME=world.node)
    assert code == 0 and doc["explanation"]["pod"]["name"] == "by-ip"
    code, out, _ = await explain(world, "--ip", "127.0.0.254", "--node", world.node)
    assert code == 1 and "no pod on node" in out
    assert '"error":"not_found"' in out
    code, _, err = await explain(world, "--ip", ip)
    assert code == 2 and "--node" in err


async def test_explain_usage_errors(world: LoopbackWorld) -> None:
    for argv in ([], ["default/a", "--ip", "1.2.3.4"], ["no-slash"], ["a/b/c"], ["--bogus"]):
        code, _, _ = await explain(world, *argv)
        assert code == 2, argv
    code, _, err = await explain(world, "default/a", "--resource", "bad\x01resource")
    assert code == 2 and "would refuse" in err


async def test_explain_main_in_a_process(world: LoopbackWorld) -> None:
    bound(world, "proc")
    world.add_pod("proc-refused")
    script = "import sys; from nmi.explain.command import main; sys.exit(main(sys.argv[1:]))"
    codes = []
    for target in ("default/proc", "default/proc-refused"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            target,
            "--kubeconfig",
            str(world.kubeconfig),
            "--admin-socket",
            str(world.workdir / "none.sock"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert b"DECISION" in out, err
        codes.append(proc.returncode)
    assert codes == [0, 1]


# ----------------------------------------------------------------------------- admin socket


async def test_explain_with_the_daemons_admin_socket(world: LoopbackWorld, short_tmp: Path) -> None:
    daemon = await world.start_daemon()
    pod, ident = bound(world, "cached")
    await world.pod_visible(pod)
    await world.synced(lambda idx: bool(idx.assignments("default", "cached")))
    reply = await world.get_token(world.pod_ip(pod), ARM)
    assert reply.status == 200, reply.body
    token = reply.token
    granted = daemon.index.pod("default", "cached")
    assert granted is not None and daemon.resolver is not None
    key = owner_of(daemon.resolver.decide_now(granted, IdentitySelector()))
    assert key is not None
    daemon.last_errors.record(key, "aad 400 invalid_resource: AADSTS500011 resource not found")
    path = short_tmp / "run" / "admin.sock"
    admin = AdminServer(daemon=daemon, path=path)
    await admin.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        code, out, err = await explain(
            world, "default/cached", "--admin-socket", str(path), "--resource", ARM
        )
        assert code == 0, out + err
        assert token not in out and ident.client_id not in out
        assert "token cache for default/cached-id: 1 entry" in out
        assert f"{ARM}: " in out and "s left, refresh in" in out
        assert "last upstream error" in out and "AADSTS500011" in out
        code, doc = await explain_json(world, "default/cached", "--admin-socket", str(path))
        assert code == 0 and token not in json.dumps(doc)
        live = doc["daemon"]
        assert live["available"] is True and live["synced"] is True
        [entry] = live["cache"]["entries"]
        assert entry["present"] is True and entry["resource"] == ARM
        assert 3000 < entry["remaining_seconds"] <= 86400
        assert entry["refresh_due"] is False and entry["servable"] is True
        # A resource nothing was cached for.
        code, doc = await explain_json(
            world,
            "default/cached",
            "--admin-socket",
            str(path),
            "--resource",
            "https://vault.azure.net",
        )
        assert doc["daemon"]["cache"]["entries"] == [
            {"resource": "https://vault.azure.net", "present": False}
        ]
        # object_id: only the daemon knows the oid it learned from the identity's token.
        code, doc = await explain_json(
            world, "default/cached", "--admin-socket", str(path), "--object-id", ident.object_id
        )
        assert doc["explanation"]["decision"]["kind"] == "deny"
        assert doc["daemon"]["explanation"]["decision"]["kind"] == "grant"
        assert code == 0
        # The endpoint itself: read-only, parameters checked.
        with pytest.raises(RuntimeError, match="HTTP 400"):
            await query_admin(path, namespace="default", pod="")
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post("http://nmi-admin/explain?namespace=default&pod=cached") as resp,
        ):
            assert resp.status == 405
        doc = await query_admin(path, namespace="default", pod="not-here")
        assert doc["found"] is False
    finally:
        await admin.stop()
    assert not path.exists() and not path.parent.exists()  # the directory it made, too


async def test_admin_socket_replaces_a_stale_socket_never_a_file(
    world: LoopbackWorld, short_tmp: Path
) -> None:
    daemon = await world.start_daemon()
    path = short_tmp / "admin.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a previous process died without removing it
    admin = AdminServer(daemon=daemon, path=path)
    await admin.start()
    try:
        # A live socket is never taken over.
        with pytest.raises(RuntimeError, match="another process serves"):
            await AdminServer(daemon=daemon, path=path).start()
        assert (await query_admin(path, namespace="default", pod="x"))["found"] is False
    finally:
        await admin.stop()
    path.write_text("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        await AdminServer(daemon=daemon, path=path).start()
    assert path.read_text() == "not a socket"
    os.unlink(path)


def test_last_errors_are_bounded_and_newest_wins() -> None:
    errors = LastErrors(max_entries=3, clock=lambda: 100.0)
    for i in range(5):
        errors.record(f"id-{i}", f"error {i}")
    assert len(errors) == 3 and errors.get("id-0") is None
    errors.record("id-4", "newer")
    found = errors.get("id-4")
    assert found is not None and found.summary == "newer" and found.at == 100.0
    errors.clear("id-4")
    assert errors.get("id-4") is None
