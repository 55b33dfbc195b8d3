"""The controller's pure parts: desired state, the view's indexes, the machine diff, the
Lease algorithm (on a fake API server and a fake clock), the ledger's keys, the flags."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import pytest

from nmi.azure.identities import IdentityState, UpdateResult
from nmi.azure.provider_id import NodeResource, normalise_id, parse_provider_id
from nmi.config import ConfigError
from nmi.flags import go_style
from nmi.mic.desired import (
    ASSIGNED,
    FINALIZER,
    build,
    desired_for,
    matches,
)
from nmi.mic.flags import build_parser, settings_from
from nmi.mic.leader import LeaderElector, micro_time
from nmi.mic.ledger import ledger_key
from nmi.mic.machines import Machines
from nmi.mic.view import ControllerView, parse_assignment, parse_binding, parse_identity, parse_pod
from nmi_sandbox import manifests as m

NODE = "node-a"


def pod(name: str, label: str | None, *, ns: str = "default", **kw: Any) -> dict[str, Any]:
    labels = {"aadpodidbinding": label} if label is not None else {}
    obj = m.pod(name=name, namespace=ns, node=kw.pop("node", NODE), ip="10.0.0.1", labels=labels)
    obj["metadata"].update(uid=f"uid-{ns}-{name}", resourceVersion="1")
    obj["status"].update(kw)
    return obj


def identity(name: str, ns: str = "default", *, namespaced: bool = False, rv: str = "5") -> Any:
    obj = m.azure_identity(
        name=name,
        namespace=ns,
        type=1,
        client_id="00000000-0000-0000-0000-000000000001",
        tenant_id="t",
        secret_name="s",
        namespaced=namespaced,
    )
    obj["metadata"].update(uid=f"uid-{ns}-{name}", resourceVersion=rv)
    return obj


def binding(name: str, ident: str, selector: str, ns: str = "default") -> Any:
    obj = m.binding(name=name, namespace=ns, identity=ident, selector=selector)
    obj["metadata"].update(uid=f"uid-b-{ns}-{name}", resourceVersion="7")
    return obj


def view_with(*objs: dict[str, Any]) -> ControllerView:
    view = ControllerView()
    for obj in objs:
        kind = obj["kind"]
        if kind == "Pod":
            view.on_pod("ADDED", None, parse_pod(obj))
        elif kind == "AzureIdentity":
            view.on_identity("ADDED", None, parse_identity(obj))
        elif kind == "AzureIdentityBinding":
            view.on_binding("ADDED", None, parse_binding(obj))
        elif kind == "AzureAssignedIdentity":
            view.on_assignment("ADDED", None, parse_assignment(obj))
    return view


def wanted(view: ControllerView, key: tuple[str, str], force: bool = False) -> list[str]:
    found, _ = desired_for(view, view.pods[key], force_namespaced=force)
    return sorted(f"{d.namespace}/{d.name}" for d in found)


# ------------------------------------------------------------------ desired state


def test_a_binding_gives_a_pod_its_identity_by_label() -> None:
    view = view_with(
        identity("id1"),
        binding("b1", "id1", "app"),
        pod("web", "app"),
        pod("other", "else"),
        pod("bare", None),
    )
    assert wanted(view, ("default", "web")) == ["default/web-default-id1"]
    assert wanted(view, ("default", "other")) == []
    assert wanted(view, ("default", "bare")) == []


def test_pods_without_node_or_that_ended_want_nothing() -> None:
    view = view_with(
        identity("id1"),
        binding("b1", "id1", "app"),
        pod("pending", "app", node=""),
        pod("done", "app", phase="Succeeded"),
        pod("failed", "app", phase="Failed"),
    )
    for name in ("pending", "done", "failed"):
        assert wanted(view, ("default", name)) == []


def test_two_bindings_of_one_identity_make_one_assignment() -> None:
    view = view_with(
        identity("id1"), binding("b1", "id1", "app"), binding("b2", "id1", "app"), pod("p", "app")
    )
    assert wanted(view, ("default", "p")) == ["default/p-default-id1"]


def test_namespaced_rules_by_annotation_and_by_flag() -> None:
    view = view_with(
        identity("scoped", "team", namespaced=True),
        binding("b", "scoped", "app", "team"),
        identity("global"),
        binding("g", "global", "app"),
        pod("in-team", "app", ns="team"),
        pod("elsewhere", "app", ns="other"),
    )
    # The namespaced identity: only its namespace's pods, the assignment in its namespace.
    assert wanted(view, ("team", "in-team")) == [
        "default/in-team-team-global",
        "team/in-team-team-scoped",
    ]
    assert wanted(view, ("other", "elsewhere")) == ["default/elsewhere-other-global"]
    # --forceNamespaced: the default-namespace identity serves only default's pods.
    assert wanted(view, ("team", "in-team"), force=True) == ["team/in-team-team-scoped"]
    assert wanted(view, ("other", "elsewhere"), force=True) == []


def test_a_name_clash_keeps_one_and_reports_the_other() -> None:
    view = view_with(
        identity("same", "a"),
        binding("b", "same", "app", "a"),
        identity("same", "b"),
        binding("b", "same", "app", "b"),
        pod("p", "app"),
    )
    found, clashes = desired_for(view, view.pods[("default", "p")], force_namespaced=False)
    assert [d.azure_identity.meta.key for d in found] == ["a/same"]
    assert [(c.kept, c.dropped, c.name) for c in clashes] == [
        ("a/same", "b/same", "p-default-same")
    ]


def test_the_assignment_is_written_as_aad_pod_identity_wrote_it() -> None:
    view = view_with(identity("id1"), binding("b1", "id1", "app"), pod("web", "app"))
    (d,), _ = desired_for(view, view.pods[("default", "web")], force_namespaced=False)
    obj = build(d, status="Created")
    assert obj["apiVersion"] == "aadpodidentity.k8s.io/v1"
    assert obj["kind"] == "AzureAssignedIdentity"
    assert obj["metadata"] == {
        "name": "web-default-id1",
        "namespace": "default",
        "labels": {"nodename": NODE},
        "finalizers": [FINALIZER],
    }
    assert obj["spec"]["pod"] == "web" and obj["spec"]["podNamespace"] == "default"
    assert obj["spec"]["nodename"] == NODE
    assert obj["spec"]["azureIdentityRef"]["metadata"]["resourceVersion"] == "5"
    assert obj["spec"]["azureBindingRef"]["metadata"]["name"] == "b1"
    assert obj["status"] == {"status": "Created"}

    # Existing one: kept labels, annotations and finalizers, the resourceVersion carried.
    written = dict(obj, metadata=dict(obj["metadata"], resourceVersion="9", uid="u"))
    written["metadata"]["labels"] = {"nodename": NODE, "team": "x"}
    record = parse_assignment(written)
    assert matches(record, d)
    replaced = build(d, status=ASSIGNED, existing=record.view)
    assert replaced["metadata"]["resourceVersion"] == "9"
    assert replaced["metadata"]["labels"] == {"nodename": NODE, "team": "x"}


def test_an_edited_identity_or_a_moved_pod_no_longer_matches() -> None:
    view = view_with(identity("id1"), binding("b1", "id1", "app"), pod("web", "app"))
    (d,), _ = desired_for(view, view.pods[("default", "web")], force_namespaced=False)
    existing = parse_assignment(build(d, status=ASSIGNED))
    view.on_identity(
        "MODIFIED", view.identities[("default", "id1")], parse_identity(identity("id1", rv="6"))
    )
    (d2,), _ = desired_for(view, view.pods[("default", "web")], force_namespaced=False)
    assert not matches(existing, d2)
    moved = pod("web", "app", node="node-b")
    view.on_pod("MODIFIED", view.pods[("default", "web")], parse_pod(moved))
    (d3,), _ = desired_for(view, view.pods[("default", "web")], force_namespaced=False)
    assert not matches(parse_assignment(build(d2, status=ASSIGNED)), d3)


def test_legacy_capitalised_keys_are_read() -> None:
    legacy = m.azure_identity(
        name="old", type=0, client_id="c", resource_id="/subscriptions/s/x", legacy_keys=True
    )
    legacy["metadata"].update(uid="u", resourceVersion="1")
    old_binding = binding("ob", "old", "app")
    old_binding["spec"] = {"AzureIdentity": "old", "Selector": "app"}
    view = view_with(legacy, old_binding, pod("p", "app"))
    (d,), _ = desired_for(view, view.pods[("default", "p")], force_namespaced=False)
    assert d.azure_identity.resource_id == "/subscriptions/s/x"


# ------------------------------------------------------------------ the view's indexes


def test_events_touch_only_the_pods_they_concern() -> None:
    view = view_with(
        identity("id1"),
        binding("b1", "id1", "app"),
        pod("a", "app"),
        pod("b", "app"),
        pod("c", "other"),
    )
    assert view.on_pod("MODIFIED", view.pods[("default", "a")], parse_pod(pod("a", "app"))) == {
        ("default", "a")
    }
    changed = parse_binding(binding("b1", "id1", "other"))
    assert view.on_binding("MODIFIED", view.bindings[("default", "b1")], changed) == {
        ("default", "a"),
        ("default", "b"),
        ("default", "c"),
    }
    assert view.on_identity(
        "MODIFIED", view.identities[("default", "id1")], parse_identity(identity("id1", rv="9"))
    ) == {("default", "c")}


def assigned(name: str, rv: str, uid: str = "uid-x", pod_name: str = "p") -> Any:
    view = view_with(identity("id1"), binding("b1", "id1", "app"), pod(pod_name, "app"))
    (d,), _ = desired_for(view, view.pods[("default", pod_name)], force_namespaced=False)
    obj = build(d, status=ASSIGNED)
    obj["metadata"].update(name=name, resourceVersion=rv, uid=uid)
    return obj


def test_the_controllers_own_writes_are_not_undone_by_stale_events() -> None:
    view = ControllerView()
    view.wrote(assigned("a", "10"))
    # The watch then shows an older copy (its event for rv 9): ignored; the same one: no-op.
    assert view.on_assignment("MODIFIED", None, parse_assignment(assigned("a", "9"))) == set()
    assert view.assignments[("default", "a")].view.meta.resource_version == "10"
    assert view.on_assignment("ADDED", None, parse_assignment(assigned("a", "10"))) == set()
    assert view.on_assignment("MODIFIED", None, parse_assignment(assigned("a", "11"))) == {
        ("default", "p")
    }
    # A deletion of an older object of the same name does not remove the newer one.
    view.wrote(assigned("a", "20", uid="uid-new"))
    view.on_assignment("DELETED", parse_assignment(assigned("a", "11")), None)
    assert view.assignments[("default", "a")].view.meta.uid == "uid-new"
    view.on_assignment("DELETED", parse_assignment(assigned("a", "21", uid="uid-new")), None)
    assert ("default", "a") not in view.assignments
    assert view.assignments_of(("default", "p")) == []


# ------------------------------------------------------------------ the machine diff


VMSS = parse_provider_id(
    "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/"
    "virtualMachineScaleSets/pool/virtualMachines/0"
)
assert VMSS is not None


def uai(name: str) -> str:
    return normalise_id(
        f"/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/"
        f"userAssignedIdentities/{name}"
    )


class FakeClient:
    def __init__(self, present: Iterable[str] = ()) -> None:
        self.present = set(present)
        self.gets = 0
        self.updates: list[tuple[set[str], set[str]]] = []

    def _state(self, node: NodeResource) -> IdentityState:
        return IdentityState(node.resource_id, False, frozenset(self.present), "Succeeded")

    async def get(self, node: NodeResource) -> IdentityState:
        self.gets += 1
        return self._state(node)

    async def update(
        self,
        node: NodeResource,
        *,
        add: Iterable[str],
        remove: Iterable[str],
        current: IdentityState | None = None,
    ) -> UpdateResult:
        add, remove = set(add), set(remove)
        self.updates.append((add, remove))
        self.present = (self.present | add) - remove
        return UpdateResult(
            frozenset(add), frozenset(remove), {}, frozenset(), 1, self._state(node)
        )


class FakeLedger:
    def __init__(self, added: Iterable[str] = ()) -> None:
        self._added = {VMSS.key: set(added)} if added else {}

    def machines(self) -> list[str]:
        return [k for k, v in self._added.items() if v]

    def added(self, resource_id: str) -> frozenset[str]:
        return frozenset(self._added.get(normalise_id(resource_id), ()))

    async def record(
        self, resource_id: str, *, add: Iterable[str] = (), forget: Iterable[str] = ()
    ) -> None:
        key = normalise_id(resource_id)
        self._added[key] = (self._added.get(key, set()) | set(add)) - set(forget)


async def run_machines(client: FakeClient, ledger: FakeLedger, **kw: Any) -> Machines:
    done = asyncio.Event()

    async def on_done(key: str, state: IdentityState) -> None:
        done.set()

    async def on_failed(key: str, failures: Any) -> None:
        pass

    machines = Machines(
        client=client,  # type: ignore[arg-type]
        ledger=ledger,  # type: ignore[arg-type]
        immutable=kw.pop("immutable", lambda: frozenset()),
        on_done=on_done,
        on_failed=on_failed,
        coalesce=0.01,
        **kw,
    )
    machines.done = done  # type: ignore[attr-defined]
    return machines


async def settle(machines: Machines) -> None:
    for _ in range(200):
        tasks = [m.task for m in machines._machines.values() if m.task and not m.task.done()]
        if not tasks:
            return
        await asyncio.wait(tasks, timeout=2)
    raise AssertionError("machine workers never finished")


async def test_needs_are_coalesced_into_one_patch_and_nothing_removed_before_settling() -> None:
    client = FakeClient(present=[uai("ours-unused"), uai("someone-elses")])
    ledger = FakeLedger(added=[uai("ours-unused")])
    machines = await run_machines(client, ledger)
    for name in ("a", "b", "c"):
        machines.need(VMSS, uai(name), +1)
    machines.need(VMSS, uai("a"), +1)  # a second pod needing a
    await settle(machines)
    assert client.gets == 1
    assert client.updates == [({uai("a"), uai("b"), uai("c")}, set())]  # no removal yet
    assert ledger.added(VMSS.resource_id) >= {uai("a"), uai("b"), uai("c")}

    machines.settle([VMSS])
    await settle(machines)
    # Only what the controller added and no pod needs goes; someone else's stays.
    assert client.updates[-1] == (set(), {uai("ours-unused")})
    assert uai("someone-elses") in client.present

    machines.need(VMSS, uai("a"), -1)  # one of two pods gone: a stays
    await settle(machines)
    assert len(client.updates) == 2
    machines.need(VMSS, uai("a"), -1)
    await settle(machines)
    assert client.updates[-1] == (set(), {uai("a")})
    assert uai("a") not in ledger.added(VMSS.resource_id)


async def test_immutable_identities_are_never_removed() -> None:
    client = FakeClient()
    ledger = FakeLedger()
    machines = await run_machines(client, ledger, immutable=lambda: frozenset({uai("pinned")}))
    machines.settle([])
    machines.need(VMSS, uai("pinned"), +1)
    await settle(machines)
    machines.need(VMSS, uai("pinned"), -1)
    await settle(machines)
    assert client.updates == [({uai("pinned")}, set())]
    assert uai("pinned") in client.present


async def test_at_steady_state_a_touch_reads_nothing_and_writes_nothing() -> None:
    client = FakeClient()
    machines = await run_machines(client, FakeLedger())
    machines.settle([])
    machines.need(VMSS, uai("a"), +1)
    await settle(machines)
    gets, updates = client.gets, len(client.updates)
    for _ in range(5):
        machines.touch(VMSS)
        await settle(machines)
    assert (client.gets, len(client.updates)) == (gets, updates)
    await machines.reconcile_all()  # the drift check: one read, no write
    await settle(machines)
    assert (client.gets, len(client.updates)) == (gets + 1, updates)


# ------------------------------------------------------------------ the Lease


class FakeResponse:
    def __init__(self, status: int, body: Any = None) -> None:
        self.status = status
        self._body = json.dumps(body).encode() if body is not None else b""

    async def read(self) -> bytes:
        return self._body

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class FakeLeaseApi:
    """One Lease with resourceVersion preconditions, as the API server keeps it."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 0
        self.down = False

    async def get(self, path: str, params: Any, timeout: Any = None) -> FakeResponse:
        if self.down:
            raise OSError("partitioned")
        if self.lease is None:
            return FakeResponse(404, {"kind": "Status", "code": 404})
        return FakeResponse(200, self.lease)

    async def post(self, path: str, body: dict[str, Any], timeout: Any = None) -> FakeResponse:
        if self.down:
            raise OSError("partitioned")
        if self.lease is not None:
            return FakeResponse(409, {"kind": "Status", "code": 409})
        return self._store(body, 201)

    async def put(self, path: str, body: dict[str, Any], timeout: Any = None) -> FakeResponse:
        if self.down:
            raise OSError("partitioned")
        assert self.lease is not None
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            return FakeResponse(409, {"kind": "Status", "code": 409})
        return self._store(body, 200)

    def _store(self, body: dict[str, Any], status: int) -> FakeResponse:
        self.rv += 1
        self.lease = json.loads(json.dumps(body))
        self.lease["metadata"]["resourceVersion"] = str(self.rv)
        return FakeResponse(status, self.lease)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(api: Any, name: str, clock: Clock) -> LeaderElector:
    return LeaderElector(
        api=api,
        namespace="kube-system",
        name="nmi-mic",
        identity=name,
        lease_duration=15,
        renew_deadline=7.5,
        retry_period=3.75,
        clock=clock,
    )


async def test_lease_one_holder_takeover_only_after_a_full_duration_unchanged() -> None:
    api, clock = FakeLeaseApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a._try() is True and a.is_leader()
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "a"
    assert api.lease["spec"]["leaseDurationSeconds"] == 15
    assert await b._try() is False and not b.is_leader()
    # a renews: b keeps seeing a changing record and never takes over.
    for _ in range(10):
        clock.now += 3.75
        assert await a._try() is True
        assert await b._try() is False
    # a stops renewing. a stops *acting* once its last renewal is renew_deadline old ...
    last_renewal = clock.now
    clock.now += 7.4
    assert a.is_leader()
    clock.now += 0.2
    assert not a.is_leader()
    # ... while b may take over only a whole lease duration after it last saw a change.
    assert await b._try() is False
    clock.now = last_renewal + 15.0
    assert await b._try() is True and b.is_leader()
    assert api.lease["spec"]["holderIdentity"] == "b"
    assert api.lease["spec"]["leaseTransitions"] == 1
    # a comes back: it sees b's lease and does not write over it.
    assert await a._try() is False


async def test_two_candidates_cannot_both_win_a_conflict() -> None:
    api, clock = FakeLeaseApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    await a._try()
    clock.now += 20
    await b._try()  # b observes a's record now; expired only 15 s later on its own clock
    clock.now += 16
    # Both race for the expired lease from the same read: only one PUT can carry the rv.
    lease = json.loads(json.dumps(api.lease))
    original_get = api.get

    async def stale_get(path: str, params: Any, timeout: Any = None) -> FakeResponse:
        return FakeResponse(200, lease)

    api.get = stale_get  # type: ignore[method-assign]
    c = elector(api, "c", clock)
    c._observed = (json.dumps(lease["spec"], sort_keys=True), clock.now - 16)
    won = [await b._try(), await c._try()]
    api.get = original_get  # type: ignore[method-assign]
    assert won.count(True) == 1


async def test_release_lets_another_take_over_at_once() -> None:
    api, clock = FakeLeaseApi(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    await a._try()
    await b._try()
    await a.release()
    assert not a.is_leader()
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == ""
    assert await b._try() is True


def test_micro_time_has_six_fractional_digits() -> None:
    assert micro_time(0.5) == "1970-01-01T00:00:00.500000Z"


# ------------------------------------------------------------------ ledger and flags


def test_ledger_keys_are_valid_configmap_keys_and_case_blind() -> None:
    key = ledger_key(VMSS.resource_id)
    assert key == ledger_key(VMSS.resource_id.upper())
    assert all(c.isalnum() or c in "-._" for c in key) and len(key) <= 253


def parse(*argv: str, env: dict[str, str] | None = None) -> Any:
    args = build_parser().parse_args(go_style(list(argv)))
    return settings_from(args, env or {"MIC_POD_NAME": "mic-0"})


def test_flags_keep_aad_pod_identity_names_and_defaults() -> None:
    s = parse()
    assert (s.http_probe_port, s.prometheus_port) == (8080, 8888)
    assert (s.sync_retry_duration, s.reconcile_interval) == (3600.0, 180.0)
    assert (s.leader_name, s.leader_namespace, s.leader_duration) == (
        "aad-pod-identity-mic",
        "default",
        15.0,
    )
    assert (s.create_delete_batch, s.update_user_msi_max_retry) == (20, 2)
    assert s.leader_instance == "mic-0"
    s = parse(
        "-forceNamespaced=true",
        "--immutable-user-msis=AAA,bbb",
        "-leader-election-duration=30s",
        "--syncRetryDuration=1h",
        "--clientQps=5",
    )
    assert s.force_namespaced and s.immutable_user_msis == ("aaa", "bbb")
    assert (s.leader_duration, s.sync_retry_duration, s.client_qps) == (30.0, 3600.0, 5.0)
    assert parse(env={"FORCENAMESPACED": "true", "MIC_POD_NAME": "x"}).force_namespaced
    assert parse(env={"MIC_POD_NAMESPACE": "nmi", "MIC_POD_NAME": "x"}).ledger_namespace == "nmi"


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ConfigError):
        parse("--leader-election-duration=1s")
    with pytest.raises(ConfigError):
        parse("--leader-election-name=Bad_Name")
    with pytest.raises(SystemExit):
        parse("--clientQps=-1")
