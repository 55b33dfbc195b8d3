"""``nmi explain``'s report as text: one line per link of the chain, then the verdict.

Why apart from the model: the JSON document (``-o json``) is the stable
interface for tools; this is only its human view, and changing its wording
must never change a decision.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

JSONDict = dict[str, Any]

EXIT_TOKEN = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def _federation_lines(
    add: Callable[[str], None], fed: JSONDict | None, daemon: JSONDict | None
) -> None:
    """The federated credential Azure AD must hold for this pod, and the shadow trial."""
    if not fed:
        return
    live: JSONDict = (daemon or {}).get("federation") or {}
    issuer = (
        live.get("issuer")
        or fed.get("issuer")
        or "(unknown: the API server's --service-account-issuer)"
    )
    audience = live.get("audience") or fed["audience"]
    if fed["mode"] == "federated":
        add(
            f"federation: the pod's service-account token ({fed['service_account']}) is "
            f"exchanged with Azure AD for application {fed['application'] or '-'}; that "
            "application (or managed identity) needs this federated credential:"
        )
    else:
        add(
            "federation (shadow trial, annotation aadpodidentity.k8s.io/federation=shadow): "
            f"to switch to spec.type 3, application {fed['application'] or '-'} needs this "
            "federated credential:"
        )
    add(f"  issuer:   {issuer}")
    add(f"  subject:  {fed['subject']}")
    add(f"  audience: {audience}")
    held = live.get("service_account_token")
    if held:
        add(
            f"  service-account token held: {held['remaining_seconds']}s left"
            + ("" if held["presented"] else " (too close to expiry: the next exchange renews it)")
        )
    shadow = live.get("shadow")
    if fed["mode"] == "shadow":
        if shadow:
            add(f"  last trial ({shadow['age_seconds']}s ago): {shadow['summary']}")
        elif daemon is not None and daemon.get("available"):
            add("  last trial: none yet (one runs after the pod's next token request)")


def render_text(report: JSONDict, exit_code: int) -> str:
    lines: list[str] = []
    add = lines.append
    doc: JSONDict = report.get("explanation") or {}
    pod = doc.get("pod")
    add(
        f"node {doc.get('node')}, {doc.get('mode')} mode, namespaced rules: "
        + (f"on ({doc.get('namespaced_why')})" if doc.get("namespaced") else "off")
    )
    if pod:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(pod["labels"].items())) or "(none)"
        add(f"pod {pod['namespace']}/{pod['name']}")
        add(f"  uid:    {pod['uid']}")
        add(f"  node:   {pod['node'] or '(not scheduled)'}")
        add(
            f"  phase:  {pod['phase'] or '(none)'}    IPs: {', '.join(pod['ips']) or '(none)'}"
            + ("    hostNetwork" if pod["host_network"] else "")
        )
        add(f"  labels: {labels}")
    for other in doc.get("pods_with_ip") or ():
        add(
            f"pod {other['namespace']}/{other['name']} has this IP but cannot call "
            f"(phase {other['phase'] or '-'}{', hostNetwork' if other['host_network'] else ''})"
        )
    if doc.get("caller_problem"):
        add(f"caller: NOT attributable: {doc['caller_problem']}")
    elif pod:
        add("caller: traffic from the pod's IP is attributed to this pod")
    if pod is not None and "bindings" in doc:
        label = doc.get("label")
        add(f"label aadpodidbinding: {label!r}" if label else "label aadpodidbinding: (not set)")
        bindings: list[JSONDict] = doc.get("bindings") or []
        if label:
            add(f"bindings with selector {label!r}:" + ("" if bindings else " none"))
        for b in bindings:
            ident = b.get("identity_detail")
            what = (
                f"{ident['type_name']}, client id {ident['client_id'] or '-'}"
                if ident
                else "identity missing"
            )
            verdict = "used" if b["used"] else f"DROPPED: {b['dropped_because']}"
            add(
                f"  {b['namespace']}/{b['name']} -> AzureIdentity {b['namespace']}/"
                f"{b['identity']} ({what}): {verdict}"
            )
        others: list[JSONDict] = doc.get("other_bindings_in_namespace") or []
        if others and not any(b["used"] for b in bindings):
            add(
                f"  other bindings in namespace {pod['namespace']}: "
                + ", ".join(f"{o['name']} (selector {o['selector']!r})" for o in others)
            )
        assignments = doc.get("assignments")
        if assignments is None:
            add("AzureAssignedIdentities: not used in managed mode")
        else:
            add("AzureAssignedIdentities of the pod:" + ("" if assignments else " none"))
            for a in assignments:
                why = f" ({a['why']})" if a.get("why") else ""
                add(
                    f"  {a['namespace']}/{a['name']}: identity {a['identity']}, state "
                    f"{a['state']}, node {a['node'] or '-'}: {a['status']}{why}"
                )
                mic = a.get("controller") or {}
                if mic.get("step"):
                    add(f"    controller: {mic['step']}")
                if mic.get("last_error"):
                    add(f"    controller's last error: {mic['last_error']}")
        exceptions: list[JSONDict] = doc.get("exceptions_in_namespace") or []
        if exceptions:
            add("AzurePodIdentityExceptions in the namespace:")
            for e in exceptions:
                add(
                    f"  {e['namespace']}/{e['name']} podLabels {e['pod_labels']}: "
                    + ("MATCHES" if e["matches"] else "no match")
                )
        else:
            add("AzurePodIdentityExceptions in the namespace: none")
        sel = doc.get("selector") or {}
        add(
            f"request: {sel.get('describe', 'no identity selector')}"
            + (f", resource {doc['resource']}" if doc.get("resource") else "")
        )
    for note in doc.get("notes") or ():
        add(f"note: {note}")
    decision: JSONDict = doc.get("decision") or {}
    kind = decision.get("kind", "?")
    add("")
    if kind == "grant":
        ident = decision["identity"]
        add(
            f"DECISION: grant AzureIdentity {ident['namespace']}/{ident['name']} "
            f"({ident['type_name']}, client id {ident['client_id'] or '-'}"
            + (f", resource id {ident['resource_id']}" if ident.get("resource_id") else "")
            + ")"
        )
    elif kind == "node_identity":
        add(f"DECISION: the node's own identity: {decision['summary']}")
    else:
        add(f"DECISION: {kind}: {decision.get('summary', '')}")
    imds = decision.get("imds") or {}
    body = imds.get("body")
    add(
        f"IMDS reply: HTTP {imds.get('status')} "
        + (json.dumps(body, separators=(",", ":")) if isinstance(body, dict) else str(body))
    )
    _federation_lines(add, doc.get("federation"), report.get("daemon"))
    daemon: JSONDict | None = report.get("daemon")
    if daemon is not None:
        add("")
        if not daemon.get("available"):
            add(f"daemon: {daemon.get('why', 'cache state unavailable')}")
        else:
            add(
                f"daemon (admin socket {daemon['socket']}, node {daemon['node']}, "
                f"{'synced' if daemon.get('synced') else 'NOT synced'}):"
            )
            live: JSONDict = daemon.get("explanation") or {}
            if not daemon.get("found"):
                add("  the daemon does not see this pod (yet)")
            else:
                live_decision: JSONDict = live.get("decision") or {}
                add(
                    f"  its decision: {live_decision.get('kind')}: "
                    f"{live_decision.get('summary', '')}"
                )
                if live_decision.get("kind") != kind:
                    add(
                        "  (differs from the API server's view above: the daemon's watch may "
                        "lag, or its flags differ)"
                    )
            cache = daemon.get("cache")
            if cache is None:
                add("  token cache: no identity chosen, nothing cached")
            else:
                entries: list[JSONDict] = cache.get("entries") or []
                add(
                    f"  token cache for {cache['identity']}: "
                    + (
                        f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
                        if entries
                        else "empty"
                    )
                )
                for e in entries:
                    if not e.get("present"):
                        add(f"    {e['resource']}: not cached (the next request asks upstream)")
                        continue
                    add(
                        f"    {e['resource']}: {e['remaining_seconds']}s left"
                        + (
                            ""
                            if not e["servable"] or not e.get("clients_refetch")
                            else " (under 5 minutes: SDKs ask again on every call)"
                        )
                        + ("" if e["servable"] else " (expired)")
                        + ", refresh "
                        + ("due" if e["refresh_due"] else f"in {e['refresh_in_seconds']}s")
                        + (" (refreshing now)" if e.get("refreshing") else "")
                    )
                if cache.get("stale_entries"):
                    add(f"    {cache['stale_entries']} entries from an older spec (not served)")
            error = daemon.get("last_error")
            if error:
                add(f"  last upstream error ({error['age_seconds']}s ago): {error['summary']}")
            else:
                add("  last upstream error: none recorded")
    add("")
    add(
        "result: "
        + (
            "the pod gets a token (exit 0)"
            if exit_code == EXIT_TOKEN
            else "the pod gets NO token (exit 1)"
        )
    )
    return "\n".join(lines) + "\n"
