"""The Kubernetes API server emulator, exercised through the real kubernetes_asyncio client."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from nmi_sandbox.kube import KubeApiError, KubeApiServer
from nmi_sandbox.tls import CertificateAuthority

AAD = "aadpodidentity.k8s.io"
COORDINATION = "coordination.k8s.io"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
async def kube(ca: CertificateAuthority) -> AsyncIterator[KubeApiServer]:
    server = KubeApiServer(ca=ca, bookmark_interval=0.2)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _api_client(kubeconfig: dict[str, Any]) -> client.ApiClient:
    cfg = client.Configuration()
    await config.load_kube_config_from_dict(kubeconfig, client_configuration=cfg)
    return client.ApiClient(cfg)


@pytest.fixture
async def api(kube: KubeApiServer, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    cfg = client.Configuration()
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    await config.load_kube_config(config_file=str(path), client_configuration=cfg)
    async with client.ApiClient(cfg) as c:
        yield c


def pod(name: str, *, ns: str = "default", node: str = "n1", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox:1.36"}]},
    }


def b64(**data: str) -> dict[str, str]:
    """Secret ``data`` as stored and returned: the values base64-encoded."""
    return {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}


def secret(name: str, ns: str = "default", **data: str) -> dict[str, Any]:
    """An Opaque Secret; ``data`` is given in clear."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "data": b64(**data),
    }


def lease(name: str, ns: str = "kube-system", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{COORDINATION}/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def node(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"providerID": provider_id(name)},
    }


def provider_id(vm: str) -> str:
    return (
        "azure:///subscriptions/0000/resourceGroups/mc_rg/providers/Microsoft.Compute/"
        f"virtualMachines/{vm}"
    )


def assigned_identity(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{AAD}/v1",
        "kind": "AzureAssignedIdentity",
        "metadata": {"name": name, "namespace": "default", "labels": {"nodename": node}},
        "spec": {
            "AzureIdentityRef": {"metadata": {"name": "id1"}, "spec": {"ClientID": "c-1"}},
            "Pod": "p1",
            "PodNamespace": "default",
            "NodeName": node,
        },
        "status": {"status": "Assigned"},
    }


async def next_event(stream: watch.Watch, timeout: float = 5.0) -> dict[str, Any]:
    event: dict[str, Any] = await asyncio.wait_for(stream.__anext__(), timeout)
    return event


async def raw_watch(api: client.ApiClient, **kwargs: Any) -> aiohttp.ClientResponse:
    """A secret watch as the daemon does it: the streamed response, read line by line."""
    resp: aiohttp.ClientResponse = await client.CoreV1Api(api).list_namespaced_secret(
        "default", watch=True, _preload_content=False, **kwargs
    )
    return resp


async def read_line(resp: aiohttp.ClientResponse, timeout: float = 5.0) -> dict[str, Any] | None:
    line = await asyncio.wait_for(resp.content.readline(), timeout)
    return json.loads(line) if line else None


def status_of(exc: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


# --------------------------------------------------------------------------- auth and discovery


async def test_missing_or_wrong_token_is_401(kube: KubeApiServer) -> None:
    expected = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    for user in ({"token": "wrong"}, {}):
        kubeconfig = kube.kubeconfig_dict()
        kubeconfig["users"][0]["user"] = user
        async with await _api_client(kubeconfig) as bad:
            with pytest.raises(ApiException) as err:
                await client.CoreV1Api(bad).list_namespaced_pod("default")
        assert err.value.status == 401
        assert status_of(err.value) == expected
    assert "LIST pods" not in kube.requests


async def test_discovery_and_health(kube: KubeApiServer, api: client.ApiClient) -> None:
    version = await client.VersionApi(api).get_code()
    assert version.git_version.startswith("v1.")
    assert (await client.CoreApi(api).get_api_versions()).versions == ["v1"]

    core = await client.CoreV1Api(api).get_api_resources()
    by_name = {r.name: r for r in core.resources}
    assert by_name["pods"].kind == "Pod" and by_name["pods"].namespaced
    assert "watch" in by_name["pods"].verbs
    assert not by_name["namespaces"].namespaced and not by_name["nodes"].namespaced
    assert by_name["pods/status"].verbs == ["get", "patch", "update"]

    groups = await client.ApisApi(api).get_api_versions()
    names = {g.name for g in groups.groups}
    assert {AAD, "events.k8s.io", COORDINATION} <= names

    coordination = await client.CoordinationApi(api).get_api_group()
    assert coordination.preferred_version.group_version == f"{COORDINATION}/v1"
    leases = {
        r.name: r for r in (await client.CoordinationV1Api(api).get_api_resources()).resources
    }
    assert leases["leases"].kind == "Lease" and leases["leases"].namespaced
    assert sorted(leases["leases"].verbs) == sorted(
        ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    )

    aad = await client.CustomObjectsApi(api).get_api_resources(AAD, "v1")
    kinds = {r.name: r.kind for r in aad.resources}
    assert kinds["azureassignedidentities"] == "AzureAssignedIdentity"
    assert kinds["azurepodidentityexceptions"] == "AzurePodIdentityException"

    ctx = ssl.create_default_context(cadata=kube.ca_pem.decode())
    headers = {"Authorization": f"Bearer {kube.token}"}
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz", "/livez"):
            async with session.get(kube.url + path, ssl=ctx, headers=headers) as resp:
                assert resp.status == 200 and await resp.text() == "ok"
        async with session.get(kube.url + "/api/v1/nope", ssl=ctx, headers=headers) as resp:
            assert resp.status == 404
            assert (await resp.json())["reason"] == "NotFound"
        async with session.post(
            kube.url + "/api/v1/namespaces/default/pods/x", ssl=ctx, headers=headers, json={}
        ) as resp:
            assert resp.status == 405
            assert (await resp.json())["reason"] == "MethodNotAllowed"


# --------------------------------------------------------------------------- CRUD and selectors


async def test_create_get_list_with_selectors(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create(pod("a1", app="a", tier="web"))
    kube.create(pod("a2", node="n2", app="a"))
    kube.create(pod("b1", app="b"))
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    await core.create_namespaced_pod("other", client.V1Pod(**_typed_pod("x1")))

    pods = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert sorted(p.metadata.name for p in pods.items) == ["a1", "b1", "x1"]
    assert pods.metadata.resource_version == kube.resource_version

    async def names(**kwargs: Any) -> list[str]:
        result = await core.list_namespaced_pod("default", **kwargs)
        return sorted(p.metadata.name for p in result.items)

    assert await names(label_selector="app=a") == ["a1", "a2"]
    assert await names(label_selector="app==a,tier") == ["a1"]
    assert await names(label_selector="app in (a, b),!tier") == ["a2", "b1"]
    assert await names(label_selector="app notin (a)") == ["b1"]
    assert await names(label_selector="app!=b", field_selector="spec.nodeName!=n2") == ["a1"]
    assert await names(field_selector="metadata.name=b1,status.phase=Pending") == ["b1"]

    with pytest.raises(ApiException) as err:
        await core.list_namespaced_pod("default", field_selector="spec.foo=bar")
    assert err.value.status == 400
    assert status_of(err.value)["reason"] == "BadRequest"
    assert status_of(err.value)["message"] == "field label not supported: spec.foo"
    with pytest.raises(ApiException) as err:
        await core.list_namespaced_pod("default", label_selector="app in (")
    assert err.value.status == 400

    got = await core.read_namespaced_pod("a1", "default")
    assert got.status.phase == "Pending" and got.metadata.uid and got.metadata.creation_timestamp

    # on the wire, items of built-in lists carry no kind; custom resources do
    raw = await core.list_namespaced_pod("default", _preload_content=False)
    body = await raw.json()
    assert body["kind"] == "PodList" and body["apiVersion"] == "v1"
    assert "kind" not in body["items"][0]

    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod("default", client.V1Pod(**_typed_pod("a1")))
    assert err.value.status == 409 and status_of(err.value)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod("missing", client.V1Pod(**_typed_pod("m")))
    assert err.value.status == 404 and status_of(err.value)["message"] == (
        'namespaces "missing" not found'
    )
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod("default", {"metadata": {"name": "bad"}, "spec": {}})
    assert err.value.status == 422 and status_of(err.value)["reason"] == "Invalid"

    generated = await core.create_namespaced_secret(
        "default", {"metadata": {"generateName": "sec-"}, "data": b64(k="v")}
    )
    assert generated.metadata.name.startswith("sec-") and len(generated.metadata.name) == 9

    kube.create(assigned_identity("aai-1", "n1"))
    kube.create(assigned_identity("aai-2", "n2"))
    custom = client.CustomObjectsApi(api)
    listed = await custom.list_cluster_custom_object(
        AAD, "v1", "azureassignedidentities", label_selector="nodename=n1"
    )
    assert listed["kind"] == "AzureAssignedIdentityList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["aai-1"]
    item = listed["items"][0]
    assert item["kind"] == "AzureAssignedIdentity"
    assert item["spec"]["AzureIdentityRef"]["spec"]["ClientID"] == "c-1"  # not pruned
    assert item["status"]["status"] == "Assigned"  # no status subresource: kept on create

    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "sp", "namespace": "default"},
            "stringData": {"clientSecret": "s3cret"},
        }
    )
    secret = await core.read_namespaced_secret("sp", "default")
    assert secret.type == "Opaque"
    assert base64.b64decode(secret.data["clientSecret"]) == b"s3cret"
    assert kube.requests["GET secrets"] == 1
    assert kube.requests["LIST pods"] >= 6


def _typed_pod(name: str) -> dict[str, Any]:
    return {
        "metadata": client.V1ObjectMeta(name=name),
        "spec": client.V1PodSpec(
            node_name="n1", containers=[client.V1Container(name="app", image="busybox:1.36")]
        ),
    }


async def test_direct_store_access(kube: KubeApiServer) -> None:
    kube.create(pod("p1", app="x", env="prod"))
    kube.create(pod("p2", app="y"))
    names = [p["metadata"]["name"] for p in kube.list("v1", "Pod", "default", label_selector="env")]
    assert names == ["p1"]
    assert kube.list("v1", "Pod", label_selector="app in (x,y),env notin (prod)")[0]["kind"] == (
        "Pod"
    )
    assert kube.get("v1", "Pod", "nope", "default") is None
    assert kube.delete("v1", "Pod", "nope", "default") is None
    with pytest.raises(KubeApiError) as err:
        kube.create(pod("p1"))
    assert err.value.code == 409 and err.value.reason == "AlreadyExists"
    with pytest.raises(KubeApiError) as err:
        kube.list("v1", "Secret", field_selector="data=x")
    assert err.value.code == 400
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s"},
        "type": "kubernetes.io/tls",
        "data": {},
    }
    kube.create(secret)
    assert [s["metadata"]["name"] for s in kube.list("v1", "Secret", field_selector="type!=Opaque")]
    deleted = kube.delete("v1", "Pod", "p2", "default")
    assert deleted is not None and int(deleted["metadata"]["resourceVersion"]) == int(
        kube.resource_version
    )


async def test_pagination_and_expired_continue(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    for i in range(5):
        kube.create(secret(f"s-{i}"))
    first = await core.list_namespaced_secret("default", limit=2)
    assert [c.metadata.name for c in first.items] == ["s-0", "s-1"]
    assert first.metadata._continue and first.metadata.remaining_item_count == 3

    kube.create(secret("s-5"))  # not in the snapshot the pages are served from
    kube.delete("v1", "Secret", "s-3", "default")
    second = await core.list_namespaced_secret(
        "default", limit=2, _continue=first.metadata._continue
    )
    assert [c.metadata.name for c in second.items] == ["s-2", "s-3"]
    assert second.metadata.resource_version == first.metadata.resource_version
    third = await core.list_namespaced_secret(
        "default", limit=2, _continue=second.metadata._continue
    )
    assert [c.metadata.name for c in third.items] == ["s-4"]
    assert not third.metadata._continue

    again = await core.list_namespaced_secret("default", limit=2)
    kube.compact()
    with pytest.raises(ApiException) as err:
        await core.list_namespaced_secret("default", limit=2, _continue=again.metadata._continue)
    assert err.value.status == 410
    assert status_of(err.value)["reason"] == "Expired"


async def test_optimistic_concurrency(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create(secret("cfg", k="1"))
    current = await core.read_namespaced_secret("cfg", "default")
    stale_rv = current.metadata.resource_version
    current.data = b64(k="2")
    updated = await core.replace_namespaced_secret("cfg", "default", current)
    assert int(updated.metadata.resource_version) > int(stale_rv)

    current.data = b64(k="3")
    current.metadata.resource_version = stale_rv
    with pytest.raises(ApiException) as err:
        await core.replace_namespaced_secret("cfg", "default", current)
    assert err.value.status == 409
    assert status_of(err.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(err.value)["message"]
    assert kube.get("v1", "Secret", "cfg", "default")["data"] == b64(k="2")  # type: ignore[index]

    with pytest.raises(KubeApiError) as direct:
        kube.replace(
            {
                **secret("cfg", k="4"),
                "metadata": {"name": "cfg", "namespace": "default", "resourceVersion": stale_rv},
            }
        )
    assert direct.value.code == 409

    # custom resources need a resourceVersion on PUT
    kube.create(assigned_identity("aai", "n1"))
    obj = kube.get(f"{AAD}/v1", "AzureAssignedIdentity", "aai", "default")
    assert obj is not None
    del obj["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as err:
        await client.CustomObjectsApi(api).replace_namespaced_custom_object(
            AAD, "v1", "default", "azureassignedidentities", "aai", obj
        )
    assert err.value.status == 422 and status_of(err.value)["reason"] == "Invalid"


async def test_merge_and_json_patch(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create(secret("cfg", a="1", b="2"))
    merged = await core.patch_namespaced_secret(
        "cfg",
        "default",
        {"data": {"b": None, **b64(c="3")}, "metadata": {"labels": {"x": "y"}}},
    )
    assert merged.data == b64(a="1", c="3") and merged.metadata.labels == {"x": "y"}

    rv = merged.metadata.resource_version
    same = await core.patch_namespaced_secret("cfg", "default", {"data": b64(a="1")})
    assert same.metadata.resource_version == rv  # a no-op writes nothing

    patched = await core.patch_namespaced_secret(
        "cfg",
        "default",
        [
            {"op": "test", "path": "/data/a", "value": b64(a="1")["a"]},
            {"op": "replace", "path": "/data/a", "value": b64(a="10")["a"]},
            {"op": "add", "path": "/data/d", "value": b64(d="4")["d"]},
            {"op": "remove", "path": "/data/c"},
            {"op": "add", "path": "/metadata/labels/a~1b", "value": "z"},
        ],
    )
    assert patched.data == b64(a="10", d="4")
    assert patched.metadata.labels == {"x": "y", "a/b": "z"}

    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_secret(
            "cfg", "default", [{"op": "test", "path": "/data/a", "value": "bm9wZQ=="}]
        )
    assert err.value.status == 422 and status_of(err.value)["reason"] == "Invalid"

    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_secret(
            "cfg", "default", {"metadata": {"resourceVersion": "1"}, "data": b64(a="x")}
        )
    assert err.value.status == 409

    kube.create(assigned_identity("aai", "n1"))
    custom = client.CustomObjectsApi(api)
    result = await custom.patch_namespaced_custom_object(
        AAD,
        "v1",
        "default",
        "azureassignedidentities",
        "aai",
        {"spec": {"Pod": "p2"}},
        _content_type="application/merge-patch+json",
    )
    assert result["spec"]["Pod"] == "p2" and result["spec"]["NodeName"] == "n1"
    assert result["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as err:  # the client's default content type for a dict
        await custom.patch_namespaced_custom_object(
            AAD, "v1", "default", "azureassignedidentities", "aai", {"spec": {"Pod": "p3"}}
        )
    assert err.value.status == 400
    with pytest.raises(ApiException) as err:  # no strategic merge for custom resources
        await custom.patch_namespaced_custom_object(
            AAD,
            "v1",
            "default",
            "azureassignedidentities",
            "aai",
            {"spec": {"Pod": "p3"}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert err.value.status == 415 and status_of(err.value)["reason"] == "UnsupportedMediaType"


async def test_status_subresource(kube: KubeApiServer, api: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api)
    merge = "application/merge-patch+json"
    kube.create(
        {
            "apiVersion": f"{AAD}/v1",
            "kind": "AzureIdentity",
            "metadata": {"name": "ai", "namespace": "default"},
            "spec": {"type": 0, "clientID": "c"},
            "status": {"availableReplicas": 9},
        }
    )
    args = (AAD, "v1", "default", "azureidentities", "ai")
    created = await custom.get_namespaced_custom_object(*args)
    assert "availableReplicas" not in created.get("status", {})  # dropped on create

    with_status = await custom.patch_namespaced_custom_object_status(
        *args, {"status": {"availableReplicas": 1}, "spec": {"clientID": "x"}}, _content_type=merge
    )
    assert with_status["status"] == {"availableReplicas": 1}
    assert with_status["spec"]["clientID"] == "c" and with_status["metadata"]["generation"] == 1

    main = await custom.patch_namespaced_custom_object(
        *args,
        {"status": {"availableReplicas": 5}, "metadata": {"labels": {"l": "v"}}},
        _content_type=merge,
    )
    assert main["status"] == {"availableReplicas": 1} and main["metadata"]["labels"]["l"] == "v"
    assert main["metadata"]["generation"] == 1
    got = await custom.get_namespaced_custom_object_status(*args)
    assert got["status"] == {"availableReplicas": 1}

    # AzureAssignedIdentity has no status subresource (as aad-pod-identity's CRD): MIC creates
    # it with its status and patches status on the main resource.
    kube.create(assigned_identity("aai", "n1"))
    aai = (AAD, "v1", "default", "azureassignedidentities", "aai")
    patched = await custom.patch_namespaced_custom_object(
        *aai, {"status": {"status": "Assigned"}}, _content_type=merge
    )
    assert patched["status"]["status"] == "Assigned"
    with pytest.raises(ApiException) as err:
        await custom.get_namespaced_custom_object_status(*aai)
    assert err.value.status == 404

    core = client.CoreV1Api(api)
    kube.create(pod("p1"))
    kube.patch(
        "v1",
        "Pod",
        "p1",
        "default",
        {"status": {"phase": "Running", "podIP": "10.0.0.7"}},
        subresource="status",
    )
    found = await core.list_pod_for_all_namespaces(field_selector="status.podIP=10.0.0.7")
    assert [p.metadata.name for p in found.items] == ["p1"]
    replaced = await core.read_namespaced_pod("p1", "default")
    replaced.status.phase = "Failed"
    replaced.metadata.labels = {"new": "label"}
    after = await core.replace_namespaced_pod("p1", "default", replaced)
    assert after.status.phase == "Running" and after.metadata.labels == {"new": "label"}
    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_pod("p1", "default", {"spec": {"nodeName": "n9"}})
    assert err.value.status == 422
    assert kube.requests["PATCH azureidentities/status"] == 1


async def test_finalizers_delay_deletion(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    held = secret("held")
    held["metadata"]["finalizers"] = ["example.com/hold"]
    created = kube.create(held)
    resp = await raw_watch(api, resource_version=created["metadata"]["resourceVersion"])
    try:
        raw = await core.delete_namespaced_secret("held", "default", _preload_content=False)
        deleting = await raw.json()  # the object itself while finalizers are pending
        assert deleting["kind"] == "Secret" and deleting["metadata"]["deletionTimestamp"]
        event = await read_line(resp)
        assert event is not None and event["type"] == "MODIFIED"
        assert event["object"]["metadata"]["deletionTimestamp"]
        assert (await core.read_namespaced_secret("held", "default")).metadata.finalizers

        await core.patch_namespaced_secret("held", "default", {"metadata": {"finalizers": None}})
        event = await read_line(resp)
        assert event is not None and event["type"] == "DELETED"
        with pytest.raises(ApiException) as err:
            await core.read_namespaced_secret("held", "default")
        assert err.value.status == 404 and status_of(err.value)["reason"] == "NotFound"
    finally:
        resp.close()


async def test_namespace_deletion_removes_contents(kube: KubeApiServer) -> None:
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gone"}})
    kube.create(secret("c", ns="gone"))
    kube.create(pod("p", ns="gone"))
    kube.delete("v1", "Namespace", "gone")
    assert kube.get("v1", "Namespace", "gone") is None
    assert kube.list("v1", "Secret", "gone") == [] and kube.list("v1", "Pod", "gone") == []
    with pytest.raises(KubeApiError) as err:
        kube.delete("v1", "Namespace", "default")
    assert err.value.code == 403


# --------------------------------------------------------------------------- watch


async def test_watch_from_zero_then_live(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create(pod("p1"))
    kube.create(pod("p2"))
    async with watch.Watch() as w:
        stream = w.stream(core.list_namespaced_pod, "default", timeout_seconds=30)
        first = [await next_event(stream), await next_event(stream)]
        assert [(e["type"], e["object"].metadata.name) for e in first] == [
            ("ADDED", "p1"),
            ("ADDED", "p2"),
        ]
        kube.create(pod("p3"))
        added = await next_event(stream)
        assert (added["type"], added["object"].metadata.name) == ("ADDED", "p3")
        kube.patch("v1", "Pod", "p3", "default", {"metadata": {"labels": {"x": "1"}}})
        modified = await next_event(stream)
        assert modified["type"] == "MODIFIED" and modified["object"].metadata.labels == {"x": "1"}
        await core.delete_namespaced_pod("p3", "default")
        deleted = await next_event(stream)
        assert deleted["type"] == "DELETED"
        assert deleted["raw_object"]["metadata"]["resourceVersion"] == kube.resource_version
    assert kube.requests["WATCH pods"] == 1


async def test_watch_resumes_from_resource_version(
    kube: KubeApiServer, api: client.ApiClient
) -> None:
    a = kube.create(secret("a"))
    kube.patch("v1", "Secret", "a", "default", {"data": b64(v="2")})
    kube.create(secret("b"))
    resp = await raw_watch(api, resource_version=a["metadata"]["resourceVersion"])
    try:
        events = [await read_line(resp), await read_line(resp)]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events if e] == [
            ("MODIFIED", "a"),
            ("ADDED", "b"),
        ]
        assert all(e and e["object"]["kind"] == "Secret" for e in events)
        kube.create(secret("c"))
        live = await read_line(resp)
        assert live is not None and live["object"]["metadata"]["name"] == "c"
    finally:
        resp.close()


async def test_watch_too_old_resource_version_after_compact(
    kube: KubeApiServer, api: client.ApiClient
) -> None:
    old = kube.create(secret("a"))["metadata"]["resourceVersion"]
    kube.create(secret("b"))
    kube.compact()
    resp = await raw_watch(api, resource_version=old)
    try:
        assert resp.status == 200
        event = await read_line(resp)
        assert event is not None and event["type"] == "ERROR"
        assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
        assert event["object"]["message"].startswith(f"too old resource version: {old} (")
        assert await read_line(resp) is None  # the stream ends
    finally:
        resp.close()

    async with watch.Watch() as w:
        stream = w.stream(
            client.CoreV1Api(api).list_namespaced_secret,
            "default",
            resource_version=old,
            timeout_seconds=5,
        )
        with pytest.raises(ApiException) as err:
            await next_event(stream)
        assert err.value.status == 410

    # the current resourceVersion is still resumable
    resp = await raw_watch(api, resource_version=kube.resource_version)
    try:
        kube.create(secret("c"))
        event = await read_line(resp)
        assert event is not None and event["type"] == "ADDED"
    finally:
        resp.close()


async def test_bookmarks_and_timeout(kube: KubeApiServer, api: client.ApiClient) -> None:
    kube.create(secret("a"))
    resp = await raw_watch(api, allow_watch_bookmarks=True, timeout_seconds=2)
    try:
        added = await read_line(resp)
        assert added is not None and added["type"] == "ADDED"
        bookmark = await read_line(resp, timeout=2)
        assert bookmark is not None and bookmark["type"] == "BOOKMARK"
        assert bookmark["object"] == {
            "kind": "Secret",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": kube.resource_version},
        }
        while (line := await read_line(resp, timeout=4)) is not None:  # ends at timeoutSeconds
            assert line["type"] == "BOOKMARK"
    finally:
        resp.close()


async def test_label_selector_move_in_and_out(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    async with watch.Watch() as w:
        stream = w.stream(
            core.list_namespaced_pod, "default", label_selector="app=a", timeout_seconds=30
        )
        task = asyncio.ensure_future(next_event(stream))
        await kube.wait_for_watchers("pods")
        kube.create(pod("p", app="a"))
        assert (await task)["type"] == "ADDED"
        kube.patch("v1", "Pod", "p", "default", {"metadata": {"labels": {"app": "b"}}})
        out = await next_event(stream)
        assert out["type"] == "DELETED" and out["object"].metadata.labels == {"app": "a"}
        assert out["object"].metadata.resource_version == kube.resource_version
        kube.create(pod("q", app="b"))  # never matches: not seen
        kube.patch("v1", "Pod", "p", "default", {"metadata": {"labels": {"app": "a"}}})
        back = await next_event(stream)
        assert back["type"] == "ADDED" and back["object"].metadata.name == "p"


async def test_restart_keeps_state_and_port(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create(secret("before", k="v"))
    last_rv = kube.resource_version
    port = kube.port
    open_watch = await raw_watch(api, resource_version=last_rv)
    try:
        await kube.wait_for_watchers("secrets")
        await kube.restart(downtime=0.1)
        assert await read_line(open_watch) is None  # the old stream was closed
    finally:
        open_watch.close()
    assert kube.port == port and kube.url.endswith(f":{port}")
    assert kube.resource_version == last_rv
    assert (await core.read_namespaced_secret("before", "default")).data == b64(k="v")

    kube.create(secret("after"))
    resp = await raw_watch(api, resource_version=last_rv)
    try:
        event = await read_line(resp)
        assert event is not None
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "after")
    finally:
        resp.close()


async def test_drop_watches_ends_streams(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create(secret("a"))
    async with watch.Watch() as w:
        stream = w.stream(core.list_namespaced_secret, "default", timeout_seconds=60)
        assert (await next_event(stream))["type"] == "ADDED"
        resp = await raw_watch(api, resource_version=kube.resource_version)
        await kube.wait_for_watchers("secrets", 2)
        kube.drop_watches()
        with pytest.raises(StopAsyncIteration):
            await next_event(stream)
        assert await read_line(resp) is None
        resp.close()
    assert kube.requests["WATCH secrets"] == 2


async def test_events_in_both_api_groups(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="p1."),
        involved_object=client.V1ObjectReference(kind="Pod", name="p1", namespace="default"),
        reason="Assigned",
        message="identity assigned",
        type="Normal",
        source=client.V1EventSource(component="nmi"),
    )
    created = await core.create_namespaced_event("default", event)
    assert created.metadata.name.startswith("p1.")
    assert kube.requests["POST events"] == 1

    listed = await core.list_namespaced_event(
        "default", field_selector="involvedObject.name=p1,reason=Assigned"
    )
    assert [e.message for e in listed.items] == ["identity assigned"]
    # the events.k8s.io view of a core event has "eventTime": null, which the typed client
    # refuses to deserialize (as against a real server), so read it raw
    raw = await client.EventsV1Api(api).list_namespaced_event(
        "default", field_selector="regarding.name=p1", _preload_content=False
    )
    v1 = await raw.json()
    assert v1["kind"] == "EventList" and v1["apiVersion"] == "events.k8s.io/v1"
    assert [(e["note"], e["regarding"]["kind"], e["eventTime"]) for e in v1["items"]] == [
        ("identity assigned", "Pod", None)
    ]
    new_style = await client.EventsV1Api(api).create_namespaced_event(
        "default",
        client.EventsV1Event(
            metadata=client.V1ObjectMeta(name="e2"),
            event_time=datetime.datetime.now(datetime.UTC),
            reporting_controller="nmi",
            reporting_instance="nmi-n1",
            action="Binding",
            reason="Bound",
            type="Normal",
            note="hello",
        ),
    )
    assert new_style.note == "hello"
    as_core = await core.read_namespaced_event("e2", "default")
    assert (as_core.message, as_core.reporting_component) == ("hello", "nmi")

    with pytest.raises(ApiException) as err:
        await core.create_namespaced_event(
            "default",
            client.CoreV1Event(
                metadata=client.V1ObjectMeta(name="bad"),
                involved_object=client.V1ObjectReference(kind="Pod", name="p", namespace="x"),
            ),
        )
    assert err.value.status == 422


# --------------------------------------------------------------------------- leases and nodes


async def test_lease_leader_election(kube: KubeApiServer, api: client.ApiClient) -> None:
    """GET, create on 404, PUT with the resourceVersion read, 409 on a stale one."""
    coord = client.CoordinationV1Api(api)
    with pytest.raises(ApiException) as err:
        await coord.read_namespaced_lease("nmi-mic", "kube-system")
    assert err.value.status == 404
    assert status_of(err.value)["message"] == f'leases.{COORDINATION} "nmi-mic" not found'
    assert status_of(err.value)["details"] == {
        "name": "nmi-mic",
        "group": COORDINATION,
        "kind": "leases",
    }

    acquired = datetime.datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=datetime.UTC)
    spec = client.V1LeaseSpec(
        holder_identity="mic-a",
        lease_duration_seconds=15,
        acquire_time=acquired,
        renew_time=acquired,
        lease_transitions=0,
    )
    created = await coord.create_namespaced_lease(
        "kube-system", client.V1Lease(metadata=client.V1ObjectMeta(name="nmi-mic"), spec=spec)
    )
    assert created.spec.holder_identity == "mic-a" and created.spec.renew_time == acquired
    raw = await coord.read_namespaced_lease("nmi-mic", "kube-system", _preload_content=False)
    body = await raw.json()
    assert (body["kind"], body["apiVersion"]) == ("Lease", f"{COORDINATION}/v1")
    assert body["spec"] == {
        "holderIdentity": "mic-a",
        "leaseDurationSeconds": 15,
        "acquireTime": "2024-05-01T10:00:00.123456Z",  # MicroTime: UTC, six digits
        "renewTime": "2024-05-01T10:00:00.123456Z",
        "leaseTransitions": 0,
    }

    # a second candidate loses the race to create
    with pytest.raises(ApiException) as err:
        await coord.create_namespaced_lease(
            "kube-system", lease("nmi-mic", holderIdentity="mic-b", leaseDurationSeconds=15)
        )
    assert err.value.status == 409 and status_of(err.value)["reason"] == "AlreadyExists"

    # both candidates read the same version; the holder renews first...
    mine = await coord.read_namespaced_lease("nmi-mic", "kube-system")
    theirs = await coord.read_namespaced_lease("nmi-mic", "kube-system")
    renewed_at = acquired + datetime.timedelta(seconds=5, microseconds=1)
    mine.spec.renew_time = renewed_at
    renewed = await coord.replace_namespaced_lease("nmi-mic", "kube-system", mine)
    assert int(renewed.metadata.resource_version) > int(theirs.metadata.resource_version)
    assert renewed.spec.renew_time == renewed_at and renewed.spec.acquire_time == acquired

    # ...so the other's takeover, sent with the stale resourceVersion, is refused
    theirs.spec.holder_identity = "mic-b"
    theirs.spec.lease_transitions = 1
    with pytest.raises(ApiException) as err:
        await coord.replace_namespaced_lease("nmi-mic", "kube-system", theirs)
    assert err.value.status == 409
    assert status_of(err.value)["reason"] == "Conflict"
    assert status_of(err.value)["message"] == (
        f'Operation cannot be fulfilled on leases.{COORDINATION} "nmi-mic": the object has been '
        "modified; please apply your changes to the latest version and try again"
    )
    current = await coord.read_namespaced_lease("nmi-mic", "kube-system")
    assert current.spec.holder_identity == "mic-a"
    assert current.metadata.resource_version == renewed.metadata.resource_version
    stale = kube.get(f"{COORDINATION}/v1", "Lease", "nmi-mic", "kube-system")
    assert stale is not None
    stale["metadata"]["resourceVersion"] = theirs.metadata.resource_version
    with pytest.raises(KubeApiError) as direct:
        kube.replace(stale)
    assert direct.value.code == 409 and direct.value.reason == "Conflict"

    # once the lease has expired, a takeover from the latest version goes through
    current.spec.holder_identity = "mic-b"
    current.spec.lease_transitions = 1
    current.spec.acquire_time = current.spec.renew_time = acquired + datetime.timedelta(minutes=1)
    taken = await coord.replace_namespaced_lease("nmi-mic", "kube-system", current)
    assert (taken.spec.holder_identity, taken.spec.lease_transitions) == ("mic-b", 1)
    assert int(taken.metadata.resource_version) > int(renewed.metadata.resource_version)

    # release (a built-in kind: strategic merge patch accepted), then delete
    released = await coord.patch_namespaced_lease(
        "nmi-mic", "kube-system", {"spec": {"holderIdentity": ""}}
    )
    assert released.spec.holder_identity == "" and released.spec.lease_transitions == 1
    await coord.delete_namespaced_lease("nmi-mic", "kube-system")
    assert kube.get(f"{COORDINATION}/v1", "Lease", "nmi-mic", "kube-system") is None
    assert kube.requests["PUT leases"] == 3 and kube.requests["POST leases"] == 2


async def test_lease_micro_time_and_validation(kube: KubeApiServer, api: client.ApiClient) -> None:
    coord = client.CoordinationV1Api(api)
    raw = await coord.create_namespaced_lease(
        "kube-system",
        lease("l", holderIdentity=None, renewTime="2024-05-01T12:00:00.123456+02:00"),
        _preload_content=False,
    )
    assert raw.status == 201
    assert (await raw.json())["spec"] == {"renewTime": "2024-05-01T10:00:00.123456Z"}
    bare = kube.create(
        {"apiVersion": f"{COORDINATION}/v1", "kind": "Lease", "metadata": {"name": "b"}}
    )
    assert bare["spec"] == {} and bare["metadata"]["namespace"] == "default"
    updated = kube.patch(
        f"{COORDINATION}/v1",
        "Lease",
        "b",
        "default",
        {"spec": {"acquireTime": "2024-05-01T23:30:00.000000-01:00"}},
    )
    assert updated["spec"] == {"acquireTime": "2024-05-02T00:30:00.000000Z"}

    # metav1.MicroTime parses RFC3339Micro only: six fractional digits and a zone
    for when in (
        "2024-05-01T12:00:00Z",
        "2024-05-01T12:00:00.123Z",
        "2024-05-01T12:00:00.123456789Z",
        "2024-05-01T12:00:00.123456",
        "2024-05-01 12:00:00.123456Z",
        "2024-13-01T12:00:00.123456Z",
    ):
        with pytest.raises(ApiException) as err:
            await coord.create_namespaced_lease("kube-system", lease("t", renewTime=when))
        assert err.value.status == 400, when
        assert status_of(err.value)["message"] == (
            'Lease in version "v1" cannot be handled as a Lease: parsing time '
            f'"{when}" as "2006-01-02T15:04:05.000000Z07:00"'
        )
    # datetime.isoformat() drops a zero microsecond part: the real server refuses that too
    whole = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)
    with pytest.raises(ApiException) as err:
        await coord.create_namespaced_lease(
            "kube-system",
            client.V1Lease(
                metadata=client.V1ObjectMeta(name="t"), spec=client.V1LeaseSpec(renew_time=whole)
            ),
        )
    assert err.value.status == 400

    with pytest.raises(ApiException) as err:
        await coord.create_namespaced_lease("kube-system", lease("t", leaseDurationSeconds="15"))
    assert err.value.status == 400 and status_of(err.value)["message"] == (
        'Lease in version "v1" cannot be handled as a Lease: json: cannot unmarshal string into '
        "Go struct field LeaseSpec.spec.leaseDurationSeconds of type int32"
    )
    with pytest.raises(ApiException) as err:
        await coord.create_namespaced_lease(
            "kube-system", lease("t", leaseDurationSeconds=0, leaseTransitions=-1)
        )
    assert err.value.status == 422
    invalid = status_of(err.value)
    assert invalid["reason"] == "Invalid"
    assert invalid["message"] == (
        f'Lease.{COORDINATION} "t" is invalid: [spec.leaseDurationSeconds: Invalid value: 0: '
        "must be greater than 0, spec.leaseTransitions: Invalid value: -1: must be greater than "
        "or equal to 0]"
    )
    assert [c["field"] for c in invalid["details"]["causes"]] == [
        "spec.leaseDurationSeconds",
        "spec.leaseTransitions",
    ]
    with pytest.raises(KubeApiError) as direct:
        kube.patch(
            f"{COORDINATION}/v1", "Lease", "b", "default", {"spec": {"leaseTransitions": -2}}
        )
    assert direct.value.code == 422
    assert kube.list(f"{COORDINATION}/v1", "Lease", "kube-system") != []
    assert [x["metadata"]["name"] for x in kube.list(f"{COORDINATION}/v1", "Lease")] == ["b", "l"]


async def test_lease_watch(kube: KubeApiServer, api: client.ApiClient) -> None:
    coord = client.CoordinationV1Api(api)
    kube.create(lease("elsewhere", ns="default", holderIdentity="x"))  # another namespace
    async with watch.Watch() as w:
        stream = w.stream(coord.list_namespaced_lease, "kube-system", timeout_seconds=30)
        task = asyncio.ensure_future(next_event(stream))
        await kube.wait_for_watchers("leases")
        await coord.create_namespaced_lease(
            "kube-system", lease("nmi-mic", holderIdentity="mic-a", leaseDurationSeconds=15)
        )
        added = await task
        assert added["type"] == "ADDED" and added["object"].spec.holder_identity == "mic-a"
        created_rv = added["object"].metadata.resource_version

        current = await coord.read_namespaced_lease("nmi-mic", "kube-system")
        current.spec.holder_identity = "mic-b"
        await coord.replace_namespaced_lease("nmi-mic", "kube-system", current)
        modified = await next_event(stream)
        assert modified["type"] == "MODIFIED" and modified["object"].spec.holder_identity == "mic-b"
        assert modified["object"].metadata.resource_version == kube.resource_version

        await coord.delete_namespaced_lease("nmi-mic", "kube-system")
        deleted = await next_event(stream)
        assert deleted["type"] == "DELETED" and deleted["object"].metadata.name == "nmi-mic"
    assert kube.requests["WATCH leases"] == 1

    # resumed from the create: the rest of the history, then live events
    raw = await coord.list_namespaced_lease(
        "kube-system", watch=True, resource_version=created_rv, _preload_content=False
    )
    try:
        events = [await read_line(raw), await read_line(raw)]
        assert [(e["type"], e["object"]["kind"]) for e in events if e] == [
            ("MODIFIED", "Lease"),
            ("DELETED", "Lease"),
        ]
        kube.create(lease("again", holderIdentity="mic-c"))
        live = await read_line(raw)
        assert live is not None and live["type"] == "ADDED"
        assert live["object"]["spec"] == {"holderIdentity": "mic-c"}
    finally:
        raw.close()


async def test_nodes_provider_id_and_name_selector(
    kube: KubeApiServer, api: client.ApiClient
) -> None:
    core = client.CoreV1Api(api)
    kube.create(node("n1", agentpool="a"))
    created = await core.create_node(
        client.V1Node(
            metadata=client.V1ObjectMeta(name="n2"),
            spec=client.V1NodeSpec(provider_id=provider_id("n2")),
        )
    )
    assert created.spec.provider_id == provider_id("n2")
    got = await core.read_node("n1")
    assert got.spec.provider_id == provider_id("n1")

    async def names(selector: str) -> list[tuple[str, str]]:
        result = await core.list_node(field_selector=selector)
        return [(n.metadata.name, n.spec.provider_id) for n in result.items]

    assert await names("metadata.name=n1") == [("n1", provider_id("n1"))]
    assert await names("metadata.name!=n1") == [("n2", provider_id("n2"))]
    assert await names("metadata.name=n3") == []
    with pytest.raises(ApiException) as err:
        await core.list_node(field_selector="metadata.namespace=default")  # cluster-scoped
    assert err.value.status == 400
    assert status_of(err.value)["message"] == "field label not supported: metadata.namespace"

    got.metadata.labels = {"agentpool": "b"}
    replaced = await core.replace_node("n1", got)
    assert replaced.spec.provider_id == provider_id("n1")
    assert replaced.metadata.labels == {"agentpool": "b"}

    async with watch.Watch() as w:
        stream = w.stream(core.list_node, field_selector="metadata.name=n1", timeout_seconds=30)
        first = await next_event(stream)
        assert (first["type"], first["object"].metadata.name) == ("ADDED", "n1")
        assert first["object"].spec.provider_id == provider_id("n1")
        kube.patch("v1", "Node", "n2", None, {"metadata": {"labels": {"x": "1"}}})  # not seen
        kube.patch("v1", "Node", "n1", None, {"metadata": {"labels": {"x": "1"}}})
        modified = await next_event(stream)
        assert (modified["type"], modified["object"].metadata.name) == ("MODIFIED", "n1")
        assert modified["object"].metadata.labels == {"agentpool": "b", "x": "1"}
        kube.delete("v1", "Node", "n2")  # not seen
        kube.delete("v1", "Node", "n1")
        deleted = await next_event(stream)
        assert (deleted["type"], deleted["object"].metadata.name) == ("DELETED", "n1")
