"""kubernetes-asyncio imported without its generated classes, and still whole on demand."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from nmi.kube import client  # what the daemon imports
eager = sorted(m for m in sys.modules if m.startswith("kubernetes_asyncio.client.models."))
apis = sorted(m for m in sys.modules if m.startswith("kubernetes_asyncio.client.api."))
import kubernetes_asyncio
from kubernetes_asyncio import client as k, config, watch
pod = k.V1Pod(metadata=k.V1ObjectMeta(name="x"))
core = k.CoreV1Api  # generated API classes load on first use
api_client = k.ApiClient  # what nmi uses
print(json.dumps({
    "eager_models": len(eager), "eager_apis": len(apis),
    "pod": pod.metadata.name, "core": core.__name__,
    "version": kubernetes_asyncio.__version__,
    "watch": hasattr(watch, "Watch"), "load": hasattr(config, "load_kube_config"),
    "api_client": api_client.__name__,
    "lazy": type(sys.modules["kubernetes_asyncio.client"]).__name__,
}))
"""


def test_models_are_not_imported_until_used() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True
    ).stdout
    found = json.loads(out)
    assert found["eager_models"] == 0 and found["eager_apis"] == 0
    assert found["lazy"] == "_LazyPackage"
    assert found["pod"] == "x" and found["core"] == "CoreV1Api"
    assert found["watch"] and found["load"] and found["version"]
    assert found["api_client"] == "ApiClient"


DAEMON_PROBE = """
import json, sys
import nmi.app, nmi.cli  # the daemon's whole import graph
print(json.dumps(sorted(
    m for m in sys.modules
    if m.split(".")[0] == "azure" or m.startswith(("nmi.mic", "nmi.azure"))
)))
"""


def test_the_daemon_never_imports_the_controller_or_the_azure_sdk() -> None:
    """The DaemonSet's pods pay nothing for the controller (the Azure SDK is ~40 MB)."""
    out = subprocess.run(
        [sys.executable, "-c", DAEMON_PROBE], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out) == []
