"""Reading aadpodidentity objects as aad-pod-identity wrote them."""

from nmi.kube.objects import (
    AzureAssignedIdentity,
    AzureIdentity,
    AzureIdentityBinding,
    AzurePodIdentityException,
    Pod,
    Secret,
    field_ci,
)
from nmi_sandbox import manifests as m


def test_field_ci_prefers_exact_match() -> None:
    assert field_ci({"clientID": "a", "ClientID": "b"}, "ClientID") == "b"
    assert field_ci({"CLIENTID": "x"}, "clientID") == "x"
    assert field_ci(None, "x", 1) == 1


def test_legacy_capitalised_identity_and_binding() -> None:
    ident = AzureIdentity.parse(
        m.azure_identity(
            name="id", type=1, client_id="cid", tenant_id="t", secret_name="s", legacy_keys=True
        )
    )
    assert (ident.client_id, ident.tenant_id, ident.type) == ("cid", "t", 1)
    assert ident.secret_ref is not None and ident.secret_ref.name == "s"
    b = AzureIdentityBinding.parse(
        m.binding(name="b", identity="id", selector="sel", legacy_keys=True)
    )
    assert (b.azure_identity, b.selector) == ("id", "sel")


def test_type_as_string_and_unknown_type() -> None:
    raw = m.azure_identity(name="id", client_id="c")
    raw["spec"]["type"] = "2"
    assert AzureIdentity.parse(raw).type == 2
    raw["spec"]["type"] = 7
    assert AzureIdentity.parse(raw).type is None


def test_namespaced_annotation_and_fingerprint() -> None:
    a = AzureIdentity.parse(m.azure_identity(name="id", client_id="c", namespaced=True))
    assert a.namespaced
    raw = m.azure_identity(name="id", client_id="c")
    raw["metadata"]["resourceVersion"] = "5"
    b1 = AzureIdentity.parse(raw)
    raw["metadata"]["resourceVersion"] = "6"
    b2 = AzureIdentity.parse(raw)
    assert b1.fingerprint == b2.fingerprint
    raw["spec"]["clientID"] = "other"
    assert AzureIdentity.parse(raw).fingerprint != b1.fingerprint


def test_assigned_identity_lowercase_nodename_and_embedded_refs() -> None:
    ident = m.azure_identity(name="id", client_id="c")
    bind = m.binding(name="b", identity="id", selector="s")
    raw = m.assigned_identity(
        pod_name="p",
        pod_namespace="ns",
        node="n1",
        identity=ident,
        binding_obj=bind,
        state="Created",
    )
    a = AzureAssignedIdentity.parse(raw)
    assert (a.pod, a.pod_namespace, a.node_name, a.state) == ("p", "ns", "n1", "Created")
    assert a.identity.client_id == "c" and a.binding is not None


def test_exception_matches_any_pair_case_insensitive_value() -> None:
    exc = AzurePodIdentityException.parse(m.exception(name="e", labels={"app": "MIC", "x": "y"}))
    assert exc.matches(Pod.parse(m.pod(name="p", node="n", ip="1.2.3.4", labels={"app": "mic"})))
    assert not exc.matches(
        Pod.parse(m.pod(name="p", node="n", ip="1.2.3.4", labels={"app": "nope"}))
    )


def test_pod_can_call() -> None:
    assert Pod.parse(m.pod(name="p", node="n", ip="10.0.0.1")).can_call
    assert not Pod.parse(m.pod(name="p", node="n", ip="10.0.0.1", phase="Succeeded")).can_call
    assert not Pod.parse(m.pod(name="p", node="n", ip="10.0.0.1", host_network=True)).can_call


def test_secret_repr_hides_values() -> None:
    s = Secret.parse(m.secret(name="s", data={"clientsecret": b"hunter2"}))
    assert s.data["clientsecret"] == b"hunter2"
    assert "hunter2" not in repr(s)


def test_pod_creation_time_and_only_own_annotations_are_kept() -> None:
    raw = m.pod(name="p", namespace="ns", node="n", ip="10.0.0.1", labels={"app": "x"})
    raw["metadata"]["creationTimestamp"] = "2026-11-26T19:00:00Z"
    raw["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 5000 + "}",
        "AADPodIdentity.k8s.io/Behavior": "namespaced",
    }
    pod = Pod.parse(raw)
    assert pod.created == 1795719600.0
    assert dict(pod.meta.annotations) == {"AADPodIdentity.k8s.io/Behavior": "namespaced"}
    assert dict(pod.meta.labels) == {"app": "x"}
    bare = Pod.parse({"metadata": {"name": "q", "creationTimestamp": "not a time"}})
    assert bare.created == 0.0
    assert bare.meta.labels is bare.meta.annotations  # one shared empty map
