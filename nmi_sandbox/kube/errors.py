"""Failed API calls, as the real kube-apiserver reports them.

Why this exists: clients (and the daemon) branch on an error's HTTP code, its
``Status.reason`` and sometimes its message, so every layer of the emulator raises
:class:`KubeApiError` carrying the exact ``Status`` object the real server would send.
The constructors here are the server's generic errors; the ones that name a resource
(NotFound, AlreadyExists, Conflict, Forbidden, Invalid) are methods of
:class:`~nmi_sandbox.kube.resources.Resource`, built from :func:`error` and
:class:`FieldError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .meta import JSON

__all__ = [
    "FieldError",
    "KubeApiError",
    "bad_request",
    "error",
    "expired",
    "internal",
    "method_not_allowed",
    "resource_not_found",
    "status",
    "too_large_rv",
    "unauthorized",
    "unsupported_media_type",
]


class KubeApiError(Exception):
    """A failed API call; ``status`` is the ``Status`` object the server answers with."""

    def __init__(self, status: JSON) -> None:
        super().__init__(status.get("message", ""))
        self.status = status
        self.code: int = int(status["code"])
        self.reason: str = str(status.get("reason", ""))


def status(code: int, reason: str, message: str, details: JSON | None = None) -> JSON:
    """A ``Status`` object with the keys in the order the real server writes them."""
    st: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
    }
    if reason:
        st["reason"] = reason
    if details is not None:
        st["details"] = details
    st["code"] = code
    return st


def error(code: int, reason: str, message: str, details: JSON | None = None) -> KubeApiError:
    return KubeApiError(status(code, reason, message, details))


def unauthorized() -> KubeApiError:
    return error(401, "Unauthorized", "Unauthorized")


def bad_request(message: str) -> KubeApiError:
    return error(400, "BadRequest", message)


def resource_not_found() -> KubeApiError:
    return error(404, "NotFound", "the server could not find the requested resource", {})


def method_not_allowed() -> KubeApiError:
    return error(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        {},
    )


def unsupported_media_type(accepted: str) -> KubeApiError:
    return error(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: "
        + accepted,
        {},
    )


def expired(message: str) -> KubeApiError:
    return error(410, "Expired", message)


def too_large_rv(requested: int, current: int) -> KubeApiError:
    return error(
        504,
        "Timeout",
        f"Too large resource version: {requested}, current: {current}",
        {
            "causes": [
                {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
            ],
            "retryAfterSeconds": 1,
        },
    )


def internal(message: str) -> KubeApiError:
    # errToAPIStatus' fallback for plain errors: code 500, reason Unknown ("").
    return error(500, "", message)


@dataclass(frozen=True)
class FieldError:
    """One field.Error of the real validation code."""

    type: str  # Required | Invalid | Forbidden
    path: str
    detail: str = ""
    value: Any = None

    def __str__(self) -> str:
        if self.type == "Required":
            text = "Required value"
        elif self.type == "Invalid":
            text = f"Invalid value: {json.dumps(self.value)}"
        else:
            text = self.type
        if self.detail:
            text += f": {self.detail}"
        return f"{self.path}: {text}"

    def cause(self) -> JSON:
        reason = {
            "Required": "FieldValueRequired",
            "Invalid": "FieldValueInvalid",
            "Forbidden": "FieldValueForbidden",
        }[self.type]
        message = str(self)[len(self.path) + 2 :]
        return {"reason": reason, "message": message, "field": self.path}
