"""``nmi sandbox``: the whole system on this machine, in one command.

It starts the emulated Kubernetes API server, Azure AD and node IMDS on
loopback, starts the real nmi daemon against them, then plays MIC and a
cluster user: it creates an identity and a binding, a pod that the binding
selects (assigned as MIC would) and a pod that nothing selects.  It shows the
bound pod getting its token and the unbound pod being refused, prints how to
ask yourself with curl from a pod's address, and keeps running until Ctrl-C
(or exits at once with ``--once``).  Exit status 0 means the demonstration
behaved as nmi promises.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .config import LogFormat
from .observability import logs
from .observability.logs import redact_id
from .testing.world import LoopbackWorld, Reply

RESOURCE = "https://management.azure.com"


def _claims(token: str) -> dict[str, Any]:
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        doc = json.loads(base64.urlsafe_b64decode(payload))
        return doc if isinstance(doc, dict) else {}
    except (IndexError, ValueError):
        return {}


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


async def demo(*, once: bool, port: int) -> int:
    world = LoopbackWorld()
    await world.start()
    try:
        await world.start_daemon(port=port)
        assert world.daemon is not None
        print(f"nmi is serving on {world.token_url} for node {world.node}")
        print(f"   Kubernetes API (emulated): {world.kube.url}  kubeconfig: {world.kubeconfig}")
        print(f"   Azure AD (emulated): {world.aad.url}   node IMDS (emulated): {world.imds.url}")

        identity = world.add_user_assigned_identity("demo-identity", selector="demo-app")
        bound = world.add_pod("demo-app", selector="demo-app")
        world.assign(bound, identity)  # what MIC does for this pod
        unbound = world.add_pod("no-identity")
        await world.pod_visible(bound)
        await world.pod_visible(unbound)
        await world.synced(lambda idx: bool(idx.assignments("default", "demo-app")))
        print(
            "\ncreated: AzureIdentity default/demo-identity (type 0, client id "
            f"{redact_id(identity.client_id)}), AzureIdentityBinding selector=demo-app,"
            f"\n         pod default/demo-app ({world.pod_ip(bound)}, bound and Assigned),"
            f" pod default/no-identity ({world.pod_ip(unbound)}, no binding)"
        )

        granted = await world.get_token(world.pod_ip(bound), RESOURCE)
        _show("pod default/demo-app asks for a token", granted)
        refused = await world.get_token(world.pod_ip(unbound), RESOURCE)
        _show("pod default/no-identity asks for a token", refused)
        again = await world.get_token(world.pod_ip(bound), RESOURCE)
        ok = (
            granted.status == 200
            and _claims(granted.token).get("appid") == identity.client_id
            and refused.status == 400
            and refused.body.get("error_description") == "Identity not found"
            and again.token == granted.token
            and world.imds.token_requests[(identity.client_id, RESOURCE)] == 1
        )
        print(
            f"\nupstream IMDS calls for that identity and resource: "
            f"{world.imds.token_requests[(identity.client_id, RESOURCE)]} "
            "(the second request was a cache hit)"
        )
        print(
            "\n"
            + (
                "OK: the bound pod got its own token, the unbound pod was refused."
                if ok
                else "FAILED: the demonstration did not behave as expected."
            )
        )
        if once:
            return 0 if ok else 1
        print(
            "\nTry it yourself while this runs (Ctrl-C to stop):\n"
            f"  curl -s --interface {world.pod_ip(bound)} -H Metadata:true "
            f"'{world.token_url}/metadata/identity/oauth2/token?api-version=2018-02-01"
            f"&resource={RESOURCE}'\n"
            f"  curl -s --interface {world.pod_ip(unbound)} -H Metadata:true "
            f"'{world.token_url}/metadata/identity/oauth2/token?api-version=2018-02-01"
            f"&resource={RESOURCE}'\n"
            f"  KUBECONFIG={world.kubeconfig} kubectl get azureassignedidentities -A  "
            "(the emulated API server)"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("\nstopping the sandbox")
        return 0 if ok else 1
    finally:
        await world.stop()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="nmi sandbox", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="run the demonstration and exit")
    parser.add_argument("--port", type=int, default=0, help="port for nmi (default: any free)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show nmi's logs")
    args = parser.parse_args(list(argv))
    logs.setup(fmt=LogFormat.TEXT, verbosity=0)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    from .cli import run_loop

    try:
        return run_loop(demo(once=args.once, port=args.port))
    except KeyboardInterrupt:  # pragma: no cover - signal handlers normally catch it
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
