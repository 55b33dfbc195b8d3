"""The identity decision, standard and managed, as pure logic over a cluster view."""

import dataclasses

import pytest

from nmi.config import OperationMode, Settings
from nmi.identity.decide import Deny, Grant, IdentitySelector, UseNodeIdentity, Wait, decide
from nmi.kube.index import ClusterIndex
from nmi.kube.objects import (
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    AzurePodIdentityException,
    Pod,
)
from nmi_sandbox import manifests as m

NODE = "node-1"
CID_A = "aaaaaaaa-0000-0000-0000-000000000001"
CID_B = "bbbbbbbb-0000-0000-0000-000000000002"
RID_A = (
    "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/"
    "userAssignedIdentities/a"
)


def settings(**kw: object) -> Settings:
    return Settings(node_name=NODE, **kw)  # type: ignore[arg-type]


def world(index: ClusterIndex, *, ns: str = "default") -> Pod:
    p = Pod.parse(
        m.pod(
            name="app",
            namespace=ns,
            node=NODE,
            ip="10.0.0.5",
            labels={"aadpodidbinding": "sel"},
            uid="u1",
        )
    )
    index.put(p)
    return p


def identity(
    name: str, cid: str, *, ns: str = "default", rid: str = "", namespaced: bool = False
) -> dict:
    raw = m.azure_identity(
        name=name, namespace=ns, client_id=cid, resource_id=rid, namespaced=namespaced
    )
    raw["metadata"]["uid"] = f"uid-{ns}-{name}"
    return raw


def assign(index: ClusterIndex, pod: Pod, ident: dict, state: str = "Assigned") -> None:
    """What MIC writes: the identity and its binding embedded."""
    ns, name = ident["metadata"]["namespace"], ident["metadata"]["name"]
    index.put(
        AzureAssignedIdentity.parse(
            m.assigned_identity(
                pod_name=pod.meta.name,
                pod_namespace=pod.meta.namespace,
                node=NODE,
                identity=ident,
                binding_obj=m.binding(
                    name=f"b-{name}", namespace=ns, identity=name, selector="sel"
                ),
                state=state,
            )
        )
    )


def bind(index: ClusterIndex, ident: dict, selector: str = "sel") -> None:
    index.put(AzureIdentity.parse(ident))
    ns = ident["metadata"]["namespace"]
    index.put(
        AzureIdentityBinding.parse(
            m.binding(
                name=f"b-{ident['metadata']['name']}",
                namespace=ns,
                identity=ident["metadata"]["name"],
                selector=selector,
            )
        )
    )


def run(index: ClusterIndex, pod: Pod, s: Settings | None = None, **sel: str):  # type: ignore[no-untyped-def]
    return decide(index=index, settings=s or settings(), pod=pod, selector=IdentitySelector(**sel))


def test_single_assigned_identity_is_granted() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    ident = identity("a", CID_A, rid=RID_A)
    bind(idx, ident)
    assign(idx, pod, ident)
    d = run(idx, pod)
    assert isinstance(d, Grant) and d.identity.client_id == CID_A
    assert isinstance(run(idx, pod, client_id=CID_A.upper()), Grant)
    assert isinstance(run(idx, pod, resource_id=RID_A.lower()), Grant)


def test_no_binding_is_refused_at_once() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    d = run(idx, pod)
    assert isinstance(d, Deny) and d.kind == "not_found"


def test_binding_without_assignment_waits_for_created() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    bind(idx, identity("a", CID_A))
    d = run(idx, pod)
    assert isinstance(d, Wait) and d.stage == "created"
    # asking for an identity no binding gives: refused at once
    d = run(idx, pod, client_id=CID_B)
    assert isinstance(d, Deny)


def test_created_waits_for_assigned() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    ident = identity("a", CID_A)
    bind(idx, ident)
    assign(idx, pod, ident, state="Created")
    d = run(idx, pod)
    assert isinstance(d, Wait) and d.stage == "assigned"
    assign(idx, pod, ident, state="Assigned")
    assert isinstance(run(idx, pod), Grant)


def test_legacy_empty_state_is_usable_and_unassigned_is_not() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    ident = identity("a", CID_A)
    bind(idx, ident)
    assign(idx, pod, ident, state="")
    assert isinstance(run(idx, pod), Grant)
    assign(idx, pod, ident, state="Unassigned")
    assert not isinstance(run(idx, pod), Grant)  # MIC is taking it away


def test_several_identities_without_selector_is_multiple_never_a_pick() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    a, b = identity("a", CID_A), identity("b", CID_B)
    bind(idx, a)
    bind(idx, b)
    assign(idx, pod, a)
    assign(idx, pod, b, state="Created")
    d = run(idx, pod)
    assert isinstance(d, Deny) and d.kind == "multiple"
    d = run(idx, pod, client_id=CID_A)
    assert isinstance(d, Grant) and d.identity.client_id == CID_A
    d = run(idx, pod, client_id=CID_B)
    assert isinstance(d, Wait)


def test_identity_of_another_pod_is_not_granted() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    other = Pod.parse(m.pod(name="other", node=NODE, ip="10.0.0.6"))
    idx.put(other)
    ident = identity("a", CID_A)
    assign(idx, other, ident)
    assert isinstance(run(idx, pod, client_id=CID_A), Deny)
    assert isinstance(run(idx, pod), Deny)


def test_assignment_for_another_node_is_ignored() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    raw = m.assigned_identity(
        pod_name="app", pod_namespace="default", node="node-2", identity=identity("a", CID_A)
    )
    idx.put(AzureAssignedIdentity.parse(raw))
    assert isinstance(run(idx, pod), Deny)


@pytest.mark.parametrize("how", ["flag", "annotation"])
def test_namespaced_rules(how: str) -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx, ns="team-a")
    ident = identity("a", CID_A, ns="team-b", namespaced=how == "annotation")
    bind(idx, ident)
    assign(idx, pod, ident)
    s = settings(force_namespaced=how == "flag")
    d = run(idx, pod, s)
    assert isinstance(d, Deny)
    # without namespacing it is allowed
    if how == "flag":
        assert isinstance(run(idx, pod, settings()), Grant)


def test_exception_pod_uses_node_identity() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = Pod.parse(m.pod(name="mic", node=NODE, ip="10.0.0.9", labels={"app": "mic"}))
    idx.put(pod)
    idx.put(AzurePodIdentityException.parse(m.exception(name="mic", labels={"app": "mic"})))
    assert isinstance(run(idx, pod), UseNodeIdentity)
    # an exception in another namespace does not apply
    pod2 = Pod.parse(
        m.pod(name="mic", namespace="other", node=NODE, ip="10.0.0.10", labels={"app": "mic"})
    )
    idx.put(pod2)
    assert isinstance(run(idx, pod2), Deny)


def test_no_name_prefix_bypass() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = Pod.parse(m.pod(name="mic-7d9f", node=NODE, ip="10.0.0.11"))
    idx.put(pod)
    assert isinstance(run(idx, pod), Deny)


def test_managed_mode_uses_bindings_in_pod_namespace() -> None:
    s = settings(operation_mode=OperationMode.MANAGED)
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx, ns="team-a")
    bind(idx, identity("a", CID_A, ns="team-a"))
    bind(idx, identity("b", CID_B, ns="team-b"))  # same selector, other namespace
    d = run(idx, pod, s)
    assert isinstance(d, Grant) and d.identity.client_id == CID_A
    assert isinstance(run(idx, pod, s, client_id=CID_B), Deny)
    bind(idx, identity("c", "cccccccc-0000-0000-0000-000000000003", ns="team-a"))
    d = run(idx, pod, s)
    assert isinstance(d, Deny) and d.kind == "multiple"


def test_object_id_matches_only_learned_ids() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    ident = identity("a", CID_A)
    bind(idx, ident)
    assign(idx, pod, ident)
    assert isinstance(run(idx, pod, object_id="oid-1"), Deny)
    d = decide(
        index=idx,
        settings=settings(),
        pod=pod,
        selector=IdentitySelector(object_id="OID-1"),
        object_id_of=lambda i: "oid-1" if i.client_id == CID_A else None,
    )
    assert isinstance(d, Grant)


def test_deleting_assignment_is_not_usable() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    raw = m.assigned_identity(
        pod_name="app", pod_namespace="default", node=NODE, identity=identity("a", CID_A)
    )
    raw["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    idx.put(AzureAssignedIdentity.parse(raw))
    assert isinstance(run(idx, pod), Deny)


def test_settings_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings().port = 1  # type: ignore[misc]


def granted(idx: ClusterIndex, pod: Pod) -> bool:
    return isinstance(run(idx, pod), Grant)


@pytest.mark.parametrize(
    "revoke",
    ["delete binding", "delete identity", "relabel pod", "binding to another identity"],
)
def test_revocation_stops_service_whether_or_not_mic_keeps_up(revoke: str) -> None:
    """Standard mode: the assignment alone is not enough; the live binding must still
    select the pod and name the identity, and the identity must still exist (issue 10)."""
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    ident = identity("a", CID_A)
    bind(idx, ident)
    assign(idx, pod, ident)
    assert granted(idx, pod)
    binding = idx.binding("default", "b-a")
    assert binding is not None
    if revoke == "delete binding":
        idx.remove(binding)
    elif revoke == "delete identity":
        idx.remove(AzureIdentity.parse(ident))
    elif revoke == "relabel pod":
        pod = dataclasses.replace(
            pod, meta=dataclasses.replace(pod.meta, labels={"aadpodidbinding": "other"})
        )
        idx.put(pod)
    else:
        idx.put(dataclasses.replace(binding, azure_identity="b"))
    assert not granted(idx, pod)  # the assignment is still there, unchanged


def test_the_live_identity_spec_is_used() -> None:
    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    ident = identity("a", CID_A)
    bind(idx, ident)
    assign(idx, pod, ident)
    edited = identity("a", CID_B)  # the identity's client id was edited since
    idx.put(AzureIdentity.parse(edited))
    d = run(idx, pod)
    assert isinstance(d, Grant) and d.identity.client_id == CID_B


def test_a_young_assignment_waits_for_its_binding_to_arrive_an_old_one_is_refused() -> None:
    """Assignments and bindings come on separate watches: nmi may see the assignment first."""
    import datetime
    import time

    idx = ClusterIndex(node_name=NODE)
    pod = world(idx)
    ident = identity("a", CID_A)
    idx.put(AzureIdentity.parse(ident))  # the binding has not arrived yet
    for age, expected in ((0.0, Wait), (3600.0, Deny)):
        raw = m.assigned_identity(
            pod_name="app",
            pod_namespace="default",
            node=NODE,
            identity=ident,
            binding_obj=m.binding(name="b-a", namespace="default", identity="a", selector="sel"),
        )
        stamp = datetime.datetime.fromtimestamp(time.time() - age, datetime.UTC)
        raw["metadata"]["creationTimestamp"] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        idx.put(AzureAssignedIdentity.parse(raw))
        assert isinstance(run(idx, pod), expected), age
