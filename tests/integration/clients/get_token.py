"""A pod's application: gets a token with a real Azure SDK client, from a given source address.

Run as a separate process, as an application would be.  The token endpoint
comes from ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` (read by the SDKs); the HTTP
session is bound to the pod's address so that nmi attributes the call to it.

usage: get_token.py {azure-identity|msal} SOURCE_IP|- SCOPE_OR_RESOURCE [SELECTOR=VALUE]
(SELECTOR: client_id, object_id or resource_id)
Prints one JSON line: {"ok": true, "token": ..., "expires_on": ...} or {"ok": false, "error": ...}.
"""

import json
import sys

import requests
from requests.adapters import HTTPAdapter


class SourceAddressAdapter(HTTPAdapter):
    def __init__(self, source: str) -> None:
        self._source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["source_address"] = (self._source, 0)
        super().init_poolmanager(*args, **kwargs)


def main() -> None:
    client, source, target = sys.argv[1:4]
    selector = dict(arg.split("=", 1) for arg in sys.argv[4:])
    session = requests.Session()
    if source != "-":  # "-": the process already lives at the pod's address (network namespace)
        session.mount("http://", SourceAddressAdapter(source))
    try:
        if client == "azure-identity":
            from azure.core.pipeline.transport import RequestsTransport
            from azure.identity import ManagedIdentityCredential

            kwargs = {}
            if "client_id" in selector:
                kwargs["client_id"] = selector["client_id"]
            elif selector:
                kwargs["identity_config"] = selector
            cred = ManagedIdentityCredential(
                transport=RequestsTransport(session=session, session_owner=False), **kwargs
            )
            first = cred.get_token(target)
            second = cred.get_token(target)  # served from the credential's own cache
            out = {
                "ok": True,
                "token": first.token,
                "expires_on": first.expires_on,
                "same_second": second.token == first.token,
            }
        else:
            import msal

            if selector:
                identity = msal.UserAssignedManagedIdentity(**selector)
            else:
                identity = msal.SystemAssignedManagedIdentity()
            result = msal.ManagedIdentityClient(
                identity, http_client=session
            ).acquire_token_for_client(resource=target)
            if "access_token" in result:
                out = {
                    "ok": True,
                    "token": result["access_token"],
                    "expires_in": result["expires_in"],
                }
            else:
                out = {
                    "ok": False,
                    "error": result.get("error"),
                    "error_description": result.get("error_description"),
                }
    except Exception as exc:  # the test reads the failure from the output
        out = {"ok": False, "error": type(exc).__name__, "error_description": str(exc)[:500]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
