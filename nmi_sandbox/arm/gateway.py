"""What ARM's front door checks before compute sees a request: routes, token, limits, version.

Pure functions over the request's parts, each returning what passed or raising
the :class:`~nmi_sandbox.arm.resources.ArmError` ARM answers, with ARM's codes
and wording (see :mod:`nmi_sandbox.arm`).
"""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from nmi_sandbox.aad import resource_key

from .resources import ArmError, dotnet_timestamp, dotnet_utc

__all__ = [
    "COMPUTE_BUCKETS",
    "DEFAULT_AUDIENCES",
    "TYPES",
    "Throttle",
    "ThrottleCode",
    "ThrottleKind",
    "Window",
    "authenticate",
    "check_api_version",
    "injected_failure",
    "route",
    "str_claim",
    "throttled",
]

DEFAULT_AUDIENCES: Final[tuple[str, ...]] = (
    "https://management.azure.com/",
    "https://management.core.windows.net/",
)
"""Token audiences ARM (public cloud) accepts, compared with and without the trailing ``/``."""

CLOCK_SKEW: Final = 300
_API_VERSION_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}(-(preview|alpha|beta|privatepreview))?$")
_ARM_API_VERSIONS: Final = "2024-11-01, 2024-07-01, 2024-03-01, 2023-07-01, 2022-09-01, 2021-04-01"

TYPES: Final[dict[str, str]] = {
    "vm": "virtualMachines",
    "vmss": "virtualMachineScaleSets",
    "vmss vm": "virtualMachineScaleSets/virtualMachines",
    "operation": "locations/operations",
}
"""Route name -> the Microsoft.Compute resource type it serves."""

_PREFIX: Final = r"^/subscriptions/(?P<sub>[^/]+)"
_RG: Final = r"/resourcegroups/(?P<rg>[^/]+)/providers/microsoft\.compute"
_ROUTES: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    ("vm", re.compile(_PREFIX + _RG + r"/virtualmachines/(?P<name>[^/]+)/?$", re.I)),
    ("vmss", re.compile(_PREFIX + _RG + r"/virtualmachinescalesets/(?P<name>[^/]+)/?$", re.I)),
    (
        "vmss vm",
        re.compile(
            _PREFIX + _RG + r"/virtualmachinescalesets/(?P<name>[^/]+)"
            r"/virtualmachines/(?P<instance>[^/]+)/?$",
            re.I,
        ),
    ),
    (
        "operation",
        re.compile(
            _PREFIX + r"/providers/microsoft\.compute/locations/(?P<loc>[^/]+)"
            r"/operations/(?P<op>[^/]+)/?$",
            re.I,
        ),
    ),
)

COMPUTE_BUCKETS: Final[dict[str, tuple[str, int, int]]] = {
    "GET vm": ("LowCostGet", 4000, 32000),
    "GET vmss vm": ("LowCostGet", 4000, 32000),
    "GET vmss": ("GetVMScaleSet", 200, 1300),
    "PATCH vm": ("PutVM", 240, 1200),
    "PATCH vmss": ("CreateVMScaleSet", 60, 300),
    "GET operation": ("GetOperation", 15000, 30000),
}
"""Request kind -> (bucket, 3-minute budget, 30-minute budget) of compute's
``x-ms-ratelimit-remaining-resource`` header."""

ThrottleKind = Literal["read", "write"]
ThrottleCode = Literal["SubscriptionRequestsThrottled", "TooManyRequests"]


@dataclass(frozen=True)
class Throttle:
    retry_after: float
    code: ThrottleCode


class Window:
    """A request budget refilled every ``seconds`` (for the rate-limit headers only)."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self.started = time.monotonic()
        self.used = 0

    def take(self) -> int:
        now = time.monotonic()
        if now - self.started >= self.seconds:
            self.started, self.used = now, 0
        self.used += 1
        return max(self.limit - self.used, 0)


def route(path: str) -> tuple[str, re.Match[str] | None]:
    """``(route name, match)`` of a request path, ``("other", None)`` if none fits."""
    for name, pattern in _ROUTES:
        match = pattern.match(path)
        if match is not None:
            return name, match
    return "other", None


def str_claim(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) else None


# -------------------------------------------------------------------- tokens


def _auth_error(code: str, message: str, authority: str) -> ArmError:
    challenge = (
        f'Bearer authorization_uri="{authority}", error="invalid_token", '
        f'error_description="{message}"'
    )
    return ArmError(401, code, message, headers={"WWW-Authenticate": challenge})


def authenticate(
    header: str | None,
    *,
    keys: Sequence[tuple[str | None, rsa.RSAPublicKey]],
    audiences: Iterable[str],
    tenant_id: str | None,
    authority: str,
) -> dict[str, Any]:
    """The verified claims of ``Authorization: Bearer <JWT>``, or ARM's 401."""
    if not header:
        raise _auth_error(
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is missing.",
            authority,
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.casefold() != "bearer" or not token:
        raise _auth_error(
            "AuthenticationFailed",
            "Authentication failed. The 'Authorization' header is provided in an invalid format.",
            authority,
        )
    claims = _verify(token, keys, authority)
    audience = claims.get("aud")
    configured = list(audiences)
    allowed = {resource_key(a) for a in configured}
    presented = audience if isinstance(audience, list) else [audience]
    if not any(isinstance(a, str) and resource_key(a) in allowed for a in presented):
        shown = "','".join(v for a in configured for v in (a.rstrip("/") + "/", a.rstrip("/")))
        raise _auth_error(
            "InvalidAuthenticationTokenAudience",
            f"The access token has been obtained for wrong audience or resource '{audience}'. "
            f"It should exactly match with one of the allowed audiences '{shown}'.",
            authority,
        )
    if tenant_id is not None and str(claims.get("tid", "")).casefold() != tenant_id.casefold():
        raise _auth_error(
            "InvalidAuthenticationTokenTenant",
            f"The access token is from the wrong issuer '{claims.get('iss')}'. It must match "
            f"the tenant 'https://sts.windows.net/{tenant_id}/' associated with this "
            f"subscription. Please use the authority (URL) "
            f"'https://login.windows.net/{tenant_id}' to get the token. Note, if the "
            "subscription is transferred to another tenant there is no impact to the services, "
            "but information about new tenant could take time to propagate (up to an hour). If "
            "you just transferred your subscription and see this error message, please try back "
            "later.",
            f"https://login.windows.net/{tenant_id}",
        )
    return claims


def _verify(
    token: str, keys: Sequence[tuple[str | None, rsa.RSAPublicKey]], authority: str
) -> dict[str, Any]:
    invalid = _auth_error("InvalidAuthenticationToken", "The access token is invalid.", authority)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise invalid from None
    kid = header.get("kid")
    for _, key in sorted(keys, key=lambda k: k[0] != kid):
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                options={"verify_aud": False, "verify_iss": False, "require": ["exp"]},
                leeway=CLOCK_SKEW,
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.ExpiredSignatureError:
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp", 0)
            raise _auth_error(
                "ExpiredAuthenticationToken",
                f"The access token expiry UTC time '{dotnet_utc(float(exp))}' is earlier than "
                f"current UTC time '{dotnet_utc(time.time())}'.",
                authority,
            ) from None
        except jwt.PyJWTError:
            raise invalid from None
        return claims
    raise invalid


# ------------------------------------------------------------ limits, faults


def throttled(
    throttle: Throttle, *, kind: ThrottleKind, key: str, subscription: str, oid: str | None
) -> ArmError:
    """The 429 for a request of ``key`` (``"GET vmss"``…), ARM's or compute's."""
    seconds = throttle.retry_after
    shown = str(int(seconds)) if float(seconds).is_integer() else str(seconds)
    headers = {"Retry-After": shown}
    if throttle.code == "SubscriptionRequestsThrottled":
        headers[f"x-ms-ratelimit-remaining-subscription-{kind}s"] = "0"
        return ArmError(
            429,
            "SubscriptionRequestsThrottled",
            f"Number of '{kind}' requests for subscription '{subscription}' actor '{oid}' "
            f"exceeded. Please try again after '{shown}' seconds after additional tasks are "
            "completed.",
            headers=headers,
        )
    name, allowed, _ = COMPUTE_BUCKETS.get(key, ("HighCostGet", 1000, 10000))
    headers["x-ms-ratelimit-remaining-resource"] = (
        f"Microsoft.Compute/{name}3Min;0,Microsoft.Compute/{name}30Min;0"
    )
    now = datetime.datetime.now(datetime.UTC)
    detail = {
        "operationGroup": f"{name}3Min",
        "startTime": dotnet_timestamp(now - datetime.timedelta(minutes=3)),
        "endTime": dotnet_timestamp(now),
        "allowedRequestCount": allowed,
        "measuredRequestCount": allowed + 1,
    }
    group = "Read" if kind == "read" else "Write"
    return ArmError(
        429,
        "TooManyRequests",
        "The request is being throttled as the limit has been reached for operation type - "
        f"{group}_3Min. For more information, see - https://aka.ms/computethrottling",
        details=[
            {"code": "TooManyRequests", "target": f"{name}3Min", "message": json.dumps(detail)}
        ],
        headers=headers,
    )


def injected_failure(status: int, retry_after: float | None) -> ArmError:
    """An ARM gateway / compute server error (500, 502, 503, 504)."""
    headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
    code, message = {
        502: ("BadGateway", "The gateway received an invalid response from 'Microsoft.Compute'."),
        503: ("ServiceUnavailable", "The service is temporarily unavailable."),
        504: (
            "GatewayTimeout",
            "The gateway did not receive a response from 'Microsoft.Compute' within the "
            "specified time period.",
        ),
    }.get(status, ("InternalServerError", "Encountered internal server error."))
    return ArmError(status, code, message, headers=headers)


def check_api_version(
    api_version: str | None,
    *,
    route_name: str,
    supported: Sequence[str],
    location: str,
    locations: Iterable[str],
) -> None:
    """Pass, or ``MissingApiVersionParameter`` / ``InvalidApiVersionParameter`` /
    ``NoRegisteredProviderFound`` as ARM answers them."""
    if not api_version:
        raise ArmError(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    if not _API_VERSION_RE.match(api_version):
        raise ArmError(
            400,
            "InvalidApiVersionParameter",
            f"The api-version '{api_version}' is invalid. The supported versions are "
            f"'{_ARM_API_VERSIONS}'.",
        )
    if route_name == "other" or api_version in supported:
        return
    raise ArmError(
        400,
        "NoRegisteredProviderFound",
        f"No registered resource provider found for location '{location}' and API version "
        f"'{api_version}' for type '{TYPES[route_name]}'. The supported api-versions are "
        f"'{', '.join(supported)}'. The supported locations are "
        f"'{', '.join(sorted(set(locations) | {location}))}'.",
    )
