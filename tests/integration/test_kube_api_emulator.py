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

from nmi_sandbox.kube_api import KubeApiError, KubeApiServer
from nmi_sandbox.tls import CertificateAuthority

AAD = "aadpodidentity.k8s.io"


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


def configmap(name: str, ns: str = "default", **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns},
        "data": data,
    }


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
    """A configmap watch as the daemon does it: the streamed response, read line by line."""
    resp: aiohttp.ClientResponse = await client.CoreV1Api(api).list_namespaced_config_map(
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
    assert {AAD, "events.k8s.io"} <= names

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

    generated = await core.create_namespaced_config_map(
        "default", {"metadata": {"generateName": "cm-"}, "data": {"k": "v"}}
    )
    assert generated.metadata.name.startswith("cm-") and len(generated.metadata.name) == 8

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
        kube.create(configmap(f"cm-{i}"))
    first = await core.list_namespaced_config_map("default", limit=2)
    assert [c.metadata.name for c in first.items] == ["cm-0", "cm-1"]
    assert first.metadata._continue and first.metadata.remaining_item_count == 3

    kube.create(configmap("cm-5"))  # not in the snapshot the pages are served from
    kube.delete("v1", "ConfigMap", "cm-3", "default")
    second = await core.list_namespaced_config_map(
        "default", limit=2, _continue=first.metadata._continue
    )
    assert [c.metadata.name for c in second.items] == ["cm-2", "cm-3"]
    assert second.metadata.resource_version == first.metadata.resource_version
    third = await core.list_namespaced_config_map(
        "default", limit=2, _continue=second.metadata._continue
    )
    assert [c.metadata.name for c in third.items] == ["cm-4"]
    assert not third.metadata._continue

    again = await core.list_namespaced_config_map("default", limit=2)
    kube.compact()
    with pytest.raises(ApiException) as err:
        await core.list_namespaced_config_map(
            "default", limit=2, _continue=again.metadata._continue
        )
    assert err.value.status == 410
    assert status_of(err.value)["reason"] == "Expired"


async def test_optimistic_concurrency(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create(configmap("cfg", k="1"))
    current = await core.read_namespaced_config_map("cfg", "default")
    stale_rv = current.metadata.resource_version
    current.data = {"k": "2"}
    updated = await core.replace_namespaced_config_map("cfg", "default", current)
    assert int(updated.metadata.resource_version) > int(stale_rv)

    current.data = {"k": "3"}
    current.metadata.resource_version = stale_rv
    with pytest.raises(ApiException) as err:
        await core.replace_namespaced_config_map("cfg", "default", current)
    assert err.value.status == 409
    assert status_of(err.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(err.value)["message"]
    assert kube.get("v1", "ConfigMap", "cfg", "default")["data"] == {"k": "2"}  # type: ignore[index]

    with pytest.raises(KubeApiError) as direct:
        kube.replace(
            {
                **configmap("cfg", k="4"),
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
    kube.create(configmap("cfg", a="1", b="2"))
    merged = await core.patch_namespaced_config_map(
        "cfg", "default", {"data": {"b": None, "c": "3"}, "metadata": {"labels": {"x": "y"}}}
    )
    assert merged.data == {"a": "1", "c": "3"} and merged.metadata.labels == {"x": "y"}

    rv = merged.metadata.resource_version
    same = await core.patch_namespaced_config_map("cfg", "default", {"data": {"a": "1"}})
    assert same.metadata.resource_version == rv  # a no-op writes nothing

    patched = await core.patch_namespaced_config_map(
        "cfg",
        "default",
        [
            {"op": "test", "path": "/data/a", "value": "1"},
            {"op": "replace", "path": "/data/a", "value": "10"},
            {"op": "add", "path": "/data/d", "value": "4"},
            {"op": "remove", "path": "/data/c"},
            {"op": "add", "path": "/metadata/labels/a~1b", "value": "z"},
        ],
    )
    assert patched.data == {"a": "10", "d": "4"}
    assert patched.metadata.labels == {"x": "y", "a/b": "z"}

    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_config_map(
            "cfg", "default", [{"op": "test", "path": "/data/a", "value": "nope"}]
        )
    assert err.value.status == 422 and status_of(err.value)["reason"] == "Invalid"

    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_config_map(
            "cfg", "default", {"metadata": {"resourceVersion": "1"}, "data": {"a": "x"}}
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
    cm = configmap("held")
    cm["metadata"]["finalizers"] = ["example.com/hold"]
    created = kube.create(cm)
    resp = await raw_watch(api, resource_version=created["metadata"]["resourceVersion"])
    try:
        raw = await core.delete_namespaced_config_map("held", "default", _preload_content=False)
        deleting = await raw.json()  # the object itself while finalizers are pending
        assert deleting["kind"] == "ConfigMap" and deleting["metadata"]["deletionTimestamp"]
        event = await read_line(resp)
        assert event is not None and event["type"] == "MODIFIED"
        assert event["object"]["metadata"]["deletionTimestamp"]
        assert (await core.read_namespaced_config_map("held", "default")).metadata.finalizers

        await core.patch_namespaced_config_map(
            "held", "default", {"metadata": {"finalizers": None}}
        )
        event = await read_line(resp)
        assert event is not None and event["type"] == "DELETED"
        with pytest.raises(ApiException) as err:
            await core.read_namespaced_config_map("held", "default")
        assert err.value.status == 404 and status_of(err.value)["reason"] == "NotFound"
    finally:
        resp.close()


async def test_namespace_deletion_removes_contents(kube: KubeApiServer) -> None:
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gone"}})
    kube.create(configmap("c", ns="gone"))
    kube.create(pod("p", ns="gone"))
    kube.delete("v1", "Namespace", "gone")
    assert kube.get("v1", "Namespace", "gone") is None
    assert kube.list("v1", "ConfigMap", "gone") == [] and kube.list("v1", "Pod", "gone") == []
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
    a = kube.create(configmap("a"))
    kube.patch("v1", "ConfigMap", "a", "default", {"data": {"v": "2"}})
    kube.create(configmap("b"))
    resp = await raw_watch(api, resource_version=a["metadata"]["resourceVersion"])
    try:
        events = [await read_line(resp), await read_line(resp)]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events if e] == [
            ("MODIFIED", "a"),
            ("ADDED", "b"),
        ]
        assert all(e and e["object"]["kind"] == "ConfigMap" for e in events)
        kube.create(configmap("c"))
        live = await read_line(resp)
        assert live is not None and live["object"]["metadata"]["name"] == "c"
    finally:
        resp.close()


async def test_watch_too_old_resource_version_after_compact(
    kube: KubeApiServer, api: client.ApiClient
) -> None:
    old = kube.create(configmap("a"))["metadata"]["resourceVersion"]
    kube.create(configmap("b"))
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
            client.CoreV1Api(api).list_namespaced_config_map,
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
        kube.create(configmap("c"))
        event = await read_line(resp)
        assert event is not None and event["type"] == "ADDED"
    finally:
        resp.close()


async def test_bookmarks_and_timeout(kube: KubeApiServer, api: client.ApiClient) -> None:
    kube.create(configmap("a"))
    resp = await raw_watch(api, allow_watch_bookmarks=True, timeout_seconds=2)
    try:
        added = await read_line(resp)
        assert added is not None and added["type"] == "ADDED"
        bookmark = await read_line(resp, timeout=2)
        assert bookmark is not None and bookmark["type"] == "BOOKMARK"
        assert bookmark["object"] == {
            "kind": "ConfigMap",
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
    kube.create(configmap("before"))
    last_rv = kube.resource_version
    port = kube.port
    open_watch = await raw_watch(api, resource_version=last_rv)
    try:
        await kube.wait_for_watchers("configmaps")
        await kube.restart(downtime=0.1)
        assert await read_line(open_watch) is None  # the old stream was closed
    finally:
        open_watch.close()
    assert kube.port == port and kube.url.endswith(f":{port}")
    assert kube.resource_version == last_rv
    assert (await core.read_namespaced_config_map("before", "default")).data == {}

    kube.create(configmap("after"))
    resp = await raw_watch(api, resource_version=last_rv)
    try:
        event = await read_line(resp)
        assert event is not None
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "after")
    finally:
        resp.close()


async def test_drop_watches_ends_streams(kube: KubeApiServer, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    kube.create(configmap("a"))
    async with watch.Watch() as w:
        stream = w.stream(core.list_namespaced_config_map, "default", timeout_seconds=60)
        assert (await next_event(stream))["type"] == "ADDED"
        resp = await raw_watch(api, resource_version=kube.resource_version)
        await kube.wait_for_watchers("configmaps", 2)
        kube.drop_watches()
        with pytest.raises(StopAsyncIteration):
            await next_event(stream)
        assert await read_line(resp) is None
        resp.close()
    assert kube.requests["WATCH configmaps"] == 2


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
