"""The last upstream error per identity, kept for ``nmi explain``.

Why: a refused pod's SDK shows one error at one moment; the operator asking
"why" later needs the daemon's memory of it.  The request path records a
summary when getting a token fails (keyed by the identity, ``Meta.uid_or_key``,
or ``"node"`` for the node's own identity); the admin socket reads it.  Bounded
(newest kept) and never holding credential material: summaries are built from
upstream error codes and descriptions, which never carry secrets.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_SUMMARY = 500


@dataclass(frozen=True, slots=True)
class LastError:
    summary: str
    at: float  # epoch seconds


class LastErrors:
    def __init__(self, *, max_entries: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self._entries: collections.OrderedDict[str, LastError] = collections.OrderedDict()
        self._max = max_entries
        self._clock = clock

    def record(self, owner: str, summary: str) -> None:
        self._entries.pop(owner, None)
        self._entries[owner] = LastError(summary[:MAX_SUMMARY], self._clock())
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def get(self, owner: str) -> LastError | None:
        return self._entries.get(owner)

    def clear(self, owner: str) -> None:
        self._entries.pop(owner, None)

    def __len__(self) -> int:
        return len(self._entries)
