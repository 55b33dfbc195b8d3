"""The controller (``nmi mic``) against the emulated API server, Azure AD and ARM.

Each test runs the real controller — its watches, its Lease, its writes
through the API server, its ARM calls through ``azure-mgmt-compute`` with a
``ClientSecretCredential`` from ``azure.json`` — and, where the point is the
whole chain, nmi next to it with the node's IMDS serving only what ARM shows
on the node (``enforce_arm``): pod → controller → ARM → IMDS → nmi → token.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from nmi.explain.command import run as explain
from nmi.mic.app import Mic
from nmi.mic.controller import BINDING_APPLIED, BINDING_APPLY_ERROR, NAME_CLASH
from nmi.mic.desired import FINALIZER
from nmi.mic.ledger import ledger_key
from nmi_sandbox import manifests as m
from nmi_sandbox.world import MIC_NAMESPACE, LoopbackWorld

GV = "aadpodidentity.k8s.io/v1"
AAI = "AzureAssignedIdentity"


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Wait for ``predicate()`` to be truthy (re-checked every 20 ms); return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def assignment(w: LoopbackWorld, name: str, namespace: str = "default") -> dict[str, Any] | None:
    return w.kube.get(GV, AAI, name, namespace)


def state(w: LoopbackWorld, name: str, namespace: str = "default") -> str | None:
    found = assignment(w, name, namespace)
    return None if found is None else (found.get("status") or {}).get("status")


def all_assignments(w: LoopbackWorld) -> list[dict[str, Any]]:
    return w.kube.list(GV, AAI)


def on_vmss(w: LoopbackWorld) -> set[str]:
    return {i.lower() for i in w.arm.identities_on(w.vmss_id)}


def events(w: LoopbackWorld, reason: str) -> list[dict[str, Any]]:
    return [e for e in w.kube.list("v1", "Event") if e.get("reason") == reason]


async def quiescent(mic: Mic) -> None:
    """Wait until the controller has nothing queued or running: every pod reconciled, every
    VM/scale-set worker finished, removals allowed. Whatever it would do, it has done."""
    c, machines = mic.controller, mic.machines
    assert c is not None and machines is not None
    await until(
        lambda: c.idle.is_set() and machines.settled and machines.idle, what="a quiet controller"
    )


def kube_writes(w: LoopbackWorld) -> int:
    return sum(
        n
        for key, n in w.kube.requests.items()
        if key.split(" ")[0] in ("POST", "PUT", "PATCH", "DELETE")
        and not key.endswith(("leases", "events"))
    )


def arm_writes(w: LoopbackWorld) -> int:
    return sum(n for key, n in w.arm.requests.items() if key.startswith("PATCH"))


@pytest.fixture
async def chain(world: LoopbackWorld) -> AsyncIterator[LoopbackWorld]:
    """nmi and one controller replica, the IMDS serving only what ARM put on the node."""
    world.enforce_arm()
    await world.start_daemon()
    await world.start_mic()
    yield world


async def serving(w: LoopbackWorld, pod: dict[str, Any], client_id: str) -> None:
    """Wait until nmi serves ``pod`` a token of ``client_id`` (its watch shows Assigned)."""

    async def ok() -> bool:
        reply = await w.get_token(w.pod_ip(pod), client_id=client_id)
        return reply.status == 200 and reply.body.get("client_id") == client_id

    deadline = time.monotonic() + 15
    while not await ok():
        assert time.monotonic() < deadline, "nmi never served the pod its identity"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ the seed's process


async def test_a_user_assigned_identity_goes_created_arm_assigned_and_the_pod_gets_its_token(
    chain: LoopbackWorld,
) -> None:
    w = chain
    w.arm.patch_latency = 0.5  # long enough to see the assignment Created and waiting
    ident = w.add_user_assigned_identity("reader", selector="app")
    pod = w.add_pod("web", selector="app")

    waiting = await until(lambda: assignment(w, "web-default-reader"), what="the assignment")
    assert waiting["status"]["status"] == "Created"
    step = waiting["metadata"]["annotations"]["aadpodidentity.k8s.io/mic-step"]
    assert "scale set aks-nodepool1-12345678-vmss" in step
    assert ident.resource_id.lower() not in on_vmss(w)
    # A token asked for now waits (as with aad-pod-identity) until the assignment is Assigned,
    # which the controller makes it only once ARM has put the identity on the scale set.
    reply = await w.get_token(w.pod_ip(pod))
    assert reply.status == 200, reply.body
    assert reply.body["client_id"] == ident.client_id
    assert state(w, "web-default-reader") == "Assigned"
    assert ident.resource_id.lower() in on_vmss(w)

    done = assignment(w, "web-default-reader")
    assert done is not None
    meta = done["metadata"]
    assert meta["namespace"] == "default"
    assert meta["labels"] == {"nodename": w.node}
    assert meta["finalizers"] == [FINALIZER]
    assert "aadpodidentity.k8s.io/mic-step" not in (meta.get("annotations") or {})
    spec = done["spec"]
    assert (spec["pod"], spec["podNamespace"], spec["nodename"]) == ("web", "default", w.node)
    identity_obj = w.kube.get(GV, "AzureIdentity", "reader", "default")
    binding_obj = w.kube.get(GV, "AzureIdentityBinding", "reader-binding", "default")
    assert identity_obj is not None and binding_obj is not None
    assert (
        spec["azureIdentityRef"]["metadata"]["resourceVersion"]
        == (identity_obj["metadata"]["resourceVersion"])
    )
    assert spec["azureIdentityRef"]["spec"] == identity_obj["spec"]
    assert spec["azureBindingRef"]["metadata"]["uid"] == binding_obj["metadata"]["uid"]
    applied = await until(lambda: events(w, BINDING_APPLIED), what="binding applied")
    assert applied[0]["involvedObject"]["kind"] == "AzureIdentityBinding"
    assert applied[0]["involvedObject"]["name"] == "reader-binding"
    assert arm_writes(w) == 1

    # The pod goes: its assignment goes (no finalizer left) and so does the identity.
    w.kube.delete("v1", "Pod", "web", "default")
    await until(lambda: assignment(w, "web-default-reader") is None, what="assignment gone")
    await until(lambda: not on_vmss(w), what="identity removed from the scale set")
    assert arm_writes(w) == 2

    def forgotten() -> bool:
        ledger = w.kube.get("v1", "ConfigMap", "nmi-mic-ledger", MIC_NAMESPACE)
        return ledger is not None and not ledger.get("data")

    await until(forgotten, what="the ledger forgets the removed identity")


async def test_service_principals_are_assigned_at_once_without_arm(chain: LoopbackWorld) -> None:
    w = chain
    secret = w.add_service_principal("sp", selector="sp-app")
    cert = w.add_service_principal("cert", selector="sp-app", certificate=True)
    pod = w.add_pod("worker", selector="sp-app")
    await until(lambda: state(w, "worker-default-sp") == "Assigned", what="sp Assigned")
    await until(lambda: state(w, "worker-default-cert") == "Assigned", what="cert Assigned")
    assert not any(key.startswith("PATCH") for key in w.arm.requests)
    reply = await w.get_token(w.pod_ip(pod), client_id=secret.client_id)
    assert reply.status == 200, reply.body
    reply = await w.get_token(w.pod_ip(pod), client_id=cert.client_id)
    assert reply.status == 200, reply.body


async def test_pods_without_node_label_or_running_are_left_alone(chain: LoopbackWorld) -> None:
    w = chain
    w.add_service_principal("sp", selector="app")
    w.add_pod("unlabelled")
    w.ensure_namespace("default")
    unscheduled = m.pod(name="pending", node="", ip="", labels={"aadpodidbinding": "app"})
    unscheduled.pop("status")
    w.kube.create(unscheduled)
    w.add_pod("ended", selector="app", phase="Succeeded")
    w.add_pod("marker", selector="app")
    await until(lambda: state(w, "marker-default-sp") == "Assigned", what="marker")
    assert {a["metadata"]["name"] for a in all_assignments(w)} == {"marker-default-sp"}


async def test_changes_to_binding_identity_and_pod_follow(chain: LoopbackWorld) -> None:
    w = chain
    w.add_service_principal("sp", selector="app")
    w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-sp") == "Assigned", what="Assigned")

    # An edited identity: the assignment embeds the new one.
    w.kube.patch(GV, "AzureIdentity", "sp", "default", {"metadata": {"labels": {"v": "2"}}})
    fresh = w.kube.get(GV, "AzureIdentity", "sp", "default")
    assert fresh is not None

    def embeds_new() -> bool:
        a = assignment(w, "web-default-sp")
        ref = a["spec"]["azureIdentityRef"]["metadata"] if a else {}
        return bool(ref.get("resourceVersion") == fresh["metadata"]["resourceVersion"])

    await until(embeds_new, what="the edited identity embedded")
    assert state(w, "web-default-sp") == "Assigned"

    # A binding whose selector changes away: the assignment goes.
    w.kube.patch(GV, "AzureIdentityBinding", "sp-binding", "default", {"spec": {"selector": "x"}})
    await until(lambda: assignment(w, "web-default-sp") is None, what="unselected")
    # And back: it returns.
    w.kube.patch(GV, "AzureIdentityBinding", "sp-binding", "default", {"spec": {"selector": "app"}})
    await until(lambda: state(w, "web-default-sp") == "Assigned", what="selected again")

    # The pod's label changes: gone.
    w.kube.patch("v1", "Pod", "web", "default", {"metadata": {"labels": {"aadpodidbinding": "y"}}})
    await until(lambda: assignment(w, "web-default-sp") is None, what="label changed")
    w.kube.patch(
        "v1", "Pod", "web", "default", {"metadata": {"labels": {"aadpodidbinding": "app"}}}
    )
    await until(lambda: state(w, "web-default-sp") == "Assigned", what="label back")

    # The binding is deleted: gone; the identity is deleted: gone.
    w.kube.delete(GV, "AzureIdentityBinding", "sp-binding", "default")
    await until(lambda: assignment(w, "web-default-sp") is None, what="binding deleted")
    w.kube.create(m.binding(name="again", namespace="default", identity="sp", selector="app"))
    await until(lambda: state(w, "web-default-sp") == "Assigned", what="new binding")
    w.kube.delete(GV, "AzureIdentity", "sp", "default")
    await until(lambda: assignment(w, "web-default-sp") is None, what="identity deleted")


async def test_a_pod_recreated_on_another_node_gets_its_assignment_moved(
    chain: LoopbackWorld,
) -> None:
    w = chain
    vm = w.arm.add_vm("aks-agentpool-1")
    w.kube.create(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "aks-agentpool-1"},
            "spec": {"providerID": w.arm.provider_id(vm="aks-agentpool-1")},
        }
    )
    ident = w.add_user_assigned_identity("mover", selector="app")
    w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-mover") == "Assigned", what="first node")
    w.kube.delete("v1", "Pod", "web", "default")
    moved = m.pod(
        name="web",
        node="aks-agentpool-1",
        ip="10.0.0.9",
        labels={"aadpodidbinding": "app"},
    )
    status = moved.pop("status")
    w.kube.create(moved)
    w.kube.patch("v1", "Pod", "web", "default", {"status": status}, subresource="status")

    def on_vm() -> bool:
        a = assignment(w, "web-default-mover")
        return bool(a and a["spec"]["nodename"] == "aks-agentpool-1")

    await until(on_vm, what="moved to the VM node")
    await until(lambda: state(w, "web-default-mover") == "Assigned", what="Assigned on VM")
    assert ident.resource_id.lower() in {i.lower() for i in w.arm.identities_on(vm)}
    await until(lambda: not on_vmss(w), what="removed from the scale set")
    assert assignment(w, "web-default-mover")["metadata"]["labels"]["nodename"] == (  # type: ignore[index]
        "aks-agentpool-1"
    )
    assert w.arm.requests["PATCH vm"] == 1


# ------------------------------------------------------------------ namespaced rules and clashes


async def test_namespaced_identities_and_the_name_clash(chain: LoopbackWorld) -> None:
    w = chain
    w.ensure_namespace("team-a")
    w.ensure_namespace("team-b")
    # Namespaced by annotation: only pods of its namespace, assignment in its namespace.
    w.add_service_principal(
        "scoped",
        namespace="team-a",
        selector="app",
        namespaced=True,
    )
    w.add_pod("in-a", namespace="team-a", selector="app")
    w.add_pod("in-b", namespace="team-b", selector="app")
    await until(lambda: state(w, "in-a-team-a-scoped", "team-a") == "Assigned", what="scoped")
    assert assignment(w, "in-b-team-b-scoped", "team-a") is None
    assert assignment(w, "in-b-team-b-scoped", "default") is None

    # Two identities named "shared" (team-a, team-b) selected by one pod: one assignment name.
    w.add_service_principal("shared", namespace="team-a", selector="both")
    w.add_service_principal("shared", namespace="team-b", selector="both")
    w.add_pod("greedy", namespace="team-b", selector="both")
    await until(lambda: state(w, "greedy-team-b-shared") == "Assigned", what="one assigned")
    kept = assignment(w, "greedy-team-b-shared")
    assert kept is not None
    assert kept["spec"]["azureIdentityRef"]["metadata"]["namespace"] == "team-a"
    clash = await until(lambda: events(w, NAME_CLASH), what="the clash event")
    assert clash[0]["type"] == "Warning"
    assert clash[0]["involvedObject"]["name"] == "greedy"
    assert "team-b/shared" in clash[0]["message"] and "team-a/shared" in clash[0]["message"]


async def test_force_namespaced(world: LoopbackWorld) -> None:
    w = world
    await w.start_mic(force_namespaced=True)
    w.ensure_namespace("apps")
    w.add_service_principal("global", namespace="default", selector="app")
    w.add_service_principal("local", namespace="apps", selector="app")
    w.add_pod("web", namespace="apps", selector="app")
    await until(lambda: state(w, "web-apps-local", "apps") == "Assigned", what="local")
    assert assignment(w, "web-apps-global", "default") is None
    assert assignment(w, "web-apps-global", "apps") is None


# ------------------------------------------------------------------ the scale set's identities


async def test_one_identity_shared_by_pods_on_two_instances_stays_until_the_last_goes(
    chain: LoopbackWorld,
) -> None:
    w = chain
    w.arm.set_identities(w.vmss_id, [])
    second = "aks-nodepool1-12345678-vmss000001"
    # A second instance of the same scale set.
    w.kube.create(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": second},
            "spec": {"providerID": w.provider_id.rsplit("/", 1)[0] + "/1"},
        }
    )
    ident = w.add_user_assigned_identity("shared", selector="app")
    w.add_pod("a", selector="app")
    b = m.pod(name="b", node=second, ip="10.0.0.20", labels={"aadpodidbinding": "app"})
    status = b.pop("status")
    w.kube.create(b)
    w.kube.patch("v1", "Pod", "b", "default", {"status": status}, subresource="status")
    await until(lambda: state(w, "a-default-shared") == "Assigned", what="a")
    await until(lambda: state(w, "b-default-shared") == "Assigned", what="b")
    assert arm_writes(w) == 1  # one identity, one scale set: one PATCH

    w.kube.delete("v1", "Pod", "a", "default")
    await until(lambda: assignment(w, "a-default-shared") is None, what="a's gone")
    await quiescent(w.mics[0])
    # b on the other instance still needs it: still there, and nothing was written to ARM.
    assert ident.resource_id.lower() in on_vmss(w)
    assert arm_writes(w) == 1
    w.kube.delete("v1", "Pod", "b", "default")
    await until(lambda: not on_vmss(w), what="the last user gone")


async def test_immutable_and_preexisting_identities_are_never_removed(world: LoopbackWorld) -> None:
    w = world
    # An identity a person put on the scale set, and one named immutable.
    person = w.add_user_assigned_identity("person", selector="app")
    pinned = w.add_user_assigned_identity("pinned", selector="app")
    w.arm.set_identities(w.vmss_id, [person.resource_id])
    await w.start_mic(immutable_user_msis=(pinned.client_id,))
    w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-person") == "Assigned", what="person")
    await until(lambda: state(w, "web-default-pinned") == "Assigned", what="pinned")
    assert on_vmss(w) == {person.resource_id.lower(), pinned.resource_id.lower()}
    assert w.arm.patches[-1].body["identity"]["userAssignedIdentities"] == {
        pinned.resource_id: {}
    } or pinned.resource_id.lower() in {
        k.lower() for k in w.arm.patches[-1].body["identity"]["userAssignedIdentities"]
    }
    writes = arm_writes(w)
    w.kube.delete("v1", "Pod", "web", "default")
    await until(lambda: not all_assignments(w), what="assignments gone")
    await quiescent(w.mics[0])  # whatever the controller would remove, it has removed
    assert on_vmss(w) == {person.resource_id.lower(), pinned.resource_id.lower()}
    assert arm_writes(w) == writes


async def test_the_clusters_own_identity_is_immutable(world: LoopbackWorld) -> None:
    w = world
    own = w.add_user_assigned_identity("kubelet", selector="app")
    w.write_cloudconfig(userAssignedIdentityID=own.client_id)  # as AKS's azure.json names it
    await w.start_mic()
    w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-kubelet") == "Assigned", what="Assigned")
    w.kube.delete("v1", "Pod", "web", "default")
    await until(lambda: not all_assignments(w), what="gone")
    await quiescent(w.mics[0])
    assert own.resource_id.lower() in on_vmss(w)


async def test_a_failing_identity_does_not_hold_back_the_others(chain: LoopbackWorld) -> None:
    w = chain
    good = w.add_user_assigned_identity("good", selector="app")
    bad = w.add_user_assigned_identity("bad", selector="app")
    w.arm.fail_identity(bad.resource_id)
    pod = w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-good") == "Assigned", what="good Assigned")
    assert state(w, "web-default-bad") == "Created"
    assert on_vmss(w) == {good.resource_id.lower()}
    warning = await until(lambda: events(w, BINDING_APPLY_ERROR), what="apply error event")
    assert warning[0]["type"] == "Warning"
    assert warning[0]["involvedObject"]["name"] == "bad-binding"
    assert "FailedIdentityOperation" in warning[0]["message"]

    def annotated() -> str:
        a = assignment(w, "web-default-bad") or {}
        return str(
            (a.get("metadata", {}).get("annotations") or {}).get(
                "aadpodidentity.k8s.io/mic-error", ""
            )
        )

    assert "FailedIdentityOperation" in await until(annotated, what="mic-error annotation")
    await serving(w, pod, good.client_id)
    # nmi explain tells the user what the controller is stuck on.
    out, err = io.StringIO(), io.StringIO()
    argv = ["default/web", "--kubeconfig", str(w.kubeconfig), "--output", "json"]
    argv += ["--admin-socket", str(w.workdir / "no-such.sock")]
    await explain(argv, out=out, err=err, environ={})
    doc = json.loads(out.getvalue())
    mine = [a for a in doc["explanation"]["assignments"] if a["name"] == "web-default-bad"]
    assert mine and "FailedIdentityOperation" in mine[0]["controller"]["last_error"]
    assert "aks-nodepool1-12345678-vmss" in mine[0]["controller"]["step"]

    # Once ARM accepts it (the back-off passes on the drift check), it is applied.
    w.arm.clear_identity_failures()
    mic = w.mics[0]
    assert mic.machines is not None
    for machine in mic.machines._machines.values():
        machine.failed.clear()
    await mic.machines.reconcile_all()
    await until(lambda: state(w, "web-default-bad") == "Assigned", what="bad Assigned")


async def test_a_rotated_secret_is_picked_up_without_a_restart_and_the_failure_shown_meanwhile(
    world: LoopbackWorld,
) -> None:
    w = world
    mic = await w.start_mic()
    w.rotate_mic_secret(publish=False)  # Azure AD has a new secret; azure.json the old one
    ident = w.add_user_assigned_identity("ident", selector="app")
    w.add_pod("web", selector="app")

    def error() -> str:
        a = assignment(w, "web-default-ident") or {}
        notes = a.get("metadata", {}).get("annotations") or {}
        return str(notes.get("aadpodidentity.k8s.io/mic-error", ""))

    why = await until(error, what="the failure on the waiting assignment")
    assert "AuthenticationFailed" in why, why
    assert state(w, "web-default-ident") == "Created"
    assert not on_vmss(w)

    w.write_cloudconfig()  # AKS publishes the rotated secret: no restart
    await until(lambda: state(w, "web-default-ident") == "Assigned", what="Assigned", timeout=30)
    assert ident.resource_id.lower() in on_vmss(w)
    assert error() == ""  # the annotation goes with the wait
    assert mic.cloud is not None and mic.cloud.generation >= 1


async def test_throttling_is_waited_out_with_no_request_meanwhile(chain: LoopbackWorld) -> None:
    w = chain
    w.arm.throttle("write", 1, retry_after=2)
    ident = w.add_user_assigned_identity("slow", selector="app")
    w.add_pod("web", selector="app")
    await until(lambda: w.arm.outcomes[("PATCH vmss", 429)] >= 1, what="a 429")
    throttled_at = time.monotonic()
    patches = w.arm.requests["PATCH vmss"]
    await until(lambda: state(w, "web-default-slow") == "Assigned", what="Assigned after 429")
    assert time.monotonic() - throttled_at >= 1.5
    assert w.arm.requests["PATCH vmss"] == patches + 1
    assert ident.resource_id.lower() in on_vmss(w)


async def test_drift_is_repaired(world: LoopbackWorld) -> None:
    w = world
    await w.start_mic(reconcile_interval=1.0)
    ident = w.add_user_assigned_identity("drifty", selector="app")
    w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-drifty") == "Assigned", what="Assigned")
    w.arm.set_identities(w.vmss_id, [])  # an operator removes it in the portal
    await until(lambda: ident.resource_id.lower() in on_vmss(w), what="put back", timeout=10)
    assert arm_writes(w) == 2


async def test_a_deleted_nodes_assignments_go_without_an_arm_call(chain: LoopbackWorld) -> None:
    w = chain
    w.add_user_assigned_identity("ident", selector="app")
    w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-ident") == "Assigned", what="Assigned")
    calls = sum(w.arm.requests.values())
    w.kube.delete("v1", "Node", w.node)
    await until(lambda: assignment(w, "web-default-ident") is None, what="assignment gone")
    await quiescent(w.mics[0])
    assert sum(w.arm.requests.values()) == calls


# ------------------------------------------------------------------ restart and leadership


async def test_a_restarted_controller_adopts_what_is_right_and_writes_nothing(
    world: LoopbackWorld,
) -> None:
    w = world
    first = await w.start_mic()
    idents = [w.add_user_assigned_identity(f"id{i}", selector=f"app{i % 2}") for i in range(3)]
    w.add_service_principal("sp", selector="app0")
    for n in range(6):
        w.add_pod(f"pod{n}", selector=f"app{n % 2}")
    await until(
        lambda: (
            len(all_assignments(w)) == 12
            and all(a["status"]["status"] == "Assigned" for a in all_assignments(w))
        ),
        what="all assigned",
    )
    assert on_vmss(w) == {i.resource_id.lower() for i in idents}
    await w.stop_mic(first)
    kube_before, arm_before = kube_writes(w), arm_writes(w)
    second = await w.start_mic()
    await until(second.is_acting, what="the new replica acting")
    assert second.controller is not None
    await until(lambda: second.controller.reconciles >= 6, what="every pod reconciled")
    await quiescent(second)
    assert kube_writes(w) == kube_before
    assert arm_writes(w) == arm_before
    # And it still acts: a new pod is assigned.
    w.add_pod("late", selector="app1")
    await until(lambda: state(w, "late-default-id1") == "Assigned", what="late pod")


async def test_the_ledger_survives_a_leader_change(world: LoopbackWorld) -> None:
    w = world
    first = await w.start_mic()
    ident = w.add_user_assigned_identity("led", selector="app")
    w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-led") == "Assigned", what="Assigned")
    ledger = w.kube.get("v1", "ConfigMap", "nmi-mic-ledger", MIC_NAMESPACE)
    assert ledger is not None
    entry = json.loads(ledger["data"][ledger_key(w.vmss_id)])
    assert entry["added"] == [ident.resource_id.lower()]
    await w.stop_mic(first)
    w.kube.delete("v1", "Pod", "web", "default")  # while no controller runs
    await w.start_mic()
    await until(lambda: not on_vmss(w), what="the new leader removes what the old one added")


async def probe(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def test_two_replicas_exactly_one_acts_and_healthz_says_which(world: LoopbackWorld) -> None:
    w = world
    one = await w.start_mic(leader_duration=3.0)
    await until(one.is_acting, what="first replica leads")
    two = await w.start_mic(leader_duration=3.0)
    assert await probe(one.probes.port, "/healthz") == (200, "Active")
    assert await probe(two.probes.port, "/healthz") == (200, "Not Active")
    assert (await probe(two.probes.port, "/readyz"))[0] == 200
    w.add_service_principal("sp", selector="app")
    w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-sp") == "Assigned", what="Assigned")
    assert two.controller is not None and two.controller.reconciles == 0
    lease = w.kube.get("coordination.k8s.io/v1", "Lease", "nmi-mic", MIC_NAMESPACE)
    assert lease is not None and lease["spec"]["holderIdentity"] == one.settings.leader_instance

    # A clean stop releases the lease: the other takes over at once, not after 3 s.
    stopped = time.monotonic()
    await w.stop_mic(one)
    await until(two.is_acting, what="the second replica takes over", timeout=5)
    assert time.monotonic() - stopped < 2.5
    assert await probe(two.probes.port, "/healthz") == (200, "Active")
    w.add_pod("after", selector="app")
    await until(lambda: state(w, "after-default-sp") == "Assigned", what="the new leader acts")


async def test_a_replica_that_cannot_renew_stops_writing_before_another_can_lead(
    world: LoopbackWorld,
) -> None:
    w = world
    one: Mic = await w.start_mic(leader_duration=3.0)
    await until(one.is_acting)
    two: Mic = await w.start_mic(leader_duration=3.0)
    assert one.elector is not None and two.elector is not None

    # Cut the leader off from the Lease: every renewal fails from now on.
    original = one.elector._try

    async def partitioned() -> bool:
        raise aiohttp.ClientConnectionError("partitioned")

    one.elector._try = partitioned  # type: ignore[method-assign]
    cut = time.monotonic()
    stopped_at: list[float] = []
    took_at: list[float] = []

    async def watch() -> None:
        while not (stopped_at and took_at):
            now = time.monotonic()
            if not stopped_at and not one.is_acting():
                stopped_at.append(now)
            if not took_at and two.is_acting():
                took_at.append(now)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(watch(), timeout=10)
    assert stopped_at[0] < took_at[0], "the old leader acted while the new one did"
    assert stopped_at[0] - cut <= one.settings.renew_deadline + 0.2
    assert took_at[0] - cut <= one.settings.leader_duration + 2
    one.elector._try = original  # type: ignore[method-assign]


async def test_metrics_under_aad_pod_identitys_names(chain: LoopbackWorld) -> None:
    w = chain
    mic = w.mics[0]
    w.add_user_assigned_identity("ident", selector="app")
    w.add_pod("web", selector="app")
    await until(lambda: state(w, "web-default-ident") == "Assigned", what="Assigned")
    status, text = await probe(mic.metrics_server.port, "/metrics")
    assert status == 200
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    # Exact names, as aad-pod-identity's dashboards query them (no "_total" appended).
    assert samples["aadpodidentity_mic_new_leader_election_count"] == 1
    assert samples["aadpodidentity_mic_cycle_count"] >= 1
    assert samples["aadpodidentity_assigned_identity_addition_count"] == 1
    assert samples["aadpodidentity_mic_cycle_duration_seconds_count"] >= 1
    for op in ("vmss_get", "vmss_update"):
        name = "aadpodidentity_cloud_provider_operations_duration_seconds_count"
        key = f'{name}{{operation_type="{op}"}}'
        assert samples[key] == 1, op
    assert samples["nmi_mic_assignment_latency_seconds_count"] == 1
    assert not [name for name in samples if name.endswith("_count_total")]
