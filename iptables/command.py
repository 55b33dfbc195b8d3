"""Runs one external command without blocking the event loop.

Everything this package does to the kernel goes through ``iptables-save``,
``iptables-restore`` and ``conntrack``.  They run as child processes started
with :func:`asyncio.create_subprocess_exec` (argument vectors, never a shell),
optionally behind a prefix such as ``ip netns exec NS`` so that tests can aim
every command at a namespace of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import IptablesError


@dataclass(frozen=True)
class CommandResult:
    """What a finished command printed and returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


async def run_command(
    argv: Sequence[str],
    *,
    prefix: Sequence[str] = (),
    stdin: str | None = None,
    timeout: float = 30.0,
    check: bool = True,
) -> CommandResult:
    """Run ``prefix + argv``, feed it ``stdin``, and collect its output.

    Raises :class:`IptablesError` when the program is missing, runs longer than
    ``timeout`` seconds (it is killed), or (with ``check``) exits non-zero.
    """
    full = (*prefix, *argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise IptablesError(f"cannot run {full[0]}", argv=full, stderr=str(exc)) from None
    data = stdin.encode() if stdin is not None else None
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise IptablesError(f"{' '.join(full)} timed out after {timeout:g}s", argv=full) from None
    except BaseException:
        # Cancelled: do not leave the child behind.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    rc = proc.returncode if proc.returncode is not None else -1
    result = CommandResult(
        argv=full,
        returncode=rc,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
    )
    if check and rc != 0:
        raise IptablesError(
            f"{' '.join(full)} exited with {rc}", argv=full, returncode=rc, stderr=result.stderr
        )
    return result
