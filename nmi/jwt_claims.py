"""The claims of a JWT, read without verifying it.

Why: nmi reads a few claims of tokens that came to it over authenticated
channels — the ``oid`` and ``tid`` of Azure AD tokens it obtained, the
``iss``/``sub``/``aud``/``exp`` of service-account tokens the API server
issued — to describe and key them, never to trust them.  One reader for all.
"""

from __future__ import annotations

import base64
import json
from typing import Any


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of ``token`` as a dict ({} when it is not a JWT)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}
