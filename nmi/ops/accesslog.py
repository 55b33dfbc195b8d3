"""The access log: one line per request, written without slowing the request down.

Going through ``logging`` costs a LogRecord, a formatter and a write per
request — tens of microseconds, more than the rest of a cache hit.  This
writer renders the same line (text, or JSON with ``--log-format json``)
directly, and batches lines into one write at most every ``FLUSH_AFTER``
seconds (or every ``FLUSH_LINES`` lines), and at shutdown.
Only fixed, safe fields are logged: no token, secret or client id ever
reaches it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

from ..config import LogFormat

NAME = "nmi.access"
FLUSH_AFTER = 0.02
FLUSH_LINES = 1024


class AccessLog:
    def __init__(self, *, fmt: LogFormat, stream: TextIO | None = None) -> None:
        self.fmt = fmt
        self.stream = stream
        self._lines: list[str] = []
        self._scheduled = False
        self._second = -1
        self._prefix = ""
        self._milli = -1
        self._milli_stamp = ""
        self.enabled = logging.getLogger(NAME).isEnabledFor(logging.INFO)
        self.dropped = 0

    def _stamp(self, now: float) -> str:
        milli = int(now * 1000)
        if milli == self._milli:  # under load, many lines share a millisecond
            return self._milli_stamp
        second = milli // 1000
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._milli = milli
        self._milli_stamp = f"{self._prefix}.{milli % 1000:03d}"
        return self._milli_stamp

    def write(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.fmt is LogFormat.JSON:
            doc = {"ts": self._stamp(now) + "Z", "level": "info", "logger": NAME, "msg": "request"}
            doc.update(fields)
            line = json.dumps(doc, separators=(",", ":"), default=str)
        else:
            parts = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
            line = f"{self._stamp(now).replace('T', ' ')} INFO    {NAME}: request {parts}"
        self._append(line)

    def prefix(self, fields: dict[str, Any]) -> str:
        """Fields that repeat from line to line, rendered once (see ``write_prefixed``)."""
        if self.fmt is LogFormat.JSON:
            return json.dumps(fields, separators=(",", ":"), default=str)[1:-1]
        return " ".join(f"{k}={_text(v)}" for k, v in fields.items())

    def write_prefixed(self, prefix: str, latency_ms: float, client_request_id: str) -> None:
        """The same line as ``write``, from a pre-rendered prefix and the varying fields."""
        if not self.enabled:
            return
        stamp = self._stamp(time.time())
        if self.fmt is LogFormat.JSON:
            tail = (
                f',"client_request_id":{json.dumps(client_request_id)}' if client_request_id else ""
            )
            line = (
                f'{{"ts":"{stamp}Z","level":"info","logger":"{NAME}","msg":"request",'
                f'{prefix},"latency_ms":{latency_ms}{tail}}}'
            )
        else:
            tail = f" client_request_id={_text(client_request_id)}" if client_request_id else ""
            line = (
                f"{stamp[:10]} {stamp[11:]} INFO    {NAME}: request {prefix} "
                f"latency_ms={latency_ms}{tail}"
            )
        self._append(line)

    def _append(self, line: str) -> None:
        lines = self._lines
        lines.append(line)
        if len(lines) >= FLUSH_LINES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        data = "\n".join(self._lines) + "\n"
        self._lines.clear()
        stream = self.stream or sys.stderr
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError):
            self.dropped += 1  # a closed or broken stream must not break serving


def _text(value: Any) -> str:
    text = str(value)
    if not text:
        return '""'
    return json.dumps(text) if (" " in text or '"' in text) else text
