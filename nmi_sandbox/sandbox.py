"""``nmi sandbox``: the whole system on this machine, in one command.

As root (the default way): a real node made of network namespaces — a node
namespace with no uplink holding the emulated Kubernetes API server, Azure
AD, Azure Resource Manager and the node's IMDS on 169.254.169.254:80, pod
namespaces on veth pairs — with nmi and the controller (``nmi mic``) running
there as their own processes with their normal flags, nmi installing its
iptables rules.  It then plays a cluster user: an identity and a binding, a
pod the binding selects and a pod nothing selects, and prints the seed's
process as it happens - the controller's assignment ``Created``, the
identity put on the node's scale set through ARM, ``Assigned``, the pod's
curl (asking the real metadata address) getting its token while the other
pod is refused; then the pod deleted, its assignment and the identity
removed.  Nothing but the controller writes assignments.  It prints how to ``ip netns exec``
into a pod and try it, and runs until Ctrl-C; every namespace is removed on
exit (and a crashed sandbox's leftovers on the next start).  ``--loopback``
runs the same demonstration without root, the pods simulated by loopback
addresses.  ``--once`` exits after the demonstration; status 0 means it
behaved as nmi promises.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from nmi.config import LogFormat
from nmi.ops import logs
from nmi.ops.logs import redact_id

from .narrate import Narrator
from .world import VMSS, Identity, LoopbackWorld, Reply

RESOURCE = "https://management.azure.com"
GV = "aadpodidentity.k8s.io/v1"


def _claims(token: str) -> dict[str, Any]:
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        doc = json.loads(base64.urlsafe_b64decode(payload))
        return doc if isinstance(doc, dict) else {}
    except (IndexError, ValueError):
        return {}


def _verdict(ok: bool) -> None:
    print(
        "\nOK: the controller assigned the identity and put it on the scale set, the bound pod "
        "got its own token, the unbound pod was refused, and deleting the pod took both away; "
        "the federated pod got its token with no Secret and no identity on the VM."
        if ok
        else "\nFAILED: the demonstration did not behave as expected."
    )


FEDERATED_SA = "reports"


def _federated_identity(world: LoopbackWorld) -> Identity:
    """The federated act's objects: in Azure AD, a managed identity (on no VM) whose
    federated credential trusts the cluster's issuer for one service account; in the
    cluster, the identity (type 3), its binding and (by the caller) the pod."""
    identity = world.add_federated_identity(
        "reports-federated",
        selector="reports",
        service_accounts=(FEDERATED_SA,),
        managed_identity=True,
    )
    print(
        "\nthe user creates: a user-assigned managed identity in Azure AD (on no VM) with a "
        f"federated credential:\n     issuer {world.kube.issuer} (the cluster's "
        f"service-account issuer)\n     subject system:serviceaccount:default:{FEDERATED_SA}, "
        "audience api://AzureADTokenExchange\n"
        "                  AzureIdentity default/reports-federated (type 3, client id "
        f"{redact_id(identity.client_id)}, no Secret), its binding (selector reports),\n"
        f"                  pod default/reports (serviceAccountName {FEDERATED_SA}, label "
        "aadpodidbinding=reports), application code unchanged"
    )
    return identity


def _federated_outcome(world: LoopbackWorld, identity: Identity, reply: Reply) -> bool:
    secret_reads = sum(n for k, n in world.kube.requests.items() if k.endswith(" secrets"))
    subjects = [s for c, s, _ in world.aad.federated_issued if c == identity.client_id]
    on_vm = [i for i in world.arm.identities_on(world.vmss_id)]
    print(
        "   nmi asked the API server for the pod's own service-account token (TokenRequests: "
        f"{world.kube.requests['POST serviceaccounts/token']}) and Azure AD exchanged it "
        f"(subject {subjects[0] if subjects else '-'});\n   Secrets read: {secret_reads}, "
        f"identities on the node's scale set: {len(on_vm)}, node IMDS calls for it: "
        f"{sum(n for (c, _), n in world.imds.token_requests.items() if c == identity.client_id)}"
    )
    return (
        reply.status == 200
        and _claims(reply.token).get("appid") == identity.client_id
        and subjects == [f"system:serviceaccount:default:{FEDERATED_SA}"]
        and secret_reads == 0
        and not on_vm
    )


def _show(title: str, reply: Reply) -> None:
    print(f"\n== {title}: HTTP {reply.status}")
    body = dict(reply.body)
    if "access_token" in body:
        claims = _claims(str(body["access_token"]))
        body["access_token"] = f"<JWT, {len(str(reply.body['access_token']))} chars>"
        body["client_id"] = redact_id(str(body.get("client_id", "")))
        print(json.dumps(body, indent=2))
        print(
            "   token claims: appid="
            f"{redact_id(str(claims.get('appid', '')))} aud={claims.get('aud')} "
            f"iss={claims.get('iss')}"
        )
    else:
        print(json.dumps(body, indent=2))


async def _until(predicate: Callable[[], object], timeout: float = 30.0) -> bool:
    """Wait for a condition of the emulated world (False when it never came)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _assignments(world: LoopbackWorld) -> list[dict[str, Any]]:
    return world.kube.list(GV, "AzureAssignedIdentity")


def _created(world: LoopbackWorld, identity: Identity, selector: str, pods: str) -> None:
    print(
        "\nthe user creates: AzureIdentity default/demo-identity (type 0, client id "
        f"{redact_id(identity.client_id)}), AzureIdentityBinding default/demo-identity-binding "
        f"(selector {selector}),\n                  {pods}"
    )


async def _removal(world: LoopbackWorld, narrator: Narrator, pod: str) -> bool:
    print(f"\nthe user deletes pod default/{pod}:")
    world.kube.delete("v1", "Pod", pod, "default")
    gone = await _until(lambda: not _assignments(world))
    removed = await _until(lambda: not world.arm.identities_on(world.vmss_id))
    await narrator.stop()
    return gone and removed


async def demo(*, once: bool, port: int) -> int:
    world = LoopbackWorld()
    await world.start()
    try:
        await world.start_daemon(port=port)
        await world.start_mic()
        assert world.daemon is not None
        print(f"nmi is serving on {world.token_url} for node {world.node}")
        print("   the controller (nmi mic) leads; the node is instance 0 of scale set " + VMSS)
        print(f"   Kubernetes API (emulated): {world.kube.url}  kubeconfig: {world.kubeconfig}")
        print(f"   Azure AD (emulated): {world.aad.url}   node IMDS (emulated): {world.imds.url}")
        print(f"   Azure Resource Manager (emulated): {world.arm.url}")
        narrator = Narrator(world)
        narrator.start()
        identity = world.add_user_assigned_identity("demo-identity", selector="demo-app")
        bound = world.add_pod("demo-app", selector="demo-app")
        unbound = world.add_pod("no-identity")
        _created(
            world,
            identity,
            "demo-app",
            f"pod default/demo-app ({world.pod_ip(bound)}, label aadpodidbinding=demo-app), "
            f"pod default/no-identity ({world.pod_ip(unbound)}, no label)",
        )
        granted = await world.get_token(world.pod_ip(bound), RESOURCE)
        narrator.say(f"pod default/demo-app got its token: HTTP {granted.status}")
        refused = await world.get_token(world.pod_ip(unbound), RESOURCE)
        again = await world.get_token(world.pod_ip(bound), RESOURCE)
        _show("pod default/demo-app asks for a token", granted)
        _show("pod default/no-identity asks for a token", refused)
        cached = world.imds.token_requests[(identity.client_id, RESOURCE)] == 1
        print(
            "\nupstream IMDS calls for that identity and resource: "
            f"{world.imds.token_requests[(identity.client_id, RESOURCE)]} "
            "(the second request was a cache hit)"
        )
        cleaned = await _removal(world, narrator, "demo-app")
        federated = _federated_identity(world)
        reports = world.add_pod("reports", selector="reports", service_account=FEDERATED_SA)
        fed_reply = await world.get_token(world.pod_ip(reports), RESOURCE)
        _show("pod default/reports asks for a token (the same IMDS call)", fed_reply)
        federated_ok = _federated_outcome(world, federated, fed_reply)
        ok = (
            federated_ok
            and granted.status == 200
            and _claims(granted.token).get("appid") == identity.client_id
            and refused.status == 400
            and refused.body.get("error_description") == "Identity not found"
            and again.token == granted.token
            and cached
            and cleaned
            and _steps_seen(narrator)
        )
        _verdict(ok)
        if once:
            return 0 if ok else 1
        world.add_pod("demo-app", selector="demo-app", ip=world.pod_ip(bound))
        print(
            "\npod default/demo-app created again for you to try (Ctrl-C to stop):\n"
            f"  curl -s --interface {world.pod_ip(bound)} -H Metadata:true "
            f"'{world.token_url}/metadata/identity/oauth2/token?api-version=2018-02-01"
            f"&resource={RESOURCE}'\n"
            f"  curl -s --interface {world.pod_ip(unbound)} -H Metadata:true "
            f"'{world.token_url}/metadata/identity/oauth2/token?api-version=2018-02-01"
            f"&resource={RESOURCE}'\n"
            f"  KUBECONFIG={world.kubeconfig} kubectl get azureassignedidentities -A  "
            "(the emulated API server)"
        )
        await _until_signalled()
        print("\nstopping the sandbox")
        return 0 if ok else 1
    finally:
        await world.stop()


def _steps_seen(narrator: Narrator) -> bool:
    """The seed's process, in order: Created, on the scale set, Assigned, token, deleted,
    removed from the scale set."""
    wanted = [
        "AzureAssignedIdentity default/demo-app-default-demo-identity Created",
        "identity demo-identity added to scale set",
        "AzureAssignedIdentity default/demo-app-default-demo-identity Assigned",
        "pod default/demo-app got its token: HTTP 200",
        "AzureAssignedIdentity default/demo-app-default-demo-identity deleted",
        "identity demo-identity removed from scale set",
    ]
    position = 0
    for line in narrator.lines:
        if position < len(wanted) and wanted[position] in line:
            position += 1
    return position == len(wanted)


async def node_demo(*, once: bool) -> int:
    from .netns import cleanup_stale
    from .nodeworld import NodeWorld

    stale = cleanup_stale()
    if stale:
        print(f"removed namespaces left by an earlier sandbox: {', '.join(stale)}")
    async with NodeWorld() as node:
        w = node.w
        print(f"node namespace {node.net.node} (node IP {node.net.node_ip}, no uplink):")
        print(f"   Kubernetes API (emulated): {w.kube.url}   node IMDS (emulated): {w.imds.url}")
        print(
            f"   Azure AD (emulated): {w.aad.url}   Azure Resource Manager (emulated): {w.arm.url}"
        )
        seconds = await node.start_nmi()
        print(
            f"   nmi started with its normal flags; rules installed and path verified in "
            f"{seconds:.2f} s"
        )
        seconds = await node.start_mic()
        print(
            f"   nmi mic started with the Deployment's flags; leading after {seconds:.2f} s; the "
            f"node is instance 0 of scale set {VMSS}"
        )
        narrator = Narrator(w)
        narrator.start()
        identity = w.add_user_assigned_identity("demo-identity", selector="demo-app")
        bound = node.add_pod("demo-app", selector="demo-app")
        unbound = node.add_pod("no-identity")
        _created(
            w,
            identity,
            "demo-app",
            f"pod default/demo-app ({bound.ip}, namespace {bound.ns}), "
            f"pod default/no-identity ({unbound.ip}, namespace {unbound.ns})",
        )
        granted = await node.token(bound, RESOURCE, timeout=30)
        narrator.say(f"pod default/demo-app got its token: HTTP {granted.status}")
        refused = await node.token(unbound, RESOURCE)
        _show("curl in pod default/demo-app -> http://169.254.169.254/...", _reply(granted))
        _show("curl in pod default/no-identity -> http://169.254.169.254/...", _reply(refused))
        cleaned = await _removal(w, narrator, "demo-app")
        federated = _federated_identity(w)
        reports = node.add_pod("reports", selector="reports", service_account=FEDERATED_SA)
        fed_reply = _reply(await node.token(reports, RESOURCE, timeout=30))
        _show("curl in pod default/reports -> http://169.254.169.254/... (unchanged)", fed_reply)
        federated_ok = _federated_outcome(w, federated, fed_reply)
        token = str(granted.body.get("access_token", ""))
        ok = (
            federated_ok
            and granted.status == 200
            and _claims(token).get("appid") == identity.client_id
            and refused.status == 400
            and refused.body.get("error_description") == "Identity not found"
            and cleaned
            and _steps_seen(narrator)
        )
        _verdict(ok)
        if once:
            return 0 if ok else 1
        w.add_pod("demo-app", selector="demo-app", ip=bound.ip)
        query = f"api-version=2018-02-01&resource={RESOURCE}"
        print(
            "\npod default/demo-app created again for you to try (Ctrl-C to stop and remove "
            "everything):\n"
            f"  ip netns exec {bound.ns} curl -s -H Metadata:true "
            f"'http://169.254.169.254/metadata/identity/oauth2/token?{query}'\n"
            f"  ip netns exec {unbound.ns} curl -s -H Metadata:true "
            f"'http://169.254.169.254/metadata/identity/oauth2/token?{query}'\n"
            f"  ip netns exec {reports.ns} curl -s -H Metadata:true "
            f"'http://169.254.169.254/metadata/identity/oauth2/token?{query}'   (federated)\n"
            f"  ip netns exec {node.net.node} {sys.executable} -m nmi explain default/reports "
            f"--kubeconfig {w.kubeconfig} --admin-socket {w.workdir / 'admin.sock'}\n"
            f"  ip netns exec {node.net.node} iptables -t nat -S NMI-METADATA   (nmi's rules)\n"
            f"  ip netns exec {node.net.node} {sys.executable} -m nmi explain default/no-identity "
            f"--kubeconfig {w.kubeconfig} --admin-socket {w.workdir / 'admin.sock'}\n"
            f"  KUBECONFIG={w.kubeconfig} ip netns exec {node.net.node} "
            "kubectl get azureidentities,azureassignedidentities -A   (the emulated API server)"
        )
        await _until_signalled()
        print("\nstopping the sandbox and removing its namespaces")
        return 0 if ok else 1


def _reply(result: Any) -> Reply:
    return Reply(status=result.status, body=result.body, headers={})


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="nmi sandbox", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="run the demonstration and exit")
    parser.add_argument("--port", type=int, default=0, help="loopback mode: port for nmi")
    parser.add_argument(
        "--loopback",
        action="store_true",
        help="no network namespaces (no root needed): pods simulated by loopback addresses",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show nmi's logs")
    args = parser.parse_args(list(argv))
    logs.setup(fmt=LogFormat.TEXT, verbosity=0)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    from nmi.loop import run_loop

    real = not args.loopback
    if real and (os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables")):
        print(
            "nmi sandbox needs root, iproute2 and iptables for the network-namespace node "
            "(./dev installs them); use --loopback to run without them",
            file=sys.stderr,
        )
        return 2
    try:
        if real:
            return run_loop(node_demo(once=args.once))
        return run_loop(demo(once=args.once, port=args.port))
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch it
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
