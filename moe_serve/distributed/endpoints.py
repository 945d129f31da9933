"""Where the control sockets live: ipc paths in a private temp dir, or TCP ports chosen at runtime.

Nothing here hard-codes a port: a TCP endpoint asks the kernel for a free one (bind to port 0),
an ipc endpoint is a path in a fresh `tempfile.mkdtemp` directory that the frontend removes on exit.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_tcp_port_run(count: int, host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port P with P .. P+count-1 all free a moment ago (a worker endpoint binds PORT and PORT+1+r).
    Drawn below Linux's ephemeral range (32768+), where outgoing connections take ports at random: a
    run taken from port 0's neighbours can be gone by the time it is bound."""
    import random

    for _ in range(tries):
        base = random.randrange(20000, 32768 - count)
        held = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no run of {count} free TCP ports on {host} after {tries} tries")


@dataclass
class ControlEndpoints:
    """Addresses of one worker group's control sockets (frontend binds, ranks connect).

    up:    PULL on the frontend; every rank PUSHes Ready, Heartbeat, StepOutput, WorkerError to it.
    down:  one PUSH per rank on the frontend; rank r PULLs its step plans and commands from down[r].
    store: torch.distributed rendezvous (file:// in the temp dir, or tcp://host:port).
    """

    up: str
    down: list[str]
    store: str
    tmpdir: str | None = None

    @staticmethod
    def create(world_size: int, transport: str = "ipc", host: str = "127.0.0.1") -> "ControlEndpoints":
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"parallel.control_transport must be ipc or tcp, got {transport!r}")
        tmpdir = tempfile.mkdtemp(prefix="moe-serve-")
        store = f"file://{os.path.join(tmpdir, 'dist-store')}"
        if transport == "ipc":
            return ControlEndpoints(
                up=f"ipc://{tmpdir}/up", down=[f"ipc://{tmpdir}/down-{r}" for r in range(world_size)],
                store=store, tmpdir=tmpdir,
            )
        # "*" : zmq binds a free port; the frontend reads the real address back (LAST_ENDPOINT)
        return ControlEndpoints(up=f"tcp://{host}:*", down=[f"tcp://{host}:*"] * world_size,
                                store=store, tmpdir=tmpdir)

    def cleanup(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
