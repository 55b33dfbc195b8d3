"""What every layer of the emulator says about an object's metadata.

Why this exists: the error builders, the resource table, the selectors, admission and
the store all need the same few basics -- the JSON object type, the server's two
timestamp formats, how an object is keyed in storage, and the syntax rules of names,
label keys and label values (selectors reject keys and values that admission would
reject, with the same messages).  Keeping them in one leaf module lets the others
depend on it without depending on each other.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

__all__ = [
    "JSON",
    "LABEL_MSG",
    "SUBDOMAIN_MSG",
    "SYSTEM_META",
    "format_time",
    "is_dns1123_label",
    "is_dns1123_subdomain",
    "label_value_problem",
    "now",
    "object_key",
    "qualified_name_problem",
    "with_rv",
]

JSON = dict[str, Any]

# metadata the server owns: never taken from a request body
SYSTEM_META = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "selfLink",
    "managedFields",
)


def format_time(when: datetime.datetime, *, micro: bool = False) -> str:
    """``metav1.Time`` (whole seconds) or ``metav1.MicroTime`` (6 digits), UTC, as on the wire."""
    if micro:
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def now() -> str:
    return format_time(datetime.datetime.now(datetime.UTC))


def object_key(obj: JSON) -> tuple[str, str]:
    """(namespace or "", name): how storage keys an object, and the order LIST returns."""
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


def with_rv(obj: JSON, rv: int) -> JSON:
    """A shallow copy of ``obj`` carrying ``rv`` as its resourceVersion."""
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(rv)}}


# --------------------------------------------------------------------------- name syntax

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', "
    "regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)


def is_dns1123_label(name: str) -> bool:
    return len(name) <= 63 and _DNS1123_LABEL.match(name) is not None


def is_dns1123_subdomain(name: str) -> bool:
    return len(name) <= 253 and _DNS1123_SUBDOMAIN.match(name) is not None


def qualified_name_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label or annotation key, or None."""
    if not key:
        return "name part must be non-empty"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or not is_dns1123_subdomain(prefix)):
        return "prefix part " + SUBDOMAIN_MSG
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or "
            "'123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label value, or None."""
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_VALUE.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character (e.g. "
            "'MyValue',  or 'my_value',  or '12345', regex used for validation is "
            "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        )
    return None
