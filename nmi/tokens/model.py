"""What a token and an upstream failure look like inside nmi."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..jwt_claims import unverified_claims


@dataclass(frozen=True, slots=True)
class Token:
    """An access token as obtained upstream; times are epoch seconds."""

    access_token: str = field(repr=False)
    expires_on: int
    not_before: int
    client_id: str
    token_type: str = "Bearer"
    obtained_at: float = 0.0
    request_id: str = ""

    @property
    def lifetime(self) -> int:
        return max(self.expires_on - int(self.obtained_at or time.time()), 0)

    def remaining(self, now: float | None = None) -> int:
        return int(self.expires_on - (time.time() if now is None else now))

    def claim(self, name: str) -> str | None:
        """One claim of the (unverified) JWT payload; the token came from a trusted source."""
        value = unverified_claims(self.access_token).get(name)
        return str(value) if value is not None else None


class UpstreamError(Exception):
    """Azure AD or the node IMDS did not give a token.

    ``retryable`` separates transient failures (network, 5xx, throttling) from
    design-time ones (unknown resource, wrong secret), which clients must not
    retry.  ``description`` is safe to show to the pod: it never contains
    credential material.
    """

    def __init__(
        self,
        *,
        error: str,
        description: str,
        status: int | None,
        retryable: bool,
        retry_after: int | None = None,
        source: str = "aad",
    ) -> None:
        super().__init__(f"{source}: {error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.source = source
        # Federated identities: what Azure AD was shown (issuer, subject, audience of the
        # service-account token), for the pod's Event; never the token itself.
        self.shown = ""
