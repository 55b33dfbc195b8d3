"""nmi's commands as real processes next to a loopback world: ports, the CLI, ``nmi mic``.

The tests and the benchmarks run the daemon and the controller as their own processes
(their real command lines, signals and exit codes); this is the one place that knows
how to start them against a :class:`~nmi_sandbox.world.LoopbackWorld` and how to tell
that they are ready — by their probes, the only signal a separate process gives.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import aiohttp

from .world import MIC_NAMESPACE, LoopbackWorld


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a child process's listener)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_nmi(*argv: str, timeout: float = 60) -> tuple[int, str, str]:
    """``python -m nmi ARGV`` to completion: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nmi",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def mic_args(
    world: LoopbackWorld, *, probe_port: int, metrics_port: int, namespace: str = MIC_NAMESPACE
) -> list[str]:
    """``nmi mic``'s arguments as the Deployment in ``daemonset/mic/`` gives them, pointed at
    the world (kubeconfig, azure.json) and with the probes on loopback."""
    return [
        "mic",
        f"--kubeconfig={world.kubeconfig}",
        f"--cloudconfig={world.cloudconfig}",
        f"--leader-election-namespace={namespace}",
        "--leader-election-name=nmi-mic",
        f"--http-probe-port={probe_port}",
        "--probe-address=127.0.0.1",
        f"--prometheus-port={metrics_port}",
        "--prometheus-address=127.0.0.1",
        "--log-format=json",
    ]


class MicProcess:
    """One ``nmi mic`` replica as its own process, its log in the world's directory."""

    def __init__(self, proc: asyncio.subprocess.Process, probe: int, name: str) -> None:
        self.proc, self.probe, self.name = proc, probe, name

    @classmethod
    async def start(cls, world: LoopbackWorld, name: str, *extra: str) -> MicProcess:
        """Start a replica (``MIC_POD_NAME`` = ``name``) and wait until it is ready."""
        world.ensure_namespace(MIC_NAMESPACE)
        probe = free_port()
        env = {**os.environ, **world.cloud_environ(), "MIC_POD_NAME": name}
        env["REQUESTS_CA_BUNDLE"] = str(world.ca_bundle)
        log = world.workdir / f"{name}.log"
        with log.open("wb") as sink:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "nmi",
                *mic_args(world, probe_port=probe, metrics_port=free_port()),
                *extra,
                env=env,
                stderr=sink,
            )
        replica = cls(proc, probe, name)
        deadline = time.monotonic() + 60
        while (await replica.get("/readyz"))[0] != 200:
            if proc.returncode is not None or time.monotonic() > deadline:
                await replica.stop()
                raise RuntimeError(f"nmi mic {name} did not become ready; its log: {log}")
            await asyncio.sleep(0.05)
        return replica

    async def get(self, path: str) -> tuple[int, str]:
        """GET on the replica's probe port: (status, body); (0, "") if nothing answers."""
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{self.probe}{path}") as resp,
            ):
                return resp.status, await resp.text()
        except aiohttp.ClientError:
            return 0, ""

    async def health(self) -> str:
        """``Active`` on the leader, ``Not Active`` elsewhere, "" when it does not answer."""
        return (await self.get("/healthz"))[1]

    async def leading(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while await self.health() != "Active":
            if time.monotonic() > deadline:
                raise TimeoutError(f"nmi mic {self.name} never led")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: a crash, the lease not released."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> int:
        """SIGTERM (the lease released), SIGKILL after 20 s; the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
        return await self.proc.wait()


__all__ = ["MicProcess", "free_port", "mic_args", "run_nmi"]
