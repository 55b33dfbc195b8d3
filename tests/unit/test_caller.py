"""Who is calling: one pod per IP, pinned to the interface its traffic arrives through."""

import dataclasses

from nmi.config import Settings
from nmi.identity.caller import CallerProblem, Callers
from nmi.kube.index import ClusterIndex
from nmi.kube.objects import Pod
from nmi_sandbox import manifests as m

NODE = "node-1"
IP = "10.244.0.7"


def pod(name: str = "app", uid: str = "u1", rv: str = "1", **status: object) -> Pod:
    raw = m.pod(name=name, node=NODE, ip=IP, uid=uid)
    raw["metadata"]["resourceVersion"] = rv
    raw["status"].update(status)
    return Pod.parse(raw)


def setup() -> tuple[ClusterIndex, Callers]:
    index = ClusterIndex(node_name=NODE)
    return index, Callers(index=index, settings=Settings(node_name=NODE))


def test_an_ip_is_one_pod_or_a_clear_problem() -> None:
    index, callers = setup()
    assert isinstance(callers.now(IP, 5), CallerProblem)
    index.put(pod())
    assert isinstance(callers.now(IP, 5), Pod)
    index.put(pod("twin", uid="u2"))
    found = callers.now(IP, 5)
    assert isinstance(found, CallerProblem) and found.kind == "ambiguous"


def test_a_taken_over_ip_is_refused_until_the_api_catches_up() -> None:
    """The old pod's veth (3) is gone, a new sandbox has its IP on veth 9, and the API
    server still shows the old pod running: refused, not served the old pod's identity."""
    index, callers = setup()
    old = pod()
    index.put(old)
    assert callers.now(IP, 3) is not None and callers.pinned(old, IP) == 3
    for _ in range(3):
        found = callers.now(IP, 9)
        assert isinstance(found, CallerProblem) and found.kind == "moved"
    assert callers.now(IP, 3) == old  # the pinned interface still works
    # The API catches up: the old pod's containers ended, the new pod appears.
    index.put(dataclasses.replace(old, ended=True))
    new = pod("new", uid="u2", rv="5")
    index.put(new)
    assert callers.now(IP, 9) == new and callers.pinned(new, IP) == 9


def test_an_unrelated_update_of_the_old_pod_does_not_move_its_pin() -> None:
    """A status change that is not 'Ready again' (the old pod's containers dying) keeps
    refusing the new interface."""
    index, callers = setup()
    old = pod(rv="1")
    index.put(old)
    callers.now(IP, 3)
    assert isinstance(callers.now(IP, 9), CallerProblem)
    index.put(dataclasses.replace(old, meta=dataclasses.replace(old.meta, resource_version="2")))
    assert isinstance(callers.now(IP, 9), CallerProblem)


def test_a_recreated_sandbox_of_the_same_pod_is_repinned_once_ready() -> None:
    index, callers = setup()
    first = pod(rv="1", conditions=[{"type": "Ready", "status": "True"}])
    index.put(first)
    callers.now(IP, 3)
    assert isinstance(callers.now(IP, 9), CallerProblem)  # the new veth, API not updated
    again = pod(rv="2", conditions=[{"type": "Ready", "status": "True"}])
    index.put(again)  # kubelet reported the new sandbox, the pod is Ready
    assert callers.now(IP, 9) == again and callers.pinned(again, IP) == 9
    assert isinstance(callers.now(IP, 3), CallerProblem)


def test_a_route_hint_pins_a_pod_before_it_calls() -> None:
    index, callers = setup()
    quiet = pod()
    index.put(quiet)
    callers.hint(quiet, IP, 3)  # the node routes its IP to veth 3
    found = callers.now(IP, 9)  # its first ever call comes through another interface
    assert isinstance(found, CallerProblem) and found.kind == "moved"
    callers.hint(quiet, IP, 7)  # a hint never moves a pin
    assert callers.pinned(quiet, IP) == 3


def test_terminating_pods_are_served_only_through_their_pinned_interface() -> None:
    index, callers = setup()
    running = pod()
    index.put(running)
    callers.now(IP, 3)
    deleting = dataclasses.replace(running, meta=dataclasses.replace(running.meta, deleting=True))
    index.put(deleting)
    assert callers.now(IP, 3) == deleting  # its shutdown may still need a token
    assert isinstance(callers.now(IP, 9), CallerProblem)
    never = pod("never", uid="u3")
    index.remove(deleting)
    index.put(dataclasses.replace(never, meta=dataclasses.replace(never.meta, deleting=True)))
    found = callers.now(IP, 3)
    assert isinstance(found, CallerProblem) and found.kind == "terminating"


def test_ended_pods_cannot_call() -> None:
    index, callers = setup()
    index.put(pod(containerStatuses=[{"name": "c", "state": {"terminated": {"exitCode": 0}}}]))
    assert isinstance(callers.now(IP, 3), CallerProblem)


def test_pins_of_pods_that_are_gone_are_forgotten() -> None:
    index, callers = setup()
    gone = pod()
    index.put(gone)
    callers.now(IP, 3)
    index.remove(gone)
    assert callers.prune() == 1 and callers.pinned(gone, IP) == 0
