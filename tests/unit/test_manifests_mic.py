"""The MIC's manifests (``daemonset/mic/``): a Deployment of ``nmi mic`` beside nmi.

Held to their promises offline, from the files and from the standard entry point's
rendering (``kubectl kustomize daemonset/``, skipped only where kubectl is absent):
the command line, least-privilege RBAC (exactly the permissions below, by name where RBAC
allows), the Deployment's scheduling, probes, resources, security context and volumes,
and the AzurePodIdentityException that lets the MIC's own pods reach the node's identity.
Schema validation of every object (built-in kinds and the exception against its CRD) and
the layout of the entry points are checked in ``test_manifests.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import pytest

from nmi.flags import go_style
from nmi.kube import objects
from tests.unit.test_manifests import (
    DEPLOY,
    GROUP,
    GROUP_VERSION,
    MIC_OBJECTS,
    MIC_SOURCES,
    NAMESPACE,
    NMI_SOURCES,
    Obj,
    _accept,
    _ident,
    _k8s_validate,
    _one,
    _render,
    needs_kubectl,
)

NAME = "nmi-mic"
LEDGER = "nmi-mic-ledger"
LABELS = {
    "app.kubernetes.io/name": "nmi",
    "app.kubernetes.io/component": "mic",
    "app.kubernetes.io/part-of": "nmi",
}
MIC_ARGS = [
    "mic",
    "--cloudconfig=/etc/kubernetes/azure.json",
    "--leader-election-namespace=$(MIC_POD_NAMESPACE)",
    "--leader-election-name=nmi-mic",
    "--http-probe-port=8080",
    "--prometheus-port=8888",
    "--clientQps=50",
    "--log-format=json",
]
# The flags `nmi mic` must accept, exactly these and in this order.
MIC_FLAGS = [
    "--cloudconfig",
    "--leader-election-namespace",
    "--leader-election-name",
    "--http-probe-port",
    "--prometheus-port",
    "--clientQps",
    "--log-format",
]
AZURE_JSON = "/etc/kubernetes/azure.json"


def _deployment() -> Obj:
    return _one(MIC_SOURCES, "Deployment", NAME)


def _pod() -> Obj:
    return _deployment()["spec"]["template"]["spec"]


def _container() -> Obj:
    (container,) = _pod()["containers"]
    return container


# ------------------------------------------------------------------------------ the objects


def test_mic_objects_and_their_labels() -> None:
    assert sorted(_ident(o) for o in MIC_SOURCES) == sorted(MIC_OBJECTS)
    for obj in MIC_SOURCES:
        assert obj["metadata"]["labels"] == LABELS, _ident(obj)
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, _ident(obj)
    # The same label keys as nmi's DaemonSet, with component telling the two apart.
    ds_labels = _one(NMI_SOURCES, "DaemonSet", "nmi")["metadata"]["labels"]
    assert set(ds_labels) == set(LABELS)
    assert ds_labels["app.kubernetes.io/component"] == "nmi"
    assert _deployment()["spec"]["template"]["metadata"]["labels"] == LABELS


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    """The standard-mode install: ``kubectl kustomize daemonset/``."""
    return _render(DEPLOY)


@needs_kubectl
def test_standard_entry_point_renders_the_mic_as_written(rendered: list[Obj]) -> None:
    """The entry point adds nothing to the MIC's objects (the image name stays ``nmi``)."""
    for source in MIC_SOURCES:
        (out,) = [o for o in rendered if _ident(o) == _ident(source)]
        assert out == source, _ident(source)


@pytest.mark.parametrize("obj", MIC_SOURCES, ids=_ident)
def test_mic_object_is_valid(obj: Obj) -> None:
    if obj["apiVersion"] == GROUP_VERSION:
        _accept(obj)
    else:
        _k8s_validate(obj)


# --------------------------------------------------------------------------- command line


def test_mic_command_line() -> None:
    container = _container()
    assert container["name"] == "mic"
    assert container["image"] == "nmi:0.1.0"
    assert "command" not in container, "the image's ENTRYPOINT is nmi: args start with mic"
    assert container["args"] == MIC_ARGS
    assert [a.partition("=")[0] for a in container["args"][1:]] == MIC_FLAGS
    assert all("=" in a for a in container["args"][1:]), "one token per flag and value"


def _mic_parser() -> Any:
    """``nmi.mic.flags.build_parser()``; skips while the module does not exist.

    A module that exists but fails to import fails the test instead of skipping it.
    """
    if importlib.util.find_spec("nmi.mic") is None:
        pytest.skip("nmi mic not built yet")
    if importlib.util.find_spec("nmi.mic.flags") is None:
        pytest.skip("nmi mic not built yet")
    return importlib.import_module("nmi.mic.flags").build_parser()


def test_mic_args_are_accepted_by_nmi_mic() -> None:
    parser = _mic_parser()
    options = {s: a for a in parser._actions for s in a.option_strings}
    assert not [f for f in MIC_FLAGS if f not in options], "flags nmi mic does not know"
    argv = _container()["args"]
    assert argv[0] == "mic"  # `nmi mic` hands the rest to this parser
    args = parser.parse_args(go_style(argv[1:]))

    def value(flag: str) -> Any:
        got = getattr(args, options[flag].dest)
        return getattr(got, "value", got)  # an Enum's value

    assert value("--cloudconfig") == AZURE_JSON
    # The kubelet expands $(MIC_POD_NAMESPACE); argparse sees it verbatim.
    assert value("--leader-election-namespace") == "$(MIC_POD_NAMESPACE)"
    assert value("--leader-election-name") == NAME
    assert int(value("--http-probe-port")) == 8080
    assert int(value("--prometheus-port")) == 8888
    assert float(value("--clientQps")) == 50
    assert value("--log-format") == "json"


def test_mic_env_from_the_downward_api() -> None:
    env = {e["name"]: e for e in _container()["env"]}
    assert env == {
        "MIC_POD_NAMESPACE": {
            "name": "MIC_POD_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
        "MIC_POD_NAME": {
            "name": "MIC_POD_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        },
    }
    assert "--leader-election-namespace=$(MIC_POD_NAMESPACE)" in _container()["args"]


# ------------------------------------------------------------------------------ Deployment


def test_mic_scheduling() -> None:
    deployment = _deployment()
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    template_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"] == {
        "matchLabels": {
            "app.kubernetes.io/name": "nmi",
            "app.kubernetes.io/component": "mic",
        }
    }
    assert spec["selector"]["matchLabels"].items() <= template_labels.items()
    pod = _pod()
    assert pod["serviceAccountName"] == NAME
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert "tolerations" not in pod
    assert pod.get("initContainers") is None
    affinity = pod["affinity"]
    assert set(affinity) == {"podAntiAffinity"}
    anti = affinity["podAntiAffinity"]
    assert set(anti) == {"preferredDuringSchedulingIgnoredDuringExecution"}, "preferred only"
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["weight"] == 100
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    # The term selects the MIC's own replicas (and nothing of nmi's DaemonSet).
    selector = term["podAffinityTerm"]["labelSelector"]
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"].items() <= template_labels.items()
    ds_labels = _one(NMI_SOURCES, "DaemonSet", "nmi")["spec"]["template"]["metadata"]["labels"]
    assert not selector["matchLabels"].items() <= ds_labels.items()


def test_mic_probes_and_ports() -> None:
    container = _container()
    # Not hostNetwork: the kubelet probes the pod's IP, so no `host:` (not loopback).
    ready = container["readinessProbe"]
    assert ready["httpGet"] == {"path": "/readyz", "port": 8080}
    assert (ready["periodSeconds"], ready["failureThreshold"]) == (5, 3)
    live = container["livenessProbe"]
    assert live["httpGet"] == {"path": "/healthz", "port": 8080}
    assert (live["initialDelaySeconds"], live["periodSeconds"], live["failureThreshold"]) == (
        10,
        10,
        6,
    )
    assert "--http-probe-port=8080" in container["args"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 8888, "protocol": "TCP"}]
    assert "--prometheus-port=8888" in container["args"]


def test_mic_resources_have_no_cpu_limit() -> None:
    resources = _container()["resources"]
    assert resources == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "256Mi"},
    }


def test_mic_security_context() -> None:
    sc = _container()["securityContext"]
    assert sc == {
        "runAsUser": 0,  # azure.json is root's, mode 0600
        "runAsNonRoot": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},  # and nothing added
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert not _pod().get("securityContext")


def test_mic_volumes() -> None:
    pod = _pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in _container()["volumeMounts"]}
    assert set(volumes) == set(mounts) == {"azure-json", "tmp"}
    # The node's azure.json, read-only, and nothing else of the host.
    host_paths = {n: v["hostPath"] for n, v in volumes.items() if "hostPath" in v}
    assert host_paths == {"azure-json": {"path": AZURE_JSON, "type": "File"}}
    assert mounts["azure-json"] == {
        "name": "azure-json",
        "mountPath": AZURE_JSON,
        "readOnly": True,
    }
    assert f"--cloudconfig={AZURE_JSON}" in _container()["args"]
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert mounts["tmp"] == {"name": "tmp", "mountPath": "/tmp"}
    # akscustom.json (Azure Stack) is documented, not mounted: a hostPath of type File
    # must exist, and FileOrCreate would create an empty one on every node.
    assert all(v["hostPath"]["type"] == "File" for v in volumes.values() if "hostPath" in v), (
        "no FileOrCreate / DirectoryOrCreate"
    )
    assert "AZURE_ENVIRONMENT_FILEPATH" not in {e["name"] for e in _container()["env"]}


# ------------------------------------------------------------------------------------ RBAC

Permission = tuple[str, str, str | None]  # (apiGroup, resource, resourceName or None: any)

EXPECTED_CLUSTER_PERMISSIONS: dict[Permission, set[str]] = {
    ("", "pods", None): {"get", "list", "watch"},
    ("", "nodes", None): {"get", "list", "watch"},
    (GROUP, "azureidentities", None): {"get", "list", "watch"},
    (GROUP, "azureidentitybindings", None): {"get", "list", "watch"},
    (GROUP, "azureassignedidentities", None): {
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
    },
    ("", "events", None): {"create", "patch"},
}
EXPECTED_NAMESPACE_PERMISSIONS: dict[Permission, set[str]] = {
    # get/update by name; create cannot be restricted by name (the object does not exist).
    ("coordination.k8s.io", "leases", NAME): {"get", "update"},
    ("coordination.k8s.io", "leases", None): {"create"},
    ("", "configmaps", LEDGER): {"get", "update"},
    ("", "configmaps", None): {"create"},
}
WRITES = {"create", "update", "patch", "delete", "deletecollection"}
SPECIAL = {"escalate", "bind", "impersonate", "use", "approve", "sign", "proxy", "*"}


def _permissions(rules: list[Obj]) -> dict[Permission, set[str]]:
    out: dict[Permission, set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames") or [None]:
                    out.setdefault((group, resource, name), set()).update(rule["verbs"])
    return out


def _roles() -> list[Obj]:
    return [o for o in MIC_SOURCES if o["kind"] in ("ClusterRole", "Role")]


def test_mic_rbac_rules_have_no_wildcard() -> None:
    assert sorted(_ident(r) for r in _roles()) == [
        "ClusterRole/nmi-mic",
        f"Role/{NAMESPACE}/{NAME}",
    ]
    for role in _roles():
        assert "aggregationRule" not in role
        for rule in role["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert all("*" not in item for item in rule.get(key, [])), rule
            assert all("/" not in r for r in rule["resources"]), "no subresource"


def test_mic_cluster_role_is_exactly_least_privilege() -> None:
    role = _one(MIC_SOURCES, "ClusterRole", NAME)
    assert _permissions(role["rules"]) == EXPECTED_CLUSTER_PERMISSIONS


def test_mic_namespaced_role_is_exactly_least_privilege() -> None:
    role = _one(MIC_SOURCES, "Role", NAME)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _permissions(role["rules"]) == EXPECTED_NAMESPACE_PERMISSIONS
    # The named Lease is the one the MIC campaigns for.
    assert f"--leader-election-name={NAME}" in _container()["args"]


def test_mic_writes_only_its_assignments_events_lease_and_ledger() -> None:
    granted = {
        **_permissions(_one(MIC_SOURCES, "ClusterRole", NAME)["rules"]),
        **_permissions(_one(MIC_SOURCES, "Role", NAME)["rules"]),
    }
    writers = {perm for perm, verbs in granted.items() if verbs & WRITES}
    assert writers == {
        (GROUP, "azureassignedidentities", None),
        ("", "events", None),
        ("coordination.k8s.io", "leases", NAME),
        ("coordination.k8s.io", "leases", None),
        ("", "configmaps", LEDGER),
        ("", "configmaps", None),
    }
    # Unnamed Lease / ConfigMap rights are create only: no read or write of another's.
    for resource in ("leases", "configmaps"):
        unnamed = [v for (_, r, n), v in granted.items() if r == resource and n is None]
        assert unnamed == [{"create"}], resource
    assert not any(verbs & SPECIAL for verbs in granted.values())
    resources = {r for _, r, _ in granted}
    assert not resources & {"secrets", "azurepodidentityexceptions", "endpoints"}
    assert not any(g == "apiextensions.k8s.io" for g, _, _ in granted)


def test_mic_role_bindings_grant_the_mic_service_account() -> None:
    subject = [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    crb = _one(MIC_SOURCES, "ClusterRoleBinding", NAME)
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": NAME,
    }
    assert crb["subjects"] == subject
    rb = _one(MIC_SOURCES, "RoleBinding", NAME)
    assert rb["metadata"]["namespace"] == NAMESPACE
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME}
    assert rb["subjects"] == subject
    sa = _one(MIC_SOURCES, "ServiceAccount", NAME)
    assert sa["metadata"]["namespace"] == NAMESPACE
    assert _pod()["serviceAccountName"] == NAME


# ------------------------------------------------------------------------------- exception


def _template_pod(workload: Obj) -> objects.Pod:
    """A pod of ``workload`` as nmi sees it (namespace from the workload)."""
    template = workload["spec"]["template"]
    return objects.Pod.parse(
        {
            "metadata": {
                **template["metadata"],
                "namespace": workload["metadata"]["namespace"],
                "name": "pod",
            },
            "spec": template["spec"],
        }
    )


def test_exception_selects_the_mic_pods_only() -> None:
    raw = _one(MIC_SOURCES, "AzurePodIdentityException", NAME)
    exception = objects.AzurePodIdentityException.parse(raw)
    assert exception.meta.namespace == NAMESPACE  # an exception applies in its namespace only
    assert dict(exception.pod_labels) == {"app.kubernetes.io/component": "mic"}
    mic = _template_pod(_deployment())
    assert mic.meta.namespace == exception.meta.namespace
    assert exception.matches(mic)
    # Every pair it lists is a label of the MIC's pods (any one pair would do for nmi).
    assert exception.pod_labels.items() <= mic.meta.labels.items()
    assert not exception.matches(_template_pod(_one(NMI_SOURCES, "DaemonSet", "nmi")))
