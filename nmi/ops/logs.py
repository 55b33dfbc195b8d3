"""Structured logging with redaction built in.

``--log-format text`` (default) gives readable lines, ``json`` one JSON
object per line.  Structured fields travel in ``extra={"fields": {...}}``.
Values under keys that can carry credentials are never written; client ids
are shortened the way aad-pod-identity did.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from ..config import LogFormat

SENSITIVE_KEYS = frozenset(
    {
        "access_token",
        "token",
        "secret",
        "client_secret",
        "password",
        "certificate",
        "assertion",
        "authorization",
        "private_key",
    }
)
REDACT_KEYS = frozenset({"client_id", "clientid", "object_id"})


def redact_id(value: str) -> str:
    if len(value) <= 8:
        return "####"
    return f"{value[:4]}##### REDACTED #####{value[-4:]}"


def clean(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        lowered = key.lower()
        if lowered in SENSITIVE_KEYS:
            out[key] = "[redacted]"
        elif lowered in REDACT_KEYS and isinstance(value, str) and value:
            out[key] = redact_id(value)
        else:
            out[key] = value
    return out


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(clean(fields))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in clean(fields).items())
        return line


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or " " in text or '"' in text) else text


def setup(*, fmt: LogFormat, verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt is LogFormat.JSON else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 4 else logging.INFO)
    # Third-party libraries log request details (URLs with tokens in query strings,
    # bodies with assertions) at DEBUG: keep them at WARNING whatever -v says.
    for name in ("msal", "urllib3", "requests", "kubernetes_asyncio", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
